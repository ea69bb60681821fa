"""Speed of the fused mixed 2/4/16-bit linear, as ratios against baselines
run in the same process.

CPU: fused op (exact float path, and the int8-activation path act_bits=8)
     vs torch.nn.functional.linear on the dequantized fp32 weight,
     with the weight cache-hot and streamed from DRAM (a round robin over
     copies larger than the last-level cache), and quantize time per million
     weights.
GPU: fused op vs cuBLAS fp16 (F.linear), many weight copies per CUDA graph so
     the working set exceeds the 50 MB L2; achieved bandwidth as a fraction of
     a measured device-to-device copy; fused outliers vs cuSPARSE outliers.

    python benchmarks/bench_mixed_speed.py [--device cpu|cuda] [--json out.json]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from common import copy_bandwidth_cuda, print_table, time_cpu, time_cuda_graph, write_json  # noqa: E402

PAPER_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def weight(out_f, in_f, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(out_f * 7 + in_f)
    return (torch.randn(out_f, in_f, generator=g) * 0.02).to(device=device, dtype=dtype)


def without_outliers(q):
    t = dict(q.tensors)
    t["outlier_rowptr"] = torch.zeros_like(t["outlier_rowptr"])
    t["outlier_cols"] = t["outlier_cols"][:0]
    t["outlier_vals"] = t["outlier_vals"][:0]
    return type(q)(t, q.meta)


def copies_exceeding(nbytes_each, total, make, minimum=1):
    """ceil(total / nbytes_each) objects from make(), at least `minimum`:
    one pass over them reads `total` bytes, so caches cannot hold them."""
    return [make() for _ in range(max(minimum, -(-total // nbytes_each)))]


def clone_quantized(q):
    return type(q)({k: v.clone() for k, v in q.tensors.items()}, q.meta)


def bench_cpu(args):
    """Two timings per case: 'hot', one weight called again and again (it
    stays in cache when small), and 'stream', a round robin over copies that
    together exceed the last-level cache 4 times, as in a model's forward
    where every layer's weight comes from DRAM."""
    rows = []
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    stream_bytes = args.llc_mib * 4 << 20
    shapes = PAPER_SHAPES[:2] + SMOLLM2_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for out_f, in_f in shapes:
        w = weight(out_f, in_f, "cpu", torch.float32)
        q = memboost.quantize(w, ratio_4bit=args.ratio)
        qtime = time_cpu(lambda: memboost.quantize(w, ratio_4bit=args.ratio), min_time=0.0, warmup=0)
        w_hat = memboost.dequantize(q)
        dense = copies_exceeding(w_hat.nbytes, stream_bytes, w_hat.clone)
        quant = copies_exceeding(q.nbytes, stream_bytes, lambda: clone_quantized(q))
        for batch in args.batches:  # 256: a prompt (prefill) or a perplexity window
            x = torch.randn(batch, in_f)
            t_fused = time_cpu(lambda: q.linear(x))
            t_dense = time_cpu(lambda: torch.nn.functional.linear(x, w_hat))
            s_fused = time_cpu(lambda: [qq.linear(x) for qq in quant]) / len(quant)
            s_int8 = time_cpu(lambda: [qq.linear(x, act_bits=8) for qq in quant]) / len(quant)
            s_dense = time_cpu(lambda: [torch.nn.functional.linear(x, ww) for ww in dense]) / len(dense)
            threads = torch.get_num_threads()
            rows.append({"shape": f"{out_f}x{in_f}", "batch": batch, "avg_bits": q.avg_bits,
                         "hot_fused_ms": t_fused * 1e3, "hot_fp32_ms": t_dense * 1e3, "hot_speedup": t_dense / t_fused,
                         "stream_fused_ms": s_fused * 1e3, "stream_fp32_ms": s_dense * 1e3,
                         "stream_speedup": s_dense / s_fused, "stream_int8_ms": s_int8 * 1e3,
                         "stream_int8_speedup": s_dense / s_int8,
                         "int8_Gweights_per_s_per_thread": w.numel() * batch / s_int8 / 1e9 / threads,
                         "int8_vs_exact_rel_err": float((q.linear(x, act_bits=8) - q.linear(x)).norm()
                                                        / q.linear(x).norm()),
                         "quantize_s_per_Mweight": qtime / (w.numel() / 1e6)})
        del dense, quant
    print_table(rows, ["shape", "batch", "avg_bits", "hot_fused_ms", "hot_fp32_ms", "hot_speedup", "stream_fused_ms",
                       "stream_fp32_ms", "stream_speedup", "stream_int8_ms", "stream_int8_speedup",
                       "int8_Gweights_per_s_per_thread", "int8_vs_exact_rel_err", "quantize_s_per_Mweight"],
                f"CPU ({torch.get_num_threads()} threads), ratio_4bit={args.ratio}: fused op vs F.linear on the "
                f"dequantized fp32 weight; 'stream' cycles through {args.llc_mib * 4} MiB of weight copies")
    return {"cpu": rows}


