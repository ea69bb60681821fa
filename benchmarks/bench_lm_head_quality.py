"""What the int8 output layer (quantize_model's default lm_head="int8") costs
in perplexity on SmolLM2-135M: float32, and NF4 decoder layers, each with the
float and with the int8 lm_head (and the int8 head with int8 activations),
on the first 2048 tokens of the two texts README's tables use (Debian's
fortunes and the GPL-3 of base-files), windows of 256. Prints a table and
writes JSON. No timing.

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


def settings():
    """(name, decoder method or None, lm_head, head act_bits)"""
    return [
        ("float32", None, None, None),
        ("float32, int8 lm_head", None, "int8", None),
        ("float32, int8 lm_head act_bits=8", None, "int8", 8),
        ("nf4", "nf4", None, None),
        ("nf4, int8 lm_head", "nf4", "int8", None),
    ]


def build(method, lm_head, act_bits):
    model, tokenizer = testbed.load_smollm2(torch.float32)
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
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = texts()
    rows = []
    for name, method, lm_head, act_bits in settings():
        model, tokenizer = build(method, lm_head, act_bits)
        ppl = {t: testbed.perplexity(model, tokenizer, text, 256, args.tokens, progress=False)
               for t, text in corpus.items()}
        rows.append({"setting": name, "perplexity": ppl})
        print(name, ppl, flush=True)
    base = {r["setting"]: r["perplexity"] for r in rows}
    print(f"\nSmolLM2-135M, perplexity on {args.tokens} tokens of each text, windows of 256\n")
    print("| setting | fortunes | GPL-3 | change vs float lm_head |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        ref = base["nf4" if r["setting"].startswith("nf4") else "float32"]
        change = ", ".join(f"{100 * (r['perplexity'][t] / ref[t] - 1):+.2f}%" for t in corpus)
        print(f"| {r['setting']} | {r['perplexity']['fortunes']:.3f} | {r['perplexity']['GPL-3']:.3f} | {change} |")
    if args.json:
        with atomic_write(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"model": "SmolLM2-135M", "tokens": args.tokens, "window": 256, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
