"""A big model in bounded memory: `memboost quantize` block by block on a
Llama-3-8B-shaped folder (make_synthetic_model.py), then a reload and 8
generated tokens, per format.

For each format (nf4, ternary, lort, mixed, mixed-bits; mixed calibrated on
--calib-seqs sequences of --calib-len tokens of Debian's fortunes,
GPTQ-style: --hessian --sequential; mixed-bits the same with --bits
--bits-budget, planned in two passes over the mapped weights first), in a
subprocess each:
- quantize: `python -m memboost quantize MODEL OUT --method F` (a model folder:
  the streaming path); wall time, time per billion quantized weights, peak
  resident memory of the process sampled every 20 ms from /proc/PID/status
  (VmRSS: everything resident, the input's memory-mapped pages included;
  RssAnon: the process's own memory, what cannot be dropped), bits per weight
  and the output's size;
- reload: `python -m memboost generate OUT --new-tokens 8` (load_quantized:
  the model built on the meta device, its tensors memory-mapped), its wall
  time and peak resident memory against the output's size, and the text.
- gguf: `python -m memboost gguf OUT OUT.gguf --type --gguf-type` (the
  quantized folder memory-mapped by load_quantized, each converted tensor
  spilled to a scratch file), its time and peak resident memory, then
  llama.cpp (llama-cpp-python) loads the file and generates 8 tokens, its
  peak resident memory too. A last row exports the float folder itself
  (memory-mapped by memboost.io.streaming.load_mapped).
A baseline row gives the same interpreter's peak after importing memboost
and transformers (what every row includes).
Targets (issue 24): peak resident memory <= 6 GB for every format while
quantizing the 8B shape; reload <= 1.2x the quantized size.

    python benchmarks/make_synthetic_model.py /data/llama3-8b-random             # once, 16 GB
    python benchmarks/bench_big_model.py --model /data/llama3-8b-random [--formats nf4,mixed] [--gguf-type Q4_0]
                                         [--json benchmarks/results/big_model_cpu.json]
    python benchmarks/bench_big_model.py --config tiny                          # a check of the script

"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("nf4", "ternary", "lort", "mixed", "mixed-bits")
PROMPT = "The capital of France is"


def _status_kib(pid: int) -> dict:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return fields


def run_sampled(cmd, interval: float = 0.02) -> dict:
    """Runs `cmd`, sampling its /proc status every `interval` s: stdout, return code, seconds, peak GiB."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.wait(interval):
            for key, value in _status_kib(proc.pid).items():
                peak[key] = max(peak[key], value)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"out": out, "seconds": seconds, "peak_rss_gib": peak["VmRSS"] / 2**20,
            "peak_anon_gib": peak["RssAnon"] / 2**20}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def quantize_args(fmt: str, seqs: int, length: int, bits: float) -> list:
    if not fmt.startswith("mixed"):
        return ["--method", fmt]
    planned = ["--bits", str(bits)] if fmt == "mixed-bits" else []
    return ["--method", "mixed", "--calibrate", "fortunes", "--calib-tokens", str(seqs * length),
            "--calib-window", str(length), "--hessian", "--sequential"] + planned


