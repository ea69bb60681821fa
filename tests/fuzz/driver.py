"""The shared driver of memboost's loader fuzz harnesses (atheris, libFuzzer).

A harness is a module `tests/fuzz/fuzz_<name>.py` that defines two things:

    def seeds() -> list[bytes]      # valid inputs, written by memboost itself
    def target(data: bytes) -> None # loads `data`; returns (loaded) or raises

and nothing else: this driver finds it, seeds libFuzzer's corpus with
seeds(), runs target() on N inputs with coverage feedback from the memboost
and lort packages, and classifies each outcome:

    loaded   target returned
    refused  it raised memboost.MemboostError (a ValueError naming the file or
             key and what is wrong: the documented way to refuse an input)
    skipped  it raised Skip (the input never reached the loader under test)
    FAILURE  any other exception (IndexError, KeyError, RuntimeError,
             struct.error, MemoryError, ...), an input slower than
             --slow-seconds, or a rise of the peak RSS during one input larger
             than --rss-slack-mb plus --rss-factor times the input's size. A
             crash or hang of the process is a failure too (libFuzzer reports
             it and writes the input under --artifacts).

On the first failure libFuzzer stops and writes the offending input to
`<artifacts>/crash-<sha1>`; check it in under tests/fuzz/regressions/<name>/
(tests/test_fuzz_regressions.py replays every file there).

    python tests/fuzz/driver.py                      # every harness, 2000 inputs each
    python tests/fuzz/driver.py --runs 100000 safetensors checkpoint
    python tests/fuzz/driver.py --list
"""

import argparse
import importlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
OUTCOMES = ("loaded", "refused", "skipped")


class Skip(Exception):
    """Raised by a harness for an input that does not reach the loader under
    test (e.g. bytes that are not even a container to take a state from)."""


class Failure(AssertionError):
    """An outcome the loaders must never have."""


def harness_names():
    return sorted(f[len("fuzz_"):-3] for f in os.listdir(HERE) if f.startswith("fuzz_") and f.endswith(".py"))


def load_harness(name: str):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(f"fuzz_{name}")


def classify(target, data: bytes) -> str:
    """The outcome of one input: 'loaded', 'refused' or 'skipped'; raises
    Failure (chained to the original exception) for anything else."""
    from memboost.errors import MemboostError

    try:
        target(data)
    except Skip:
        return "skipped"
    except MemboostError as exc:
        if not str(exc):
            raise Failure("MemboostError without a message") from exc
        return "refused"
    except Exception as exc:  # noqa: BLE001 - every other exception is the finding
        raise Failure(f"{type(exc).__name__} escaped the loader: {exc}") from exc
    return "loaded"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_PLAIN = (bool, int, float, str, bytes)


def _trace_plain_comparisons_only(atheris) -> None:
    """atheris' native comparison tracer (what instrumented `a == b` calls)
    keeps a reference to the result whenever it is not a plain Python value:
    every `w == 0` on tensors in memboost leaked its result, ~40 KB per
    input of the from_pretrained harness, until libFuzzer's RSS limit. Its
    feedback is only useful for numbers, strings and bytes, so everything
    else is compared here, untraced (opid is already reversed by atheris
    when it swapped the operands). atheris.Fuzz() installs its tracer again
    when it starts: called on every input, this re-wraps whatever is there."""
    current = atheris._trace_cmp
    if getattr(current, "plain_only", False):
        return
    import operator

    from atheris.version_dependent import CMP_OP_SHIFT_AMOUNT

    ops = (operator.lt, operator.le, operator.eq, operator.ne, operator.gt, operator.ge)

    def trace_cmp(obj1, obj2, opid, idx, is_const):
        if isinstance(obj1, _PLAIN) and isinstance(obj2, _PLAIN):
            return current(obj1, obj2, opid, idx, is_const)
        return ops[opid >> CMP_OP_SHIFT_AMOUNT](obj1, obj2)

    trace_cmp.plain_only = True
    atheris._trace_cmp = trace_cmp


