"""Running a quantizer's per-chunk work on all cores without per-op barriers.

A quantizer that launches many small ATen ops with intra-op parallelism
waits at a barrier after each op; when another process holds a core (a
shared machine, a notebook beside other work) every barrier waits for a time
slice, and quantizing a 4096x4096 weight went from 0.6 s to 3-25 s. Giving
each worker thread whole chunks of rows with single-threaded ops has no
barrier between ops: each worker runs at its own pace.
"""

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def _single_threaded_ops():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def map_chunks(fn: Callable[..., T], chunks: Sequence, device: torch.device) -> List[T]:
    """[fn(c) for c in chunks], spread over torch.get_num_threads() worker
    threads with single-threaded ops on the CPU (ATen releases the GIL);
    in order, on the calling thread, on other devices."""
    workers = min(torch.get_num_threads(), len(chunks))
    if torch.device(device).type != "cpu" or workers <= 1:
        return [fn(c) for c in chunks]
    with _single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, chunks))


def row_chunk_size(rows: int, cols: int, max_elements: int = 1 << 19, min_chunks: int = 4) -> int:
    """Rows per chunk: at most max_elements weights, and enough chunks to share out."""
    return max(1, min(max_elements // max(cols, 1), -(-rows // min_chunks)))