LLAMA_CPP_SNIPPET = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, verbose=False)
out = llm(sys.argv[2], max_tokens=8, temperature=0.0)
print(repr(out["choices"][0]["text"]))
"""


def gguf_row(python: str, folder: str, gguf_type: str, work: str, label: str) -> dict:
    """memboost gguf of `folder`, then llama.cpp on the file; errors are recorded, not raised."""
    path = os.path.join(work, f"{label}.gguf")
    row = {"format": label}
    try:
        g = run_sampled([python, "-m", "memboost", "gguf", folder, path, "--type", gguf_type, "--quiet"])
        row.update(gguf_s=g["seconds"], gguf_rss_gib=g["peak_rss_gib"], gguf_anon_gib=g["peak_anon_gib"],
                   gguf_gib=os.path.getsize(path) / 2**30)
        c = run_sampled([python, "-c", LLAMA_CPP_SNIPPET, path, PROMPT])
        row.update(llama_cpp_s=c["seconds"], llama_cpp_rss_gib=c["peak_rss_gib"],
                   llama_cpp_text=c["out"].strip()[:60])
    except SystemExit as exc:   # run_sampled's failure: the row says why
        row["gguf_error"] = str(exc).strip().splitlines()[-1][:120]
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(f"  gguf {label}: {row}", flush=True)
    return row


def bench(model: str, formats, seqs: int, length: int, work: str, gguf_type: str = "", bits: float = 3.5,
          float_gguf: bool = True, save=lambda rows: None) -> list:
    """The rows; `save(rows)` is called after each one, so an hour-long run keeps what it measured."""
    python = sys.executable
    base = run_sampled([python, "-c", "import memboost, transformers; from transformers import LlamaForCausalLM"])
    rows = [{"format": "baseline (imports)", "peak_rss_gib": base["peak_rss_gib"],
             "peak_anon_gib": base["peak_anon_gib"]}]
    print_table(rows, ["format", "peak_rss_gib", "peak_anon_gib"], "baseline")
    for fmt in formats:
        out = os.path.join(work, f"q-{fmt}")
        q = run_sampled([python, "-m", "memboost", "quantize", model, out, "--quiet"]
                        + quantize_args(fmt, seqs, length, bits))
        # not `bits`: that is mixed-bits' budget for the formats after this one
        avg_bits = float(re.search(r"\| bits per weight \| ([0-9.]+) over ([0-9.]+) M", q["out"]).group(1))
        weights = float(re.search(r"\| bits per weight \| [0-9.]+ over ([0-9.]+) M", q["out"]).group(1)) * 1e6
        size = folder_bytes(out)
        r = run_sampled([python, "-m", "memboost", "generate", out, "--prompt", PROMPT, "--new-tokens", "8"])
        text = r["out"].strip().splitlines()[-1][:80] if r["out"].strip() else ""
        row = {"format": fmt, "quantize_s": q["seconds"], "s_per_bweights": q["seconds"] / (weights / 1e9),
               "peak_rss_gib": q["peak_rss_gib"], "peak_anon_gib": q["peak_anon_gib"], "bits": avg_bits,
               "out_gib": size / 2**30, "reload_s": r["seconds"], "reload_rss_gib": r["peak_rss_gib"],
               "reload_over_size": r["peak_rss_gib"] * 2**30 / size,
               "reload_above_base_over_size": (r["peak_rss_gib"] - base["peak_rss_gib"]) * 2**30 / size,
               "text": text}
        print(f"  {fmt}: {row}", flush=True)
        if gguf_type:
            row.update({k: v for k, v in gguf_row(python, out, gguf_type, work, fmt).items() if k != "format"})
        rows.append(row)
        save(rows)
        shutil.rmtree(out, ignore_errors=True)
    if gguf_type and float_gguf:
        rows.append(gguf_row(python, model, gguf_type, work, "float folder"))
        save(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (make_synthetic_model.py writes one)")
    parser.add_argument("--config", choices=("tiny", "small"), help="write make_synthetic_model.py's folder of "
                        "that config to a temporary folder and run on it (tiny: a check of this script)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--calib-seqs", type=int, default=32, help="mixed: calibration sequences")
    parser.add_argument("--calib-len", type=int, default=512, help="mixed: tokens per calibration sequence")
    parser.add_argument("--note", default="", help="a note stored with the rows (e.g. how loaded the machine was)")
    parser.add_argument("--bits-budget", type=float, default=3.5, help="mixed-bits: the --bits budget")
    parser.add_argument("--gguf-type", default="Q4_0", help="GGUF type of the exports ('' for no export)")
    parser.add_argument("--no-float-gguf", action="store_true", help="skip the float folder's GGUF export row")
    parser.add_argument("--work", help="folder for the quantized outputs (default: a temporary folder)")
    parser.add_argument("--json", help="write the rows here (default benchmarks/results/big_model_cpu.json; "
                                       "none with --config tiny)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of other formats already in --json "
                        "(this run's rows replace those of their formats; each row says when it was measured)")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.config is None):
        parser.error("give --model DIR or --config tiny|small")
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    json_path = args.json if args.json is not None else ("" if args.config else
                                                          os.path.join(ROOT, "benchmarks/results/big_model_cpu.json"))

    earlier = []
    if args.merge and json_path and os.path.exists(json_path):
        with open(json_path) as f:
            earlier = json.load(f).get("rows", [])
    today = time.strftime("%Y-%m-%d")

    def save(rows):
        for row in rows:
            row.setdefault("measured", today)
        ours = {row["format"]: row for row in rows}
        merged = [ours.pop(row["format"], row) for row in earlier] + list(ours.values())
        write_json(json_path, {"model": args.model or args.config, "calib_seqs": args.calib_seqs,
                               "calib_len": args.calib_len, "bits_budget": args.bits_budget, "note": args.note,
                               "rows": merged})

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        model = args.model
        if args.config:
            from make_synthetic_model import make

            model = os.path.join(work, "model")
            make(model, args.config, shard_size="10MB" if args.config == "tiny" else "200MB")
        rows = bench(model, formats, args.calib_seqs, args.calib_len, work, args.gguf_type, args.bits_budget,
                     float_gguf=not args.no_float_gguf, save=save)
    print_table(rows, ["format", "quantize_s", "s_per_bweights", "peak_rss_gib", "peak_anon_gib", "bits", "out_gib",
                       "reload_s", "reload_rss_gib", "reload_over_size", "reload_above_base_over_size"],
                f"memboost quantize block by block: {args.model or args.config}")
    print_table(rows[1:], ["format", "text"], "8 tokens generated after the reload")
    if args.gguf_type:
        print_table(rows[1:], ["format", "gguf_s", "gguf_rss_gib", "gguf_anon_gib", "gguf_gib", "llama_cpp_s",
                               "llama_cpp_rss_gib", "llama_cpp_text", "gguf_error"],
                    f"GGUF export ({args.gguf_type}) and llama.cpp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
