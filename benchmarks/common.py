"""Shared helpers of the benchmark scripts: timing, tables, JSON output."""

import json
import os
import statistics
import time
from typing import Callable, List

import torch


def time_cpu(fn: Callable[[], object], min_time: float = 0.3, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_cuda_graph(fns: List[Callable[[], object]], replays: int = 20) -> float:
    """Seconds per call of a sequence of CUDA calls, captured once in a CUDA
    graph (no launch gaps) and replayed; the median over replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm up outside the graph (allocator, lazy init)
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    return statistics.median(times)


def copies_exceeding(nbytes_each: int, total: int, make: Callable[[], object], minimum: int = 1) -> list:
    """Enough copies (make()) of an object of nbytes_each to total `total` bytes:
    a round robin over them streams the weights from DRAM, as a model's forward does."""
    return [make() for _ in range(max(minimum, -(-total // nbytes_each)))]


def clone_quantized(q):
    return type(q)({k: v.clone() for k, v in q.tensors.items()}, q.meta)


def stream_time(fn: Callable[[object], object], objs: list) -> float:
    """Seconds per call of fn(obj) over a round robin of objs (median of 5 passes)."""
    return time_cpu(lambda: [fn(o) for o in objs], min_time=0.0, warmup=1) / len(objs)


def copy_bandwidth_cuda(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = time_cuda_graph([lambda: dst.copy_(src)], replays=10)
    return 2 * nbytes / t


def print_table(rows: List[dict], columns: List[str], title: str = "") -> None:
    if title:
        print(f"\n## {title}\n")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) + " |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "" if v is None else str(v)


def write_json(path: str, payload: dict) -> None:
    if path:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)  # never a half-written file in place of a good one
        print(f"\nwrote {path}")
