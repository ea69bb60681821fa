"""Seconds per fit of one ternary alpha to a whole matrix (LoRT's solver,
memboost.formats.lort.best_ternary_fit with per_row=False): sorting every
|r| against the binned fit that best_ternary_fit uses above 2^22 weights
(the same support and alpha; tests/test_lort.py). The shapes are an 8B
Llama's (hidden 4096, MLP 14336) and SmolLM2's MLP.

    python benchmarks/bench_ternary_fit.py --json benchmarks/results/ternary_fit_cpu.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, time_cpu, write_json  # noqa: E402

from memboost.formats import lort  # noqa: E402

SHAPES = ((14336, 4096), (4096, 4096), (1536, 576))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n, k in SHAPES:
        r = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        sorted_s = time_cpu(lambda: lort._sorted_ternary_fit(r, False), min_time=0.0, warmup=1)
        binned_s = time_cpu(lambda: lort._binned_ternary_fit(r), min_time=0.0, warmup=1)
        rows.append({"shape": f"{n}x{k}", "weights_M": n * k / 1e6, "sorted_s": sorted_s, "binned_s": binned_s,
                     "speedup": sorted_s / binned_s})
    print_table(rows, ["shape", "weights_M", "sorted_s", "binned_s", "speedup"],
                f"one alpha fitted to a matrix, {args.threads} threads (median of 5)")
    write_json(args.json, {"threads": args.threads, "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
