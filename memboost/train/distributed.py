"""A DDP communication hook that all-reduces count sketches of the gradient
buckets instead of the buckets themselves.

    from memboost.train.distributed import VSAHookState, vsa_hook
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(VSAHookState(process_group=None, ratio=0.1, seed=0), vsa_hook)

Per bucket of n gradient values each rank sends k = ceil(ratio * n) float32
values. The shape follows torch's PowerSGD hook (a state object and a
hook(state, bucket) returning a Future); the method is memboost.vsa's count
sketch with error feedback.
"""

import struct
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..errors import MemboostError, MemboostTypeError
from .vsa import (_check_ratio, _check_seed, count_sketch, count_unsketch, derive_seed, error_feedback_scale,
                  sketch_size)

__all__ = ["VSAHookState", "vsa_hook"]


class VSAHookState:
    """State of vsa_hook, one per DDP model; every rank must build it with the
    same arguments (checked in the first step).

    process_group: the group to all-reduce over (None: the default group).
    ratio: sketch size per bucket as a fraction of the bucket, in (0, 1].
    seed: the hashes of bucket b in step t use derive_seed(seed, t, b), so they
        change every step (fresh collisions) and agree on all ranks.
    min_compress_numel: buckets with fewer values are all-reduced as they are:
        the sketch would save a few kilobytes at most and its hashing has a
        fixed cost per call. So are buckets whose sketch would not be smaller
        (ratio 1, or tiny buckets), with no error feedback needed.

    step counts finished iterations (advanced when DDP hands over its last
    bucket, as every rank does in lockstep); residuals holds each bucket's
    error-feedback residual (this rank's; float32, float64 for float64 buckets).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, ratio: float = 0.1, seed: int = 0,
                 min_compress_numel: int = 1024):
        self.process_group = process_group
        self.ratio = _check_ratio(ratio)
        self.seed = _check_seed(seed)
        if isinstance(min_compress_numel, bool) or not isinstance(min_compress_numel, int) or min_compress_numel < 0:
            raise MemboostError(f"'min_compress_numel' must be an int >= 0, got {min_compress_numel!r}")
        self.min_compress_numel = min_compress_numel
        self.step = 0
        self.residuals: Dict[int, torch.Tensor] = {}


# Steps in which every bucket is checked: the first, and the second, in which
# DDP uses the buckets it rebuilt after the first iteration.
_CHECKED_STEPS = 2


def _check_ranks_agree(state: VSAHookState, group, bucket_index: int, numel: int, device: torch.device) -> None:
    """One blocking all-gather of what every rank must share. Every rank sees
    the same table, so all of them raise together instead of some going on
    into an all-reduce of mismatched sizes."""
    ratio_bits = struct.unpack("<q", struct.pack("<d", state.ratio))[0]
    seed_signed = state.seed - (1 << 64) if state.seed >> 63 else state.seed
    mine = torch.tensor([seed_signed, ratio_bits, numel, state.min_compress_numel], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(group.size())]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()  # [rank][field]
    fields = [("seed", lambda v: v & ((1 << 64) - 1)),
              ("ratio", lambda v: struct.unpack("<d", struct.pack("<q", v))[0]),
              ("bucket size", int),
              ("min_compress_numel", int)]
    for column, (argument, decode) in enumerate(fields):
        per_rank = [decode(row[column]) for row in table]
        if len(set(per_rank)) > 1:
            hint = ("the ranks' models or DDP bucket_cap_mb differ" if argument == "bucket size"
                    else f"build VSAHookState with the same '{argument}' on every rank")
            raise MemboostError(f"vsa_hook: ranks disagree on '{argument}' of bucket {bucket_index} "
                                f"(by rank: {per_rank}): {hint}")


def vsa_hook(state: VSAHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket's gradients through a count
    sketch with error feedback.

    For bucket b in step t, on each rank: x = bucket + residual_b; all-reduce
    (sum) the sketch count_sketch(x, ratio, derive_seed(seed, t, b)), divide
    by the world size; the bucket becomes gamma * count_unsketch(average)
    (gamma = memboost.vsa.error_feedback_scale, which makes error feedback
    stable); residual_b = x - that. The sketch is linear, so the average of
    the ranks' sketches is the sketch of the average gradient, and the mean
    of the ranks' residuals is exactly what the update missed.

    In the first two steps (DDP rebuilds its buckets after the first), one
    extra small blocking all-gather per bucket checks that every rank has the
    same seed, ratio, min_compress_numel and bucket size, and raises a
    MemboostError on every rank if not. A bucket whose size changed starts
    again from a zero residual.
    """
    if not isinstance(state, VSAHookState):
        raise MemboostTypeError(f"'state' must be a VSAHookState, got {type(state).__name__}")
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = group.size()
    buffer = bucket.buffer()
    index = bucket.index()
    numel = buffer.numel()

    if state.step < _CHECKED_STEPS:
        _check_ranks_agree(state, group, index, numel, buffer.device)
    residual = state.residuals.get(index)
    if residual is not None and residual.numel() != numel:  # DDP rebuilt its buckets
        del state.residuals[index]
        residual = None

    step = state.step
    if bucket.is_last():
        state.step += 1

    if numel < state.min_compress_numel or sketch_size(numel, state.ratio) >= numel:
        buffer.div_(world_size)
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])

    seed = derive_seed(state.seed, step, index)
    x = buffer.to(torch.float64 if buffer.dtype == torch.float64 else torch.float32, copy=True)
    if residual is not None:
        x += residual
    sketch = count_sketch(x, state.ratio, seed)

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        average = fut.value()[0].div_(world_size)
        update = count_unsketch(average, numel, state.ratio, seed)
        update *= error_feedback_scale(numel, state.ratio)
        state.residuals[index] = x.sub_(update)
        buffer.copy_(update)
        return buffer

    return dist.all_reduce(sketch, group=group, async_op=True).get_future().then(decompress)
