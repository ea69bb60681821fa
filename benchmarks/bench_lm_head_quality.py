"""What the int8 output layer (quantize_model's default lm_head="int8") costs
in perplexity on SmolLM2-135M: float32, and NF4 decoder layers, each with the
float and with the int8 lm_head (and the int8 head with int8 activations),
on the first 2048 tokens of the two texts README's tables use (Debian's
fortunes and the GPL-3 of base-files), windows of 256. The testbed's SmolLM2
embedding is Q8_0 in its GGUF file, so the int8 head reproduces it exactly;
the "dithered" rows move it off the Q8_0 grid first (see dither_) to measure
what the int8 rounding costs a float matrix. Prints a table and writes JSON.
No timing.

    python benchmarks/bench_lm_head_quality.py --json benchmarks/results/lm_head_quality.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memboost  # noqa: E402
from memboost import testbed  # noqa: E402
from memboost.io.serialization import atomic_write  # noqa: E402
from memboost.nn import Int8Linear  # noqa: E402

GPL3 = "/usr/share/common-licenses/GPL-3"


def texts():
    with open(GPL3, encoding="utf-8") as f:
        return {"fortunes": testbed.english_text(200_000), "GPL-3": f.read()}


# (name, decoder method or None, lm_head, head act_bits, embedding dithered off the Q8_0 grid)
SETTINGS = [
    ("float32", None, None, None, False),
    ("float32, int8 lm_head", None, "int8", None, False),
    ("float32, int8 lm_head act_bits=8", None, "int8", 8, False),
    ("nf4", "nf4", None, None, False),
    ("nf4, int8 lm_head", "nf4", "int8", None, False),
    ("dithered float32", None, None, None, True),
    ("dithered float32, int8 lm_head", None, "int8", None, True),
]


def dither_(weight: torch.Tensor) -> None:
    """Moves every value of `weight` off the Q8_0 grid by a seeded uniform
    amount within half its block's step. The embedding of the testbed's
    SmolLM2 (token_embd in its GGUF file) is Q8_0 already, so an int8 lm_head
    reproduces it exactly; dithered, it is a float matrix whose Q8_0 rounding
    error is what a float-trained model's would be."""
    blocks = weight.data.reshape(-1, 32)
    step = blocks.abs().amax(1, keepdim=True) / 127
    noise = torch.rand(blocks.shape, generator=torch.Generator().manual_seed(0)) - 0.5
    blocks += noise * step


def build(method, lm_head, act_bits, dithered):
    model, tokenizer = testbed.load_smollm2(torch.float32)
    if dithered:
        dither_(model.model.embed_tokens.weight)
    if method is not None:
        memboost.quantize_model(model, method, lm_head=lm_head, progress=False)
    elif lm_head == "int8":  # the output layer alone, as quantize_model makes it
        model.lm_head = Int8Linear.from_linear(model.lm_head, act_bits=act_bits)
        model.config.tie_word_embeddings = False
    if act_bits is not None and isinstance(model.lm_head, Int8Linear):
        model.lm_head.act_bits = act_bits
    return model.eval(), tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", help="comma-separated indices into SETTINGS (default: all)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    chosen = SETTINGS if not args.settings else [SETTINGS[int(i)] for i in args.settings.split(",")]
    torch.set_num_threads(args.threads)
    corpus = texts()
    rows = []
    for name, method, lm_head, act_bits, dithered in chosen:
        model, tokenizer = build(method, lm_head, act_bits, dithered)
        ppl = {t: testbed.perplexity(model, tokenizer, text, 256, args.tokens, progress=False)
               for t, text in corpus.items()}
        rows.append({"setting": name, "perplexity": ppl})
        print(name, ppl, flush=True)
    base = {r["setting"]: r["perplexity"] for r in rows}
    print(f"\nSmolLM2-135M, perplexity on {args.tokens} tokens of each text, windows of 256\n")
    print("| setting | fortunes | GPL-3 | change vs float lm_head |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        ref = base.get(r["setting"].split(",")[0])  # the same model with its float lm_head
        change = "" if ref is None else ", ".join(f"{100 * (r['perplexity'][t] / ref[t] - 1):+.2f}%" for t in corpus)
        print(f"| {r['setting']} | {r['perplexity']['fortunes']:.3f} | {r['perplexity']['GPL-3']:.3f} | {change} |")
    if args.json:
        with atomic_write(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"model": "SmolLM2-135M", "tokens": args.tokens, "window": 256, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
