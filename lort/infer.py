"""lort-infer: run a model rebuilt from a .lort file alone (LoRTLinear layers).

    lort-infer                                   # model.lort, a short greedy completion
    lort-infer model.lort --prompt "The capital of France is"
    lort-infer model.lort --text /usr/share/common-licenses/GPL-3   # perplexity
    lort-infer model.lort --bench                # forward time per layer type vs nn.Linear

Errors print one line and exit with status 2.
"""

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from memboost.errors import MemboostError
from memboost.nn import LoRTLinear

from .model import load_model


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _time(fn, x, repeats: int) -> float:
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - start) / repeats


def bench_layers(model, batch: int = 1, repeats: int = 20) -> list:
    """Per layer type (the module's attribute name, e.g. q_proj): forward time
    of the LoRTLinear layers against nn.Linear with their dequantized weights,
    batch `batch`, summed over the model's layers of that type."""
    times = defaultdict(lambda: [0.0, 0.0, 0, None])
    for name, module in model.named_modules():
        if not isinstance(module, LoRTLinear):
            continue
        kind = name.rsplit(".", 1)[-1]
        x = torch.randn(batch, module.in_features)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(module.weight.dequantize().float())
            if module.bias is not None:
                dense.bias.copy_(module.bias.float())
        row = times[kind]
        row[0] += _time(module, x, repeats)
        row[1] += _time(dense, x, repeats)
        row[2] += 1
        row[3] = (module.out_features, module.in_features, module.weight.tensor().rank)
    return [{"layer": k, "count": v[2], "shape": list(v[3][:2]), "rank": v[3][2], "lort_ms": 1e3 * v[0],
             "linear_ms": 1e3 * v[1], "speedup": v[1] / v[0]} for k, v in times.items()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lort-infer", description=__doc__, formatter_class=_Formatter)
    ap.add_argument("file", nargs="?", default="model.lort", help=".lort file")
    ap.add_argument("--prompt", default=None, help="greedy generation from this text (the default action)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated")
    ap.add_argument("--text", default=None, help="perplexity on this text file ('fortunes': Debian's fortunes)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of --text evaluated")
    ap.add_argument("--window", type=int, default=256, help="context window of the perplexity")
    ap.add_argument("--bench", action="store_true", help="forward time per layer type against nn.Linear")
    ap.add_argument("--batch", type=int, default=1, help="--bench: rows per forward")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (embeddings and norms are cast to it; LoRT layers never are)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    ap.add_argument("--no-verify", action="store_true", help="skip checking the file's checksums (faster load)")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        start = time.perf_counter()
        model, tokenizer = load_model(args.file, getattr(torch, args.dtype), verify=not args.no_verify)
        layers = sum(isinstance(m, LoRTLinear) for m in model.modules())
        print(f"{args.file}: {layers} LoRT layers, rebuilt in {time.perf_counter() - start:.1f} s")
        generate = args.prompt is not None or not (args.text or args.bench)   # the default action
        if (generate or args.text) and tokenizer is None:
            raise MemboostError(f"{args.file!r} holds no tokenizer: only --bench can run (generation and "
                                "--text need one)")
        if args.text:
            from memboost.cli import read_text
            from memboost.testbed import perplexity

            ppl = perplexity(model, tokenizer, read_text(args.text), context=args.window, max_tokens=args.tokens)
            print(f"perplexity {ppl:.2f} on {args.tokens} tokens of {args.text} (windows of {args.window})")
        if args.bench:
            rows = bench_layers(model, batch=args.batch)
            print(f"\nforward time per layer type, batch {args.batch}, {torch.get_num_threads()} threads")
            print("| layer | count | shape | rank | LoRTLinear ms | nn.Linear ms | speed-up |")
            print("|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['layer']} | {r['count']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | "
                      f"{r['lort_ms']:.3f} | {r['linear_ms']:.3f} | {r['speedup']:.2f}x |")
        if generate:
            prompt = args.prompt if args.prompt is not None else "The capital of France is"
            from memboost.cli import generation_speed

            completion, speed = generation_speed(model, tokenizer, prompt, args.new_tokens)
            print(f"{prompt!r} -> {completion!r}\n{args.new_tokens} tokens at {speed:.1f} tokens/s")
    except MemboostError as exc:
        print(f"lort-infer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
