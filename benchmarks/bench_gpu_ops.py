"""GPU throughput of memboost's CUDA ops against a device-to-device copy.

For each format (mixed 2/4-bit, ternary, NF4) and weight shape: the fused
linear at batch 1 and 8 (fp16 activations) and the dequantize op, timed in
CUDA graphs over enough copies of the weight that every call reads HBM (4x
the L2). Bytes moved = the quantized weight + activations + output (for
dequantize: the weight read + the fp16 weight written); bytes/s is compared
with torch's device-to-device copy (bytes read + written), the ceiling of a
memory-bound kernel. cuBLAS fp16 on the dense weight is the reference row.

    python benchmarks/bench_gpu_ops.py [--shapes 4096x4096,11008x4096] [--json out.json]

No GPU has run this yet (written without one); tools/gpu_check.py runs it.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
import memboost.formats.nf4 as nf4  # noqa: E402
from common import clone_quantized, copies_exceeding, copy_bandwidth_cuda, print_table, time_cuda_graph, write_json  # noqa: E402,E501

COLUMNS = ["format", "op", "shape", "batch", "avg_bits", "us", "GBps", "frac_of_copy_bw"]


def quantizers():
    return {
        "mixed": lambda w: memboost.quantize(w, ratio_4bit=0.1),
        "ternary": lambda w: memboost.ternary.quantize(w, group_size=256),
        "nf4": lambda w: nf4.quantize(w, 64, True),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_ops: no CUDA device (this benchmark measures the GPU kernels)")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth_cuda()
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02).half()
        dense = copies_exceeding(w.numel() * 2, 4 * l2, w.clone, minimum=2)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            t = time_cuda_graph([lambda ww=ww: torch.nn.functional.linear(x, ww) for ww in dense])
            moved = w.numel() * 2 + x.numel() * 2 + batch * out_f * 2
            rows.append({"format": "fp16", "op": "cuBLAS linear", "shape": shape, "batch": batch, "avg_bits": 16.0,
                         "us": t * 1e6, "GBps": moved / t / 1e9, "frac_of_copy_bw": moved / t / bw})
        del dense
        for name, quantize in quantizers().items():
            q = quantize(w)
            quant = copies_exceeding(q.nbytes, 4 * l2, lambda: clone_quantized(q), minimum=2)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                t = time_cuda_graph([lambda qq=qq: qq.linear(x) for qq in quant])
                moved = q.nbytes + x.numel() * 2 + batch * out_f * 2
                rows.append({"format": name, "op": "linear", "shape": shape, "batch": batch, "avg_bits": q.avg_bits,
                             "us": t * 1e6, "GBps": moved / t / 1e9, "frac_of_copy_bw": moved / t / bw})
            t = time_cuda_graph([lambda qq=qq: qq.dequantize() for qq in quant])
            moved = q.nbytes + w.numel() * 2
            rows.append({"format": name, "op": "dequantize", "shape": shape, "batch": None, "avg_bits": q.avg_bits,
                         "us": t * 1e6, "GBps": moved / t / 1e9, "frac_of_copy_bw": moved / t / bw})
            del quant
    print_table(rows, COLUMNS, f"CUDA {props.name}: device-to-device copy {bw / 1e9:.0f} GB/s, L2 exceeded, "
                               "CUDA graphs")
    write_json(args.json, {"device": props.name, "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
