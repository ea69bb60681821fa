"""`make gpu-check`: everything a machine with an NVIDIA GPU can check, in one
command, ending with one table.

1. preflight (seconds): nvidia-smi lists a GPU, torch sees it, nvcc and
   compute-sanitizer exist. Without them: one line saying what is missing,
   exit status 2, nothing built.
2. build: the extension with CUDA kernels for this GPU's architecture into
   build/gpu (cmake + ninja, every core).
3. every CUDA test (pytest -m cuda) against that build.
4. compute-sanitizer memcheck and racecheck over the CUDA op tests.
5. the GPU benchmark (benchmarks/bench_gpu_ops.py): bytes/s of each op
   against a device-to-device copy.
Each step has a time budget (8 minutes in all); a step over it counts as
failed. Exit status 0 only when every step passed.

    python tools/gpu_check.py [--build-dir build/gpu] [--keep-going]

Written without a GPU: no NVIDIA machine has run it yet.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The CUDA op tests the sanitizers run (their CUDA cases only, not the slow ones).
OP_TESTS = ["tests/test_cuda_review.py", "tests/test_mixed.py", "tests/test_ternary.py", "tests/test_nf4.py",
            "tests/test_pack.py", "tests/test_low_rank.py"]
# Seconds per step: 8 minutes in all.
BUDGET = {"build": 210, "cuda tests": 90, "memcheck": 75, "racecheck": 60, "benchmark": 45}


class Unavailable(Exception):
    pass


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def find_cuda_tool(name: str):
    """A CUDA toolkit program: on PATH, under $CUDA_HOME/bin, or /usr/local/cuda/bin."""
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def preflight() -> dict:
    """What this machine has, or Unavailable with the first thing it lacks."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise Unavailable("no NVIDIA GPU: nvidia-smi is not on PATH (this check needs a machine with an NVIDIA GPU "
                          "and its driver)")
    listed = _run([smi, "-L"], timeout=30)
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        why = (listed.stderr or listed.stdout).strip().splitlines()
        raise Unavailable(f"no NVIDIA GPU: `nvidia-smi -L` lists none ({why[0] if why else 'no output'})")
    import torch

    if not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda}; "
                          "a CPU-only torch build cannot run the CUDA kernels)")
    nvcc = find_cuda_tool("nvcc")
    if nvcc is None:
        raise Unavailable("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA toolkit builds the "
                          "kernels")
    sanitizer = find_cuda_tool("compute-sanitizer")
    if sanitizer is None:
        raise Unavailable("compute-sanitizer not found next to nvcc: the CUDA toolkit's sanitizer is part of this "
                          "check")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": gpus[0], "name": torch.cuda.get_device_name(0), "arch": f"{major}.{minor}", "nvcc": nvcc,
            "sanitizer": sanitizer, "torch": torch.__version__}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def step_build(env, build_dir, info):
    cmake = [sys.executable, "-m", "cmake"] if shutil.which("cmake") is None else ["cmake"]
    configure = [*cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
                 "-DMEMBOOST_CUDA=ON", "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={info['nvcc']}"]
    out = _run(configure, env=env, cwd=ROOT, timeout=BUDGET["build"])
    if out.returncode:
        return False, "configure failed:\n" + _tail(out.stdout + out.stderr)
    out = _run([*cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 4)], env=env, cwd=ROOT,
               timeout=BUDGET["build"])
    if out.returncode:
        return False, "build failed:\n" + _tail(out.stdout + out.stderr)
    return True, f"CUDA kernels for sm_{info['arch'].replace('.', '')}"


def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def step_pytest(env, build_dir, name, args, prefix=()):
    xml = build_dir / f"{name.replace(' ', '-')}.xml"
    cmd = [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    out = _run(cmd, env=env, cwd=ROOT, timeout=BUDGET[name])
    if not xml.exists():
        return False, "pytest did not finish:\n" + _tail(out.stdout + out.stderr)
    c = _junit_counts(xml)
    detail = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
    ok = out.returncode == 0 and c["failures"] + c["errors"] == 0 and c["passed"] > 0
    if c["skipped"]:
        ok = False  # on a GPU machine no CUDA test may skip
        detail += " (a CUDA test skipped on a GPU machine: see its reason)"
    if not ok:
        detail += "\n" + _tail(out.stdout + out.stderr, 25)
    return ok, detail


def step_sanitizer(env, build_dir, tool, info):
    env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # every allocation its own, so overruns are seen
    prefix = [info["sanitizer"], "--tool", tool, "--error-exitcode", "86", "--print-limit", "20"]
    ok, detail = step_pytest(env, build_dir, tool, ["-x", "-m", "cuda and not slow", *OP_TESTS], prefix=prefix)
    return ok, detail


def step_benchmark(env, build_dir):
    out_json = build_dir / "bench_gpu_ops.json"
    out = _run([sys.executable, "benchmarks/bench_gpu_ops.py", "--json", str(out_json)], env=env, cwd=ROOT,
               timeout=BUDGET["benchmark"])
    if out.returncode or not out_json.exists():
        return False, "benchmark failed:\n" + _tail(out.stdout + out.stderr), []
    data = json.loads(out_json.read_text())
    return True, f"copy {data['copy_bandwidth_Bps'] / 1e9:.0f} GB/s", data["rows"]


def table(results, bench_rows) -> str:
    lines = ["| step | result | seconds | detail |", "|---|---|---|---|"]
    for name, ok, seconds, detail in results:
        first = detail.splitlines()[0] if detail else ""
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {seconds:.0f} | {first} |")
    for r in bench_rows:
        batch = "" if r.get("batch") is None else f" batch {r['batch']}"
        lines.append(f"| bench {r['format']} {r['op']} {r['shape']}{batch} | {r['GBps']:.0f} GB/s | "
                     f"{r['us']:.1f} us | {100 * r['frac_of_copy_bw']:.0f}% of copy |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build/gpu")
    ap.add_argument("--keep-going", action="store_true", help="run every step even after one fails")
    args = ap.parse_args(argv)
    try:
        info = preflight()
    except Unavailable as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired:
        print("gpu-check: nvidia-smi did not answer within 30 s", file=sys.stderr)
        return 2
    build_dir = (ROOT / args.build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {info['gpu']} (sm_{info['arch'].replace('.', '')}), torch {info['torch']}", flush=True)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=info["arch"], MEMBOOST_NATIVE_BUILD=str(build_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tools" / "asan"), os.environ.get("PYTHONPATH")])))
    steps = [
        ("build", lambda: step_build(env, build_dir, info)),
        ("cuda tests", lambda: step_pytest(env, build_dir, "cuda tests", ["-m", "cuda", "tests"])),
        ("memcheck", lambda: step_sanitizer(env, build_dir, "memcheck", info)),
        ("racecheck", lambda: step_sanitizer(env, build_dir, "racecheck", info)),
    ]
    results, bench_rows, failed = [], [], False
    for name, fn in steps + [("benchmark", None)]:
        if failed and not args.keep_going:
            results.append((name, False, 0.0, "not run: an earlier step failed"))
            continue
        start = time.perf_counter()
        try:
            if name == "benchmark":
                ok, detail, bench_rows = step_benchmark(env, build_dir)
            else:
                ok, detail = fn()
        except subprocess.TimeoutExpired:
            ok, detail = False, f"over its budget of {BUDGET[name]} s"
        seconds = time.perf_counter() - start
        print(f"gpu-check: {name}: {'PASS' if ok else 'FAIL'} ({seconds:.0f} s) {detail}", flush=True)
        results.append((name, ok, seconds, detail))
        failed = failed or not ok
    print("\n" + table(results, bench_rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
