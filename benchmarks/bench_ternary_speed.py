"""Speed of the fused ternary linear (BitNet b1.58 weights), as ratios against
F.linear on the float32 weight run in the same process.

CPU: ternary_linear with int8 activations (act_bits=8, W1.58A8: integer
     kernels, the best instruction set this CPU has) and the exact float path
     (act_bits=None) vs F.linear on the dequantized float32 weight, every
     weight streamed from DRAM (a round robin over copies totalling 4x the
     last-level cache, as a model's forward reads every layer), batch 1, 8 and
     64; G weights/s per thread; then batch 1 at 4096x4096 under each forced
     instruction set (MEMBOOST_CPU_ISA), on 1 thread, hot and streamed.
GPU: the same ops vs cuBLAS fp16, weights exceeding the L2, CUDA graphs.

    python benchmarks/bench_ternary_speed.py [--device cpu|cuda] [--json out.json]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
import memboost.formats.ternary as ternary  # noqa: E402
from common import clone_quantized, copies_exceeding, print_table, stream_time, time_cpu, time_cuda_graph, write_json  # noqa: E402,E501

PAPER_SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in)
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
ISAS = ("portable", "avx2", "avx512")


def weight(out_f, in_f, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(out_f * 7 + in_f)
    return (torch.randn(out_f, in_f, generator=g) * 0.02).to(device=device, dtype=dtype)


def bench_cpu(args):
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    stream_bytes = args.llc_mib * 4 << 20
    rows = []
    for out_f, in_f in PAPER_SHAPES + SMOLLM2_SHAPES:
        q = ternary.quantize(weight(out_f, in_f, "cpu", torch.float32))
        w_hat = q.dequantize()
        dense = copies_exceeding(w_hat.nbytes, stream_bytes, w_hat.clone)
        quant = copies_exceeding(q.nbytes, stream_bytes, lambda: clone_quantized(q))
        for batch in (1, 8, 64):
            x = torch.randn(batch, in_f)
            t_int8 = stream_time(lambda qq: qq.linear(x, act_bits=8), quant)
            t_exact = stream_time(lambda qq: qq.linear(x), quant)
            t_fp32 = stream_time(lambda ww: torch.nn.functional.linear(x, ww), dense)
            rows.append({"shape": f"{out_f}x{in_f}", "batch": batch, "avg_bits": q.avg_bits,
                         "int8_ms": t_int8 * 1e3, "exact_ms": t_exact * 1e3, "fp32_ms": t_fp32 * 1e3,
                         "int8_speedup": t_fp32 / t_int8, "exact_speedup": t_fp32 / t_exact,
                         "int8_vs_exact": t_exact / t_int8,
                         "int8_Gw_per_s_per_thread": out_f * in_f / t_int8 / 1e9 / threads})
        del dense, quant
    print_table(rows, ["shape", "batch", "avg_bits", "int8_ms", "exact_ms", "fp32_ms", "int8_speedup", "exact_speedup",
                       "int8_vs_exact", "int8_Gw_per_s_per_thread"],
                f"CPU ({threads} threads): ternary_linear (int8 activations / exact float) vs F.linear on the "
                f"float32 weight, weights streamed from {args.llc_mib * 4} MiB of copies")

    # Each instruction set, batch 1, 4096x4096, one thread: per-thread throughput.
    torch.set_num_threads(1)
    out_f = in_f = 4096
    q = ternary.quantize(weight(out_f, in_f, "cpu", torch.float32))
    quant = copies_exceeding(q.nbytes, stream_bytes, lambda: clone_quantized(q))
    w_hat = q.dequantize()
    dense = copies_exceeding(w_hat.nbytes, stream_bytes, w_hat.clone)
    x = torch.randn(1, in_f)
    t_fp32 = stream_time(lambda ww: torch.nn.functional.linear(x, ww), dense)
    isa_rows = []
    saved = os.environ.get("MEMBOOST_CPU_ISA")
    try:
        for isa in ISAS:
            os.environ["MEMBOOST_CPU_ISA"] = isa
            for act_bits in (8, None):
                hot = time_cpu(lambda: q.linear(x, act_bits=act_bits))
                st = stream_time(lambda qq: qq.linear(x, act_bits=act_bits), quant)
                isa_rows.append({"isa": isa, "activations": "int8" if act_bits else "float (exact)",
                                 "hot_ms": hot * 1e3, "stream_ms": st * 1e3,
                                 "hot_Gw_per_s": out_f * in_f / hot / 1e9, "stream_Gw_per_s": out_f * in_f / st / 1e9,
                                 "stream_speedup_vs_fp32": t_fp32 / st})
    finally:
        if saved is None:
            os.environ.pop("MEMBOOST_CPU_ISA", None)
        else:
            os.environ["MEMBOOST_CPU_ISA"] = saved
    print_table(isa_rows, ["isa", "activations", "hot_ms", "stream_ms", "hot_Gw_per_s", "stream_Gw_per_s",
                           "stream_speedup_vs_fp32"],
                f"4096x4096, batch 1, 1 thread, forced MEMBOOST_CPU_ISA (fp32 F.linear streamed: {t_fp32 * 1e3:.3f} ms)")
    torch.set_num_threads(threads)
    return {"threads": threads, "cpu": rows, "isa_1thread_4096": isa_rows, "fp32_1thread_4096_ms": t_fp32 * 1e3}


def bench_cuda(args):
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    rows = []
    for out_f, in_f in PAPER_SHAPES + SMOLLM2_SHAPES:
        w = weight(out_f, in_f, "cuda", torch.float16)
        q = ternary.quantize(w)
        dense = copies_exceeding(w.numel() * 2, 4 * l2, w.clone, minimum=2)
        quant = copies_exceeding(q.nbytes, 4 * l2, lambda: clone_quantized(q), minimum=2)
        for batch in (1, 8, 64):
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            t_int8 = time_cuda_graph([lambda qq=qq: qq.linear(x, act_bits=8) for qq in quant])
            t_exact = time_cuda_graph([lambda qq=qq: qq.linear(x) for qq in quant])
            t_d = time_cuda_graph([lambda ww=ww: torch.nn.functional.linear(x, ww) for ww in dense])
            rows.append({"shape": f"{out_f}x{in_f}", "batch": batch, "exact_us": t_exact * 1e6,
                         "int8_us": t_int8 * 1e6, "cublas_fp16_us": t_d * 1e6,
                         "exact_speedup": t_d / t_exact, "int8_speedup": t_d / t_int8})
    print_table(rows, ["shape", "batch", "exact_us", "int8_us", "cublas_fp16_us", "exact_speedup", "int8_speedup"],
                f"CUDA {props.name}: ternary_linear vs cuBLAS fp16, L2 exceeded, CUDA graphs")
    return {"device": props.name, "cuda": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--llc-mib", type=int, default=32, help="CPU last-level cache size; 'stream' uses 4x this")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    result = {"torch": torch.__version__, "build": memboost.build_info()}
    result.update(bench_cuda(args) if args.device == "cuda" else bench_cpu(args))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