def _fuzz_child(args) -> None:
    """Runs one harness under libFuzzer in this process (which libFuzzer exits)."""
    import atheris

    sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
    from native_import import use_native_build

    use_native_build()  # memboost from its sources, which atheris can instrument
    with atheris.instrument_imports(include=["memboost", "lort"]):
        import memboost  # noqa: F401  (instrumented before any harness imports it)
        import memboost.io.checkpoint, memboost.train.qlora, memboost.formats.nf4, memboost.io.serialization  # noqa: E401,F401
    harness = load_harness(args.child)
    counts = dict.fromkeys(OUTCOMES, 0)
    started = time.time()

    def report():  # after every input: libFuzzer ends the process without running atexit
        counts["seconds"] = round(time.time() - started, 1)
        with open(args.stats, "w") as f:
            json.dump(counts, f)

    corpus = tempfile.mkdtemp(prefix="corpus-", dir=os.environ.get("MEMBOOST_FUZZ_TMP"))
    seeds = harness.seeds()
    for i, seed in enumerate(seeds):
        with open(os.path.join(corpus, f"seed{i:03d}"), "wb") as f:
            f.write(seed)
    # Warnings are not findings, and Python keeps every distinct warning
    # text in a registry for good (transformers' warning_once too): fuzzed
    # values in the messages would grow the RSS input after input.
    warnings.simplefilter("ignore")
    warning_once = getattr(getattr(logging.Logger, "warning_once", None), "cache_clear", lambda: None)
    # Warm up (lazy imports, first-call caches) before memory is measured.
    for seed in seeds:
        classify(harness.target, seed)
    slack = args.rss_slack_mb << 20

    def one_input(data: bytes) -> None:
        _trace_plain_comparisons_only(atheris)
        before, t0 = _peak_rss_bytes(), time.perf_counter()
        outcome = classify(harness.target, data)
        warning_once()
        seconds, grown = time.perf_counter() - t0, _peak_rss_bytes() - before
        if seconds > args.slow_seconds:
            raise Failure(f"one input of {len(data)} bytes took {seconds:.1f} s (limit {args.slow_seconds} s)")
        if grown > slack + args.rss_factor * len(data):
            raise Failure(f"one input of {len(data)} bytes raised the peak RSS by {grown >> 20} MiB")
        counts[outcome] += 1
        report()

    os.makedirs(args.artifacts, exist_ok=True)
    max_len = max(args.max_len, 2 * max(map(len, seeds)))
    atheris.Setup([sys.argv[0], f"-runs={args.runs}", f"-max_len={max_len}", f"-timeout={args.timeout}",
                   f"-max_total_time={args.max_seconds}", f"-artifact_prefix={args.artifacts}/",
                   "-print_final_stats=0", "-print_pcs=0", f"-seed={args.seed}", corpus], one_input)
    atheris.Fuzz()


def run(names, runs: int, max_seconds: int, artifacts: str, seed: int = 1, quiet: bool = False) -> dict:
    """Runs each harness in a subprocess of its own; returns {name: stats}
    where stats holds the outcome counts, 'seconds', 'returncode' and the
    tail of the log when it failed."""
    results = {}
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as stats_file:
            stats_path = stats_file.name
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--runs", str(runs), "--stats", stats_path,
               "--max-seconds", str(max_seconds), "--artifacts", os.path.abspath(artifacts), "--seed", str(seed)]
        with tempfile.TemporaryDirectory(prefix=f"memboost-fuzz-{name}-") as tmp:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, MEMBOOST_FUZZ_TMP=tmp))
        try:
            with open(stats_path) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            stats = dict.fromkeys(OUTCOMES, 0)
        finally:
            if os.path.exists(stats_path):
                os.unlink(stats_path)
        stats["returncode"] = proc.returncode
        if proc.returncode:
            stats["log"] = proc.stdout[-4000:]
        results[name] = stats
        if not quiet:
            total = sum(stats[k] for k in OUTCOMES)
            status = "ok" if not proc.returncode else f"FAILED (exit {proc.returncode})"
            print(f"{name:24s} {total:8d} inputs  loaded {stats['loaded']:7d}  refused {stats['refused']:7d}  "
                  f"skipped {stats['skipped']:7d}  {stats.get('seconds', 0):7.1f} s  {status}", flush=True)
            if proc.returncode:
                print(stats["log"], flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("harnesses", nargs="*", help="harness names (default: all)")
    p.add_argument("--runs", type=int, default=2000, help="inputs per harness (seeds included)")
    p.add_argument("--max-seconds", type=int, default=0, help="stop a harness after this long (0: no limit)")
    p.add_argument("--artifacts", default=os.path.join(HERE, "..", "..", "build", "fuzz"),
                   help="where libFuzzer writes failing inputs")
    p.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    p.add_argument("--list", action="store_true")
    # Limits of one input (what counts as a failure).
    p.add_argument("--slow-seconds", type=float, default=5.0)
    p.add_argument("--timeout", type=int, default=30, help="libFuzzer's hard per-input timeout (a hang)")
    p.add_argument("--rss-slack-mb", type=int, default=64)
    p.add_argument("--rss-factor", type=int, default=32)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _fuzz_child(args)
        return 0
    if args.list:
        print("\n".join(harness_names()))
        return 0
    unknown = sorted(set(args.harnesses) - set(harness_names()))
    if unknown:
        p.error(f"unknown harnesses {unknown}; known: {harness_names()}")
    results = run(args.harnesses or harness_names(), args.runs, args.max_seconds, args.artifacts, args.seed)
    return 1 if any(r["returncode"] for r in results.values()) else 0


if __name__ == "__main__":
    # Through the importable module, so that harnesses share its Skip class.
    sys.path.insert(0, HERE)
    import driver

    sys.exit(driver.main())