def bench_cuda(args):
    bw = copy_bandwidth_cuda()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"device: {props.name}, copy bandwidth {bw / 1e12:.3f} TB/s, L2 {l2 >> 20} MiB")
    rows, outlier_rows = [], []
    for out_f, in_f in PAPER_SHAPES + SMOLLM2_SHAPES:
        w = weight(out_f, in_f, "cuda", torch.float16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        q = memboost.quantize(w, ratio_4bit=args.ratio)
        torch.cuda.synchronize()
        qtime = time.perf_counter() - t0
        # Enough copies that one pass over them is 4x the L2: every call reads HBM.
        dense = copies_exceeding(w.numel() * 2, 4 * l2, w.clone, minimum=2)
        quant = copies_exceeding(q.nbytes, 4 * l2, lambda: clone_quantized(q), minimum=2)
        for batch in (1, 8, 32):
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            t_q = time_cuda_graph([lambda qq=qq: qq.linear(x) for qq in quant])
            t_d = time_cuda_graph([lambda ww=ww: torch.nn.functional.linear(x, ww) for ww in dense])
            moved = q.nbytes + x.numel() * 2 + batch * out_f * 2
            rows.append({"shape": f"{out_f}x{in_f}", "batch": batch, "avg_bits": q.avg_bits,
                         "fused_us": t_q * 1e6, "cublas_fp16_us": t_d * 1e6, "speedup_vs_fp16": t_d / t_q,
                         "fused_GBps": moved / t_q / 1e9, "frac_of_copy_bw": moved / t_q / bw,
                         "quantize_s_per_Mweight": qtime / (w.numel() / 1e6)})
        # Outliers: fused in the GEMV vs the GEMV without them + a cuSPARSE CSR SpMV.
        if out_f >= 4096:
            try:
                outlier_rows.append(bench_outlier_paths(quant, out_f, in_f))
            except RuntimeError as exc:  # report, and keep the main table
                outlier_rows.append({"shape": f"{out_f}x{in_f}", "outliers": q.num_outliers,
                                     "cusparse_us": f"failed: {exc}"[:60]})
    print_table(rows, ["shape", "batch", "avg_bits", "fused_us", "cublas_fp16_us", "speedup_vs_fp16", "fused_GBps",
                       "frac_of_copy_bw", "quantize_s_per_Mweight"],
                f"CUDA {props.name}, ratio_4bit={args.ratio}, L2 exceeded, CUDA graphs")
    print_table(outlier_rows, ["shape", "outliers", "no_outliers_us", "fused_us", "cusparse_us"],
                "Outliers at batch 1: fused into the GEMV vs a separate cuSPARSE SpMV")
    return {"device": props.name, "copy_bandwidth_Bps": bw, "cuda": rows, "outliers": outlier_rows}


def bench_outlier_paths(quant, out_f, in_f):
    """Outliers fused into the GEMV, vs the GEMV without them plus a cuSPARSE CSR SpMV."""
    x = torch.randn(1, in_f, device="cuda", dtype=torch.float16)
    bare = [without_outliers(q) for q in quant]
    csr = [torch.sparse_csr_tensor(q.tensors["outlier_rowptr"].long(), q.tensors["outlier_cols"].long() & 0xFFFF,
                                   q.tensors["outlier_vals"].float(), size=(out_f, in_f)) for q in quant]
    xt = x.float().T.contiguous()
    t_fused = time_cuda_graph([lambda q=q: q.linear(x) for q in quant])
    t_bare = time_cuda_graph([lambda q=q: q.linear(x) for q in bare])
    t_split = time_cuda_graph([lambda q=q, s=s: q.linear(x) + (s @ xt).T.half() for q, s in zip(bare, csr)])
    return {"shape": f"{out_f}x{in_f}", "outliers": quant[0].num_outliers, "no_outliers_us": t_bare * 1e6,
            "fused_us": t_fused * 1e6, "cusparse_us": t_split * 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ratio", type=float, default=0.1, help="ratio_4bit of the quantized weights")
    ap.add_argument("--llc-mib", type=int, default=32, help="CPU last-level cache size; 'stream' uses 4x this")
    ap.add_argument("--shapes", default="", help="CPU: comma-separated OUTxIN shapes instead of the default set")
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8, 256],
                    help="CPU: comma-separated activation rows (default 1,8,256)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    result = {"ratio_4bit": args.ratio, "torch": torch.__version__, "build": memboost.build_info()}
    result.update(bench_cuda(args) if args.device == "cuda" else bench_cpu(args))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
