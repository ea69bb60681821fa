"""Per-token overhead of generation, counted, not timed (so a loaded machine
gives the same figures): Python calls (sys.setprofile: Python and C functions
called from Python) and ATen ops dispatched (a TorchDispatchMode, counted in
a separate run) per generated token, transformers' eager `generate` against
memboost.runtime.Decoder, on SmolLM2-135M float32 and ternary act_bits=8.
Per token = (count for 12 tokens - count for 4) / 8, prefill excluded.

    python benchmarks/bench_decode_overhead.py [--formats float,ternary-act8]
"""

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

import memboost  # noqa: E402
from memboost.runtime import Decoder  # noqa: E402


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def counts(fn, tokens: int):
    calls = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1
    with torch.inference_mode():
        sys.setprofile(profile)
        try:
            fn(tokens)
        finally:
            sys.setprofile(None)
        mode = _CountOps()
        with mode:  # separately: the mode's own Python calls stay out of the call count
            fn(tokens)
    return calls[0], mode.ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="float,ternary-act8", help="float, ternary-act8, mixed-act8, nf4-act8, ...")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "decode_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for fmt in args.formats.split(","):
        model, tokenizer = memboost.testbed.load_smollm2()
        if fmt != "float":
            method, _, act = fmt.partition("-act")
            memboost.quantize_model(model, method, progress=False, **({"act_bits": int(act)} if act else {}))
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        decoder = Decoder(model, max_batch=1, max_length=64)
        paths = {
            "transformers eager generate": lambda n: model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False),
            "memboost.runtime.Decoder": lambda n: decoder.generate(ids, max_new_tokens=n),
        }
        for name, fn in paths.items():
            fn(2)  # warm-up
            (c4, o4), (c12, o12) = counts(fn, 4), counts(fn, 12)
            rows.append({"format": fmt, "path": name, "python_calls_per_token": (c12 - c4) / 8,
                         "aten_ops_per_token": (o12 - o4) / 8})
            print(rows[-1], flush=True)
    print_table(rows, ["format", "path", "python_calls_per_token", "aten_ops_per_token"],
                "SmolLM2-135M, per generated token (counts, not times)")
    write_json(args.json, {"benchmark": "decode_overhead", "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
