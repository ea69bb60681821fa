"""Gradient compression in DDP: memboost's count-sketch hook against no
compression and torch's PowerSGD hook, plus count-sketch throughput.

Training: the same MLP regression (32 -> 256 -> 256 -> 256 -> 1, 140 k
parameters, one DDP bucket) trained with plain SGD by two gloo processes on
127.0.0.1 (one thread each), the same initial weights, batches and step
count for every method. Each rank draws its own batches. "bytes/step" is the
payload each rank hands to all-reduce (and all-gather) in a steady-state
step, counted by wrapping torch.distributed's collectives; with two ranks a
ring all-reduce sends exactly that much per rank. PowerSGD's rank is chosen
so that its bytes come closest to the count sketch's at the same ratio (its
bias vectors and the 1x256 output layer go uncompressed). "final loss" is
the MSE on 2048 held-out inputs (the target's variance is 0.40).

Throughput: count_sketch / count_unsketch of --sketch-numel float32 values
in this process (all cores), median of 3, next to one elementwise pass
(g + 1) over the same values as a yardstick.

    python benchmarks/bench_gradient_sketch.py [--steps 1000] [--lr 0.1] [--json out.json]
"""

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

WORLD_SIZE = 2
LAYERS = [32, 256, 256, 256, 1]


def make_model():
    torch.manual_seed(0)
    mods = []
    for i, (a, b) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(LAYERS) - 2:
            mods.append(torch.nn.Tanh())
    return torch.nn.Sequential(*mods)


def teacher(x):
    """(sin(x.w1) + sin(x.w2)) / sqrt(2) with fixed random unit-scale w1, w2."""
    w = torch.randn(LAYERS[0], 2, generator=torch.Generator().manual_seed(123)) / math.sqrt(LAYERS[0])
    return torch.sin(x @ w).sum(1, keepdim=True) / math.sqrt(2)


def powersgd_rank_for(budget_floats):
    """The PowerSGD rank whose payload comes closest to budget_floats: per
    weight [out, in] it sends (out + in) * rank floats when that is at most
    half the matrix (PowerSGD's min_compression_rate=2), else the matrix;
    biases go uncompressed."""
    def floats(rank):
        total = 0
        for a, b in zip(LAYERS[:-1], LAYERS[1:]):
            total += b  # bias
            total += (a + b) * rank if (a + b) * rank * 2 <= a * b else a * b
        return total
    return min(range(1, 65), key=lambda r: abs(floats(r) - budget_floats))


class CollectiveBytes:
    """Counts the bytes handed to dist.all_reduce / dist.all_gather (the hooks
    call them through the torch.distributed module, so wrapping it sees them)."""

    def __init__(self):
        self.count = 0
        self._orig = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _name=name, **kwargs):
                t = args[1] if _name == "all_gather" else args[0]
                self.count += t.numel() * t.element_size()
                return _orig(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def train(rank, method, steps, lr):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    from memboost.train.distributed import VSAHookState, vsa_hook

    model = make_model()
    ddp = DDP(model)
    kind, _, arg = method["name"].partition(" ")
    if kind == "none":
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # the default all-reduce, countable
    elif kind == "memboost":
        ddp.register_comm_hook(VSAHookState(ratio=method["ratio"], seed=0), vsa_hook)
    elif kind == "PowerSGD":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=method["rank"],
                                            start_powerSGD_iter=2, random_seed=0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(1000 + rank)
    per_step = []
    dist.barrier()
    start = time.perf_counter()
    with CollectiveBytes() as counter:
        for _ in range(steps):
            before = counter.count
            x = torch.randn(64, LAYERS[0], generator=batches)
            loss = torch.nn.functional.mse_loss(ddp(x), teacher(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            per_step.append(counter.count - before)
    wall = time.perf_counter() - start
    x_test = torch.randn(2048, LAYERS[0], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(model(x_test), teacher(x_test)))
    return {"bytes_per_step": statistics.median(per_step), "final_loss": final, "wall_s": wall,
            "train_loss_last": float(loss.detach())}


def worker(rank, world_size, port, methods, steps, lr, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    rows = []
    for m in methods:
        r = train(rank, m, steps, lr)
        rows.append({**{k: v for k, v in m.items() if k != "name"}, "method": m["name"], **r})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def training_table(steps, lr):
    n_params = sum(p.numel() for p in make_model().parameters())
    methods = [{"name": "none"}]
    for ratio in (0.1, 0.01):
        methods.append({"name": f"memboost ratio={ratio}", "ratio": ratio})
    for ratio in (0.1, 0.01):
        rank = powersgd_rank_for(ratio * n_params)
        methods.append({"name": f"PowerSGD rank={rank} (~ratio {ratio})", "rank": rank})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.start_processes(worker, args=(WORLD_SIZE, port, methods, steps, lr, out_path), nprocs=WORLD_SIZE,
                           start_method="spawn")
        with open(out_path) as f:
            rows = json.load(f)
    full = 4 * n_params
    for r in rows:
        r["bytes_vs_none"] = r["bytes_per_step"] / full
    print_table(rows, ["method", "bytes_per_step", "bytes_vs_none", "final_loss", "wall_s"],
                title=f"DDP, 2 gloo ranks, {n_params} parameters, {steps} SGD steps, lr {lr}")
    return n_params, rows


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput_table(numel):
    from memboost.train.vsa import count_sketch, count_unsketch
    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    # one elementwise pass over the same values: a yardstick that moves with the machine's load
    scratch = torch.empty_like(g)
    elementwise = statistics.median(_timed(lambda: torch.add(g, 1.0, out=scratch)) for _ in range(3))
    del scratch
    rows = []
    for ratio in (0.1, 0.01):
        count_sketch(g[:1 << 20], ratio, 0)  # warm up the allocator
        times_c, times_d = [], []
        for rep in range(3):
            t0 = time.perf_counter()
            c = count_sketch(g, ratio, rep)
            t1 = time.perf_counter()
            count_unsketch(c, numel, ratio, rep)
            t2 = time.perf_counter()
            times_c.append(t1 - t0)
            times_d.append(t2 - t1)
        rows.append({"numel": numel, "ratio": ratio, "sketch_values": c.numel(),
                     "compress_s": statistics.median(times_c), "decompress_s": statistics.median(times_d),
                     "elementwise_pass_s": elementwise})
    print_table(rows, ["numel", "ratio", "sketch_values", "compress_s", "decompress_s", "elementwise_pass_s"],
                title=f"count sketch of float32 values, {torch.get_num_threads()} threads")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="SGD steps per method")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, the same for every method")
    ap.add_argument("--sketch-numel", type=int, default=100_000_000,
                    help="elements in the throughput test (0 skips it)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (PowerSGD compresses from its third step)")
    n_params, rows = training_table(args.steps, args.lr)
    throughput = throughput_table(args.sketch_numel) if args.sketch_numel > 0 else []
    write_json(args.json, {"benchmark": "gradient_sketch", "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "world_size": WORLD_SIZE, "parameters": n_params, "steps": args.steps, "lr": args.lr,
                           "training": rows, "throughput": throughput})


if __name__ == "__main__":
    main()
