"""What the decode loop's bound calls save: memboost._C.bind_op (what every
linear_bound and ops.rms_norm_bound return) against a Python closure over
torch.ops (`lambda x: op(x, *args)`, what linear_bound returned before),
per call and in SmolLM2's decode, the two alternated in one process, best of
each (so the host's drift between runs cancels).

Per call: batch-1 bound calls of each format's layer (hot weights, under
inference_mode). Decode: memboost.runtime on SmolLM2-135M, 64 greedy tokens
after a short prompt, every linear and RMSNorm bound one way or the other.

    python benchmarks/bench_bound_calls.py [--threads 2] [--json benchmarks/results/bound_calls_cpu.json]
    python benchmarks/bench_bound_calls.py --formats ternary-act8 --rounds 1 --tokens 8   # a quick check
"""

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, time_cpu, write_json  # noqa: E402

import memboost  # noqa: E402
from memboost import nn as mnn  # noqa: E402
from memboost import ops  # noqa: E402
from memboost.runtime import Decoder  # noqa: E402

# name -> (quantize_model method and arguments, the layer class for the per-call rows)
FORMATS = {
    "mixed": (dict(method="mixed", ratio_4bit=0.5), mnn.MixedLinear),
    "mixed-act8": (dict(method="mixed", ratio_4bit=0.5, act_bits=8), mnn.MixedLinear),
    "nf4-act8": (dict(method="nf4", act_bits=8), mnn.NF4Linear),
    "ternary-act8": (dict(method="ternary", act_bits=8), mnn.TernaryLinear),
}
SHAPES = [(16, 576), (192, 576), (576, 576)]


def _closure_bind(op, rest):
    def call(x):
        return op(x, *rest)
    return call


def _closure_norm(weight, eps, weight_offset=False):
    def call(x):
        return ops.rms_norm(x, weight, eps, weight_offset)
    return call


@contextlib.contextmanager
def binding(kind: str):
    """Within: linear_bound and rms_norm_bound bind as `kind` ("bind_op" or "closure")."""
    saved = ops._bound_linear, ops.rms_norm_bound
    if kind == "closure":
        ops._bound_linear, ops.rms_norm_bound = _closure_bind, _closure_norm
    try:
        yield
    finally:
        ops._bound_linear, ops.rms_norm_bound = saved


def per_call_rows(formats, rounds: int) -> list:
    rows = []
    for name in formats:
        params, layer_cls = FORMATS[name]
        kwargs = {k: v for k, v in params.items() if k != "method"}
        for out_f, in_f in SHAPES:
            torch.manual_seed(0)
            layer = layer_cls.from_linear(torch.nn.Linear(in_f, out_f, bias=False), **kwargs)
            x = torch.randn(1, 1, in_f)
            best = {}
            with torch.inference_mode():
                for _ in range(rounds):
                    for kind in ("closure", "bind_op"):
                        with binding(kind):
                            call = layer.linear_bound(x.dtype)
                        t = min(time_cpu(lambda: call(x), min_time=0.02) for _ in range(10))
                        best[kind] = min(best.get(kind, float("inf")), t)
            rows.append({"format": name, "shape": f"{out_f}x{in_f}", "closure_us": best["closure"] * 1e6,
                         "bind_op_us": best["bind_op"] * 1e6, "speedup": best["closure"] / best["bind_op"]})
    return rows


def decode_rows(formats, rounds: int, tokens: int) -> list:
    model, tokenizer = memboost.testbed.load_smollm2()
    model.generation_config.eos_token_id = None
    ids = tokenizer("The capital of France is")["input_ids"]
    rows = []
    for name in formats:
        params = dict(FORMATS[name][0])
        quantized = copy.deepcopy(model)
        memboost.quantize_model(quantized, params.pop("method"), progress=False, **params)
        best = {}
        for _ in range(rounds):
            for kind in ("closure", "bind_op"):
                with binding(kind):
                    decoder = Decoder(quantized, max_batch=1, max_length=len(ids) + tokens)
                decoder.generate([ids], max_new_tokens=tokens)  # warm-up
                for _ in range(2):
                    start = time.perf_counter()
                    decoder.generate([ids], max_new_tokens=tokens)
                    best[kind] = min(best.get(kind, float("inf")), time.perf_counter() - start)
        rows.append({"format": name, "closure_tokens_per_s": tokens / best["closure"],
                     "bind_op_tokens_per_s": tokens / best["bind_op"], "speedup": best["closure"] / best["bind_op"]})
        print(f"[decode] {name}: {rows[-1]['speedup']:.3f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two bindings")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"--formats: unknown {unknown}; expected some of {list(FORMATS)}")
    torch.set_num_threads(args.threads)
    calls = per_call_rows(formats, args.rounds)
    print_table(calls, ["format", "shape", "closure_us", "bind_op_us", "speedup"],
                "batch-1 bound call, hot weights, x [1, 1, in] (µs)")
    decode = decode_rows(formats, args.rounds, args.tokens)
    print_table(decode, ["format", "closure_tokens_per_s", "bind_op_tokens_per_s", "speedup"],
                f"SmolLM2-135M decode, batch 1, {args.tokens} tokens (tokens/s)")
    write_json(args.json, {"benchmark": "bound_calls", "threads": args.threads, "rounds": args.rounds,
                           "tokens": args.tokens, "torch": torch.__version__, "per_call": calls, "decode": decode})
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
