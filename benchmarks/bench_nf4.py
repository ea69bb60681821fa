"""NF4 on the CPU: fused nf4_linear vs F.linear on the float32 weight and vs
bitsandbytes' own NF4 matmul (bnb.matmul_4bit) on the same weights, all in
one process, weights streamed from DRAM (a round robin over copies that
together exceed the last-level cache 4 times, as a model's forward reads
every layer once); quantize throughput vs bitsandbytes' quantize_4bit; and
the stored bits per weight.

    python benchmarks/bench_nf4.py [--json benchmarks/results/nf4_cpu.json] [--quick]
"""

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost.formats.nf4 as nf4  # noqa: E402
from common import print_table, time_cpu, write_json  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def weight(out_f, in_f):
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    return torch.randn(out_f, in_f, generator=g) * 0.02


def round_robin(fns):
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call


def copies(nbytes_each, total):
    return max(2, -(-total // nbytes_each))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="")
    parser.add_argument("--llc-mib", type=int, default=32, help="last-level cache size (this machine: 32 MiB)")
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, batch 1 and 8")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    stream = args.llc_mib * 4 << 20
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    batches = (1, 8) if args.quick else (1, 8, 64)
    rows = []
    for n, k in shapes:
        w = weight(n, k)
        q = nf4.quantize(w)
        n_q = copies(q.nbytes, stream)
        qs = [nf4.NF4QuantizedTensor._wrap({kk: v.clone() for kk, v in q.tensors.items()}, q.meta)
              for _ in range(n_q)]
        ws = [w.clone() for _ in range(copies(w.numel() * 4, stream))]
        packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        bnbs = [(packed.clone(), st) for _ in range(n_q)]
        for m in batches:
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)  # bitsandbytes' CPU NF4 kernel computes in bf16
            with torch.inference_mode():
                t_exact = time_cpu(round_robin([lambda qq=qq: qq.linear(x) for qq in qs]))
                t_int8 = time_cpu(round_robin([lambda qq=qq: qq.linear(x, act_bits=8) for qq in qs]))
                t_fp32 = time_cpu(round_robin([lambda ww=ww: torch.nn.functional.linear(x, ww) for ww in ws]))
                t_bnb = time_cpu(round_robin([lambda p=p, s=s: bnb.matmul_4bit(xb, p.t(), quant_state=s)
                                              for p, s in bnbs]), min_time=0.2)
            rows.append({"shape": f"{n}x{k}", "batch": m, "nf4 exact ms": t_exact * 1e3, "nf4 int8 ms": t_int8 * 1e3,
                         "fp32 ms": t_fp32 * 1e3, "bnb nf4 ms": t_bnb * 1e3,
                         "exact vs fp32": t_fp32 / t_exact, "int8 vs fp32": t_fp32 / t_int8,
                         "exact vs bnb": t_bnb / t_exact, "int8 vs bnb": t_bnb / t_int8})
            print(rows[-1], flush=True)
    speed_cols = ["shape", "batch", "nf4 exact ms", "nf4 int8 ms", "fp32 ms", "bnb nf4 ms", "exact vs fp32",
                  "int8 vs fp32", "exact vs bnb", "int8 vs bnb"]
    print_table(rows, speed_cols, "nf4_linear, weights streamed from DRAM (ratios: times faster)")

    quant_rows = []
    for n, k in shapes:
        w = weight(n, k)
        for dq in (False, True):
            t_ours = time_cpu(lambda: nf4.quantize(w, 64, dq), min_time=0.5, warmup=1)
            t_bnb = time_cpu(lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4"),
                             min_time=0.5, warmup=1)
            q = nf4.quantize(w, 64, dq)
            quant_rows.append({"shape": f"{n}x{k}", "double_quant": dq, "memboost Mweights/s": w.numel() / t_ours / 1e6,
                               "bnb Mweights/s": w.numel() / t_bnb / 1e6, "speed-up": t_bnb / t_ours,
                               "bits/weight": q.avg_bits})
    print_table(quant_rows, ["shape", "double_quant", "memboost Mweights/s", "bnb Mweights/s", "speed-up",
                             "bits/weight"], "Quantize throughput and stored size")
    write_json(args.json, {"machine": {"threads": torch.get_num_threads(), "llc_mib": args.llc_mib},
                           "linear": rows, "quantize": quant_rows})
    if args.json:
        md = os.path.splitext(args.json)[0] + ".md"
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_table(rows, speed_cols, "nf4_linear, weights streamed from DRAM (ratios: times faster)")
            print_table(quant_rows, ["shape", "double_quant", "memboost Mweights/s", "bnb Mweights/s", "speed-up",
                                     "bits/weight"], "Quantize throughput and stored size")
        with open(md, "w") as f:
            f.write(f"# NF4 on the CPU ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads)\n"
                    f"\n`python benchmarks/bench_nf4.py --json {args.json}`\n" + buf.getvalue())


if __name__ == "__main__":
    main()
