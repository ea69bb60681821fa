"""Instructions per call of memboost's layers and ops, counted by callgrind:
repeatable on a loaded machine, unlike wall time, so two versions of a
kernel or of the Python path around it can be compared anywhere.

    python benchmarks/callgrind_ops.py                      # the default table
    python benchmarks/callgrind_ops.py --configs mixed:192x576:1:exact nf4:576x576:8:act8

Each config is format:OUTxIN:batch:exact|act8 (format: mixed, ternary, nf4,
lort, int8, float). The script re-runs itself under valgrind with
instrumentation off until the measured calls (a tiny C helper, built with
the system compiler against valgrind/callgrind.h, switches collection on
around them and dumps one profile per config), so imports, quantization
and warm-up cost nothing. Instructions of every thread are counted. The
layer's forward is what is called (as a model calls it), under no_grad.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

HELPER_C = r"""
#include <valgrind/callgrind.h>
static int started = 0;
void mb_cg_start(void) {
  if (!started) { CALLGRIND_START_INSTRUMENTATION; started = 1; }
  CALLGRIND_ZERO_STATS;
  CALLGRIND_TOGGLE_COLLECT;
}
void mb_cg_stop(const char* name) {
  CALLGRIND_TOGGLE_COLLECT;
  CALLGRIND_DUMP_STATS_AT(name);
}
"""

DEFAULT_CONFIGS = [f"{fmt}:{shape}:{batch}:{mode}" for fmt in ("mixed", "ternary", "nf4", "lort")
                   for shape in ("192x576", "576x576") for batch in (1, 8) for mode in ("exact", "act8")]
DEFAULT_CONFIGS += [f"float:{shape}:{batch}:exact" for shape in ("192x576", "576x576") for batch in (1, 8)]


def make_layer(fmt: str, out_features: int, in_features: int, act_bits):
    import torch
    from memboost import nn as mnn

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    if fmt == "float":
        return linear
    if fmt == "mixed":
        return mnn.MixedLinear.from_linear(linear, ratio_4bit=0.5, act_bits=act_bits)
    if fmt == "ternary":
        return mnn.TernaryLinear.from_linear(linear, act_bits=act_bits)
    if fmt == "nf4":
        return mnn.NF4Linear.from_linear(linear, act_bits=act_bits)
    if fmt == "lort":
        return mnn.LoRTLinear.from_linear(linear, rank=16, iters=2, act_bits=act_bits)
    if fmt == "int8":
        return mnn.Int8Linear.from_linear(linear, act_bits=act_bits)
    raise SystemExit(f"unknown format {fmt!r}")


def measure(helper: str, configs, calls: int, threads: int) -> None:
    """Runs under valgrind: one dump per config."""
    import ctypes

    import torch

    torch.set_num_threads(threads)
    lib = ctypes.CDLL(helper)
    for config in configs:
        fmt, shape, batch, mode = config.split(":")
        out_features, in_features = (int(s) for s in shape.split("x"))
        layer = make_layer(fmt, out_features, in_features, 8 if mode == "act8" else None)
        x = torch.randn(int(batch), in_features)
        with torch.no_grad():
            for _ in range(3):
                layer(x)
            lib.mb_cg_start()
            for _ in range(calls):
                layer(x)
            lib.mb_cg_stop(config.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--_helper", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._helper:
        return measure(args._helper, args.configs, args.calls, args.threads)
    work = tempfile.mkdtemp(prefix="callgrind_ops_")
    helper = os.path.join(work, "cg_helper.so")
    src = os.path.join(work, "cg_helper.c")
    with open(src, "w") as f:
        f.write(HELPER_C)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", helper, src], check=True)
    out = os.path.join(work, "cg.out")
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
           f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__), "--_helper", helper,
           "--calls", str(args.calls), "--threads", str(args.threads), "--configs", *args.configs]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    rows = {}
    for path in glob.glob(out + ".*"):
        name = total = None
        with open(path) as f:
            for line in f:
                if line.startswith("desc: Trigger: Client Request: "):
                    name = line.split("Client Request: ", 1)[1].strip()
                elif line.startswith(("totals:", "summary:")):
                    total = int(line.split()[1])
        if name in args.configs and total is not None:
            rows[name] = total / args.calls
    print(f"{'config':32s} {'instructions/call':>18s}")
    for config in args.configs:
        print(f"{config:32s} {rows.get(config, float('nan')):18,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "threads": args.threads, "instructions_per_call": rows}, f, indent=1)


if __name__ == "__main__":
    main()
