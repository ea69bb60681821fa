"""Per-call cost of every *_linear op on SmolLM2-135M's shapes, the table of
issue 23: µs per call of each quantized layer's forward (as a model calls
it, under inference_mode) and of F.linear on the float32 weight, with hot
weights (one layer called again and again: its weights stay in cache) and
streamed weights (a round robin over copies totalling 4x the last-level
cache, as a decode step reads every layer once), batch 1 and 8.

Each streamed row also shows the weight-reading floor (the layer's bytes at
the read bandwidth this script measures, the better of a probe before and
one after the rows) and the call's time above it:
the fixed cost of a call is what remains when the weights are hot or the
floor is subtracted. `streamed_us` (and `over_floor_us`) time the call the
decode loop makes on each copy (its bound op); `streamed_forward_us` the
module's forward, with its Python, on the same copies. `bound_hot_us` is
the call the decode loop makes (the op with the weight bound,
QuantizedLinear.linear_bound; F.linear for float32), hot. Goals (issue 23): at most 5 µs above the floor, and
every shape at least as fast as float32 F.linear with hot weights.

    python benchmarks/bench_ops.py [--threads 2] [--json benchmarks/results/ops_cpu.json]
    python benchmarks/bench_ops.py --shapes 192x576 --batches 1 --formats mixed --min-time 0.01   # a quick check
"""

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memboost import nn as mnn  # noqa: E402
from common import clone_quantized, copies_exceeding, print_table, time_cpu, write_json  # noqa: E402

SMOLLM2_SHAPES = ["576x576", "192x576", "1536x576", "576x1536", "49152x576"]  # out x in; the last is lm_head
FORMATS = {
    "mixed": lambda lin, act: mnn.MixedLinear.from_linear(lin, ratio_4bit=0.5, act_bits=act),
    "ternary": lambda lin, act: mnn.TernaryLinear.from_linear(lin, act_bits=act),
    "nf4": lambda lin, act: mnn.NF4Linear.from_linear(lin, act_bits=act),
    "lort": lambda lin, act: mnn.LoRTLinear.from_linear(lin, iters=1, act_bits=act),
}


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) << (20 if text.endswith("M") else 10)
    except (OSError, ValueError):
        return 32 << 20


def read_bandwidth(nbytes: int) -> float:
    """Bytes/s a sum over a buffer larger than the cache reads (all threads)."""
    buf = torch.ones(nbytes // 4)
    return nbytes / time_cpu(lambda: buf.sum(), min_time=0.3)


def set_floors(rows: list, bandwidth: float) -> None:
    for r in rows:
        r["floor_us"] = r["weight_KiB"] * 1024 / bandwidth * 1e6
        r["over_floor_us"] = r["streamed_us"] - r["floor_us"]


def layer_bytes(layer) -> int:
    if isinstance(layer, torch.nn.Linear):
        return layer.weight.nbytes
    return layer.weight.tensor().nbytes


def copy_layer(layer):
    if isinstance(layer, torch.nn.Linear):
        new = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        new.weight.data.copy_(layer.weight.data)
        return new
    return type(layer).from_quantized(clone_quantized(layer.weight.tensor()), act_bits=layer.act_bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=SMOLLM2_SHAPES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per hot measurement")
    parser.add_argument("--llc-mib", type=int, default=None, help="last-level cache (default: read from sysfs)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "ops_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stream_bytes = 4 * ((args.llc_mib << 20) if args.llc_mib else llc_bytes())
    probe_bytes = max(stream_bytes, 64 << 20)
    bandwidth_before = read_bandwidth(probe_bytes)
    rows = []
    with torch.inference_mode():
        for shape in args.shapes:
            out_f, in_f = (int(s) for s in shape.split("x"))
            torch.manual_seed(out_f * 7 + in_f)
            linear = torch.nn.Linear(in_f, out_f, bias=False)
            linear.weight.data.mul_(0.02 / linear.weight.data.std())
            layers = [("float32 F.linear", "", linear)]
            for fmt in args.formats:
                for act in (None, 8):
                    with torch.inference_mode(False):
                        layers.append((fmt, "exact" if act is None else "act8", FORMATS[fmt](linear, act)))
            for name, mode, layer in layers:
                nbytes = layer_bytes(layer)
                copies = copies_exceeding(nbytes, stream_bytes, lambda: copy_layer(layer))
                for batch in args.batches:
                    x = torch.randn(batch, in_f)
                    hot = time_cpu(lambda: layer(x), min_time=args.min_time)
                    # what the decode loop calls: the op with the weight bound (F.linear itself for float32)
                    call = (functools.partial(F.linear, weight=layer.weight)
                            if isinstance(layer, torch.nn.Linear) else layer.linear_bound(x.dtype))
                    bound = time_cpu(lambda: call(x), min_time=args.min_time)
                    streamed_forward = time_cpu(lambda: [c(x) for c in copies], min_time=0.0, warmup=1) / len(copies)
                    # the decode loop's calls over streamed weights: each copy's bound op
                    calls = ([functools.partial(F.linear, weight=c.weight) for c in copies]
                             if isinstance(layer, torch.nn.Linear) else [c.linear_bound(x.dtype) for c in copies])
                    streamed = time_cpu(lambda: [c(x) for c in calls], min_time=0.0, warmup=1) / len(copies)
                    del calls
                    rows.append({"shape": shape, "format": name, "mode": mode, "batch": batch, "weight_KiB": nbytes / 1024,
                                 "hot_us": hot * 1e6, "bound_hot_us": bound * 1e6, "streamed_us": streamed * 1e6,
                                 "streamed_forward_us": streamed_forward * 1e6})
                del copies
    # The floor reads at the better of two probes, before and after the rows:
    # this shared host's bandwidth dips for minutes at a time (one probe read
    # 18 GB/s where the run before read 45), and the floor is what the memory
    # can deliver, not what it did at one moment.
    bandwidth_after = read_bandwidth(probe_bytes)
    bandwidth = max(bandwidth_before, bandwidth_after)
    set_floors(rows, bandwidth)
    print(f"{args.threads} threads, streaming over {stream_bytes >> 20} MiB, read bandwidth "
          f"{bandwidth_before / 1e9:.1f} GB/s before the rows, {bandwidth_after / 1e9:.1f} after")
    baseline = {(r["shape"], r["batch"]): r["hot_us"] for r in rows if r["format"] == "float32 F.linear"}
    bound_baseline = {(r["shape"], r["batch"]): r["bound_hot_us"] for r in rows if r["format"] == "float32 F.linear"}
    for r in rows:
        r["hot_vs_float32"] = baseline[(r["shape"], r["batch"])] / r["hot_us"]
        r["bound_vs_float32"] = bound_baseline[(r["shape"], r["batch"])] / r["bound_hot_us"]
    print_table(rows, ["shape", "format", "mode", "batch", "weight_KiB", "hot_us", "hot_vs_float32", "bound_hot_us",
                       "bound_vs_float32", "streamed_forward_us", "streamed_us", "floor_us", "over_floor_us"],
                f"µs per call, {args.threads} threads (hot_vs_float32 > 1: faster than F.linear on float32)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, {"threads": args.threads, "stream_bytes": stream_bytes, "read_bandwidth_Bps": bandwidth,
                           "read_bandwidth_probes_Bps": [bandwidth_before, bandwidth_after],
                           "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
