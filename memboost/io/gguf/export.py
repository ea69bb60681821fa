"""GGUF export: a Hugging Face causal LM of a family llama.cpp runs (Llama,
Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3, OLMo 2), plain or
quantized with memboost, to one GGUF file that llama.cpp loads and runs.

    import memboost
    report = memboost.export_gguf(model, "model.gguf", weight_type="IQ4_NL", tokenizer=tokenizer)
    print(report.table())

The file is written with the `gguf` package (llama.cpp's own Python writer):
architecture, hyper-parameters, tokenizer and tensors through its helpers,
never hand-made bytes. What every tensor becomes is decided by one rule,
`gguf_type_for` (see its docstring); the quantizers that `gguf` lacks are
in memboost.io.gguf.quants. `gguf_state_dict(path, model)` reads an exported
file back into the model's float tensors (what llama.cpp computes with).
"""

import dataclasses
import json
import math
import os
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from . import quants as gguf_quants
from ..._slices import rows_per_slice
from ...errors import MemboostError, MemboostTypeError
from ..serialization import atomic_write, release_mapped_pages

@dataclasses.dataclass(frozen=True)
class Architecture:
    """How llama.cpp takes one Hugging Face model type (as its convert_hf_to_gguf.py writes it)."""
    name: str                   # llama.cpp's architecture
    permute: bool = False       # q/k rows to llama.cpp's interleaved rope pairs (Llama-style checkpoints store each
                                # head as two halves; the NeoX rope of the others uses the halves as they are)
    norm_offset: bool = False   # RMS norms multiply by 1 + weight (Gemma): llama.cpp stores 1 + weight
    output_required: bool = False  # llama.cpp loads no tied output for it: output.weight is always written
    sliding_window: bool = False   # writes attention.sliding_window (llama.cpp's own layer pattern, checked)
    softcapping: bool = False      # writes the attention and final logit soft-capping (Gemma 2)
    output_tensor: bool = True     # llama.cpp reads an output.weight (else it always ties it to token_embd)


# Hugging Face model type -> llama.cpp architecture.
ARCHITECTURES = {
    "llama": Architecture("llama", permute=True),
    "mistral": Architecture("llama", permute=True),
    "qwen2": Architecture("qwen2"),
    "qwen3": Architecture("qwen3"),
    "gemma": Architecture("gemma", norm_offset=True, output_tensor=False),
    "gemma2": Architecture("gemma2", norm_offset=True, sliding_window=True, softcapping=True, output_tensor=False),
    "gemma3_text": Architecture("gemma3", norm_offset=True, sliding_window=True),
    "phi3": Architecture("phi3", output_required=True),
    "olmo2": Architecture("olmo2", output_required=True),
}
# llama.cpp's fixed sliding-window layer pattern: every n-th layer global, the others local (llama-model.cpp's
# set_swa_pattern), and Gemma 3's local rotary base.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA3_LOCAL_ROPE_THETA = 10000.0

WEIGHT_TYPES = gguf_quants.FLOAT_TYPES + gguf_quants.QUANT_TYPES
TERNARY_TYPES = ("TQ1_0", "TQ2_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K")

_FILE_TYPES = {  # general.file_type (llama.cpp's LLAMA_FTYPE) of a file "mostly" of this type
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0",
    "IQ4_NL": "MOSTLY_IQ4_NL", "TQ1_0": "MOSTLY_TQ1_0", "TQ2_0": "MOSTLY_TQ2_0", "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_0": "MOSTLY_Q5_0", "Q5_K": "MOSTLY_Q5_K_S",
}

# Pre-tokenizers of byte-level BPE tokenizers (tokenizer.json) that llama.cpp
# implements, by the regular expression their Split step uses.
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                 "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is in the hf extra
        raise MemboostError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


# -- the rule -----------------------------------------------------------------
def gguf_type_for(source: str, requested: str, cols: int, exact_ternary: bool = False) -> Tuple[str, str, str]:
    """What one 2-D weight becomes: (GGUF type, how, note).

    source: "float" or the memboost format of the weight ("ternary", "nf4",
    "mixed", "lort", ...); requested: the GGUF type asked for; cols: the
    row length (input features); exact_ternary: a ternary weight whose
    scale groups cover whole 256-blocks (per tensor, per row, or groups that
    are multiples of 256).
    how: "copy" (the stored codes as they are: ternary trits into TQ1_0 /
    TQ2_0, scales rounded to fp16), "cast" (to a float type) or "quantize"
    (the float weight, dequantized from its format if need be, quantized by
    memboost.io.gguf.quants choosing each block's scale to minimise the error;
    for NF4 -> IQ4_NL this maps the NF4 values onto the closest IQ4_NL grid).

    - F32 / F16 / BF16: every format dequantized and cast.
    - TQ1_0 / TQ2_0 (blocks of 256): ternary weights are copied when their
      scales allow, else re-quantized (said in the note); rows that are not
      a multiple of 256 fall back to Q4_0, which holds three levels exactly.
    - Q2_K / Q3_K / Q4_K (blocks of 256): rows that are not a multiple of
      256 fall back to IQ4_NL, said in the note (llama.cpp 0.3.36 falls back
      to Q4_0 for Q2_K/Q3_K and to Q5_0 for Q4_K; IQ4_NL has Q4_0's 4.5 bits
      and a lower error).
      Q5_K falls back to Q5_0 (the same 5.5 bits).
    - Q4_0 / Q5_0 / Q8_0 / IQ4_NL (blocks of 32): rows that are not a multiple
      of 32 are refused (MemboostError): no 4-, 5- or 8-bit type fits them.
    - NF4 models: Q5_0 (5.5 bits) with a calibration (export_gguf's
      `calibration=`, memboost.calibrate(model, batches, quantized=True): the
      NF4 model's own activations) is the export that keeps their behaviour:
      a 5-bit grid with its own scale per 32 weights holds each block's NF4
      values far closer than IQ4_NL's 4-bit grid, which does not nest with
      NF4's (3.8% against 7.3% relative error on LLM-like weights; Q5_K,
      also 5.5 bits, measured 4.1%), and the calibration puts the remaining
      rounding where the activations are small (SmolLM2, llama.cpp's
      perplexity over the NF4 model's own: +3% calibrated, +7% without,
      README). IQ4_NL stays the size-first choice (4.5 bits; +4% with a
      calibration, +35% without).
    """
    if requested not in WEIGHT_TYPES:
        raise MemboostError(f"'weight_type' must be one of {list(WEIGHT_TYPES)}, got {requested!r}")
    dequant = "" if source == "float" else f"{source} dequantized"
    if requested in gguf_quants.FLOAT_TYPES:
        return requested, "cast", dequant
    block = gguf_quants.BLOCK[requested][0]
    if cols % block:
        fallback = "Q4_0" if requested in TERNARY_TYPES else "Q5_0" if requested == "Q5_K" else "IQ4_NL"
        if requested in TERNARY_TYPES + K_TYPES and cols % gguf_quants.QK == 0:
            why = f"rows of {cols} are not a multiple of {block}"
            return fallback, "quantize", f"{requested} -> {fallback}: {why}" + (f"; {dequant}" if dequant else "")
        raise MemboostError(f"GGUF type {requested} needs rows that are a multiple of {block} elements"
                            f"{'' if block == gguf_quants.QK else ' (or of 32 to fall back to ' + fallback + ')'}; "
                            f"this weight has rows of {cols}")
    if requested == "Q8_0" and source == "int8":
        return requested, "copy", "same int8 values and fp16 scales"
    if requested in TERNARY_TYPES and source == "ternary":
        if exact_ternary:
            return requested, "copy", "same trits, scales in fp16"
        return requested, "quantize", "ternary scale groups do not cover whole 256-blocks: re-quantized"
    note = dequant
    if source == "nf4" and requested == "IQ4_NL":
        note = "NF4 values mapped onto IQ4_NL, scales fitted per block"
    elif source == "nf4" and requested in ("Q5_0", "Q5_K"):
        note = f"NF4 values on {requested}'s 5-bit grid, a scale per 32"
    return requested, "quantize", note


def requested_type(role: str, weight_type: str, output_type: str) -> str:
    """The type asked of gguf_type_for for a matrix in `role`: "output" (lm_head,
    or the token embedding when tied) gets output_type; an untied token
    embedding gets Q4_K under the ternary types (a ternary embedding loses
    the model; llama.cpp's quantizer does the same; rows that are not a
    multiple of 256 then fall back to IQ4_NL); every other matrix gets
    weight_type."""
    if role == "output":
        return output_type
    if role == "embedding" and weight_type in TERNARY_TYPES:
        return "Q4_K"
    return weight_type


# -- reading the model ----------------------------------------------------------
@dataclasses.dataclass
class _HParams:
    arch: str
    permute: bool
    family: Architecture
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    tied: bool
    rope_dim: int = 0
    sliding_window: Optional[int] = None
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    orig_ctx: Optional[int] = None


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_rope_factors(head_dim: int, rope_theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp takes it: one divisor per rotary
    frequency (float32 [head_dim / 2], the `rope_freqs` tensor): 1 for
    wavelengths below original_context / high_freq_factor, `factor` above
    original_context / low_freq_factor, a smooth blend between (what
    transformers applies to its inverse frequencies)."""
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    freqs = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < context / high, torch.ones_like(freqs),
                      torch.where(wavelen > context / low, torch.full_like(freqs, factor), blended))
    return out.to(torch.float32)


def _hparams(model) -> _HParams:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise MemboostError(f"GGUF export supports the Hugging Face model types {sorted(ARCHITECTURES)}; "
                            f"got {model_type!r} ({type(model).__name__})")
    family = ARCHITECTURES[model_type]
    arch = family.name

    def need(name):
        value = getattr(config, name, None)
        if value is None:
            raise MemboostError(f"the model's config lacks {name!r}, which llama.cpp needs for {arch!r}")
        return value

    def refuse(what):
        raise MemboostError(f"GGUF export of {model_type!r}: {what}, which llama.cpp's {arch!r} does not run")

    n_head = need("num_attention_heads")
    n_embd = need("hidden_size")
    n_layer = need("num_hidden_layers")
    head_dim = getattr(config, "head_dim", None) or n_embd // n_head
    params = dict(getattr(config, "rope_parameters", None) or {})
    layer_types = list(getattr(config, "layer_types", None) or [])
    window = None
    if family.sliding_window:
        # llama.cpp fixes which layers attend locally (every n-th one global) and Gemma 3's local rope
        pattern = _SWA_PATTERN[arch]
        expected = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
        if layer_types and layer_types != expected:
            refuse(f"layer_types {layer_types} (llama.cpp: every {pattern}th layer global, the others sliding)")
        window = need("sliding_window")
        if "full_attention" in params:  # Gemma 3: rotary parameters per layer type
            local = params.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default" or local.get("rope_theta") != _GEMMA3_LOCAL_ROPE_THETA:
                refuse(f"sliding-attention rope parameters {local} (llama.cpp: default rope, "
                       f"theta {_GEMMA3_LOCAL_ROPE_THETA:g})")
            params = dict(params["full_attention"])
    elif any(t != "full_attention" for t in layer_types):
        refuse(f"sliding-window layers ({layer_types})")
    if model_type in ("gemma2", "gemma3_text") and getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        refuse(f"query_pre_attn_scalar {config.query_pre_attn_scalar} other than head_dim {head_dim} "
               "(llama.cpp scales the queries by 1/sqrt(head_dim))")
    softcaps = (getattr(config, "attn_logit_softcapping", None), getattr(config, "final_logit_softcapping", None))
    if not family.softcapping and any(c is not None for c in softcaps):
        refuse("attention or final logit soft-capping")
    if getattr(config, "use_bidirectional_attention", False):
        refuse("bidirectional attention")
    rope_theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if rope_theta is None:
        raise MemboostError(f"the model's config lacks 'rope_theta' (rope_parameters), which llama.cpp needs for "
                            f"{arch!r}")
    scaling = params if params else dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise MemboostError(f"rope scaling {rope_type!r} is not supported by the GGUF export "
                            "(supported: none, 'linear', 'yarn', 'llama3')")
    if rope_type == "llama3":
        lacking = [k for k in LLAMA3_ROPE_KEYS if scaling.get(k) is None]
        if lacking:
            raise MemboostError(f"rope scaling 'llama3' in the config lacks {lacking}, which llama.cpp's "
                                "rope_freqs needs")
    partial = float(scaling.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    if partial != 1.0 and arch != "phi3":
        refuse(f"partial_rotary_factor {partial}")
    return _HParams(
        arch=arch, permute=family.permute, family=family, n_layer=n_layer, n_embd=n_embd,
        n_ff=need("intermediate_size"), n_head=n_head, n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim, n_ctx=need("max_position_embeddings"), n_vocab=need("vocab_size"),
        rms_eps=float(need("rms_norm_eps")), rope_theta=float(rope_theta),
        rope_scaling=None if rope_type == "default" else dict(scaling, rope_type=rope_type),
        tied=bool(getattr(config, "tie_word_embeddings", False)), rope_dim=int(head_dim * partial),
        sliding_window=window, attn_softcap=softcaps[0] if family.softcapping else None,
        final_softcap=softcaps[1] if family.softcapping else None,
        orig_ctx=getattr(config, "original_max_position_embeddings", None) if arch == "phi3" else None)


def _weights(model, correctors: str = "merge") -> Iterator[Tuple[str, object]]:
    """(Hugging Face name, float tensor or QuantizedTensor) of every parameter
    and quantized weight; correctors="adapter" gives the quantized weights
    without their low-rank correctors (memboost.heal), which
    export_lora_adapter writes apart."""
    from ...nn import QLoRALinear, QuantizedLinear

    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, QLoRALinear):
            raise MemboostError(f"layer {name!r} carries LoRA adapters: merge them first "
                                "(memboost.qlora.merge_adapters) or export the base model")
        if isinstance(module, QuantizedLinear):
            q = module.weight.tensor()
            yield prefix + "weight", q.without_corrector() if correctors == "adapter" else q
            if module.bias is not None:
                yield prefix + "bias", module.bias.detach()
            continue
        for pname, param in module.named_parameters(recurse=False):
            yield prefix + pname, param.detach()


def _rope_rows(rows: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """Reorders the rows (output features) of a q/k weight or bias between
    Hugging Face's rotate-half layout (each head: the first halves of all
    pairs, then the second halves) and llama.cpp's interleaved pairs."""
    head = rows.shape[0] // n_head
    rest = rows.shape[1:]
    if inverse:
        return rows.reshape(n_head, head // 2, 2, *rest).transpose(1, 2).reshape(rows.shape)
    return rows.reshape(n_head, 2, head // 2, *rest).transpose(1, 2).reshape(rows.shape)


def _offset_norm(hp: _HParams, gguf_name: str) -> bool:
    """Whether the tensor is a norm weight that llama.cpp stores as 1 + weight (Gemma's RMS norms, q/k norms too)."""
    return hp.family.norm_offset and gguf_name.endswith("norm.weight")


# -- one tensor ------------------------------------------------------------------
@dataclasses.dataclass
class TensorRow:
    name: str            # GGUF tensor name
    source: str          # float or the memboost format
    gguf_type: str
    bits_per_weight: float
    rel_error: float     # ||W_gguf - W_source|| / ||W_source||
    note: str = ""
    numel: int = 0
    nbytes: int = 0


@dataclasses.dataclass
class GGUFExportReport:
    path: str
    architecture: str
    weight_type: str
    rows: List[TensorRow]
    file_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight over every tensor of the file (file size over all weights)."""
        return 8.0 * self.file_bytes / max(1, sum(r.numel for r in self.rows))

    def table(self) -> str:
        lines = ["| tensor | source | GGUF type | bits/weight | rel. error | note |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.source} | {r.gguf_type} | {r.bits_per_weight:.4g} | {r.rel_error:.2e} | "
                         f"{r.note} |")
        return "\n".join(lines)

    def summary(self) -> str:
        fallbacks = sum(1 for r in self.rows if "->" in r.note)
        return (f"{self.path}: {self.architecture}, {len(self.rows)} tensors, {self.file_bytes / 2**20:.1f} MiB, "
                f"{self.bits_per_weight:.3f} bits per weight (mostly {self.weight_type}"
                f"{f'; {fallbacks} tensors fell back, see the table' if fallbacks else ''})")


def _ternary_exact(q) -> bool:
    gs = q.group_size
    return gs == 0 or gs % gguf_quants.QK_K == 0


def _ternary_copy(q, qtype: str) -> torch.Tensor:
    """The GGUF blocks of a ternary weight's own trits and scales: TQ2_0's
    qs bytes are memboost's packed bytes (same 128-trit chunk layout), so
    that is a byte copy; TQ1_0 repacks the same trits in base 3."""
    rows, cols = q.shape
    nblk = cols // gguf_quants.QK_K
    scales = q.tensors["scales"].float().cpu()
    if q.group_size == 0:
        d = scales[:, :1].expand(rows, nblk) if scales.shape[0] == rows else scales.reshape(1, 1).expand(rows, nblk)
    else:
        d = scales.repeat_interleave(q.group_size // gguf_quants.QK_K, 1)[:, :nblk]
    d = d.reshape(-1)
    if qtype == "TQ2_0":
        qs = q.tensors["packed"].cpu()[:, :cols // 4].reshape(rows * nblk, 64)
        out = torch.cat([qs, gguf_quants._fp16_bytes(d)], 1)
    else:
        codes = (q.trits().cpu().to(torch.int16) + 1).reshape(rows * nblk, gguf_quants.QK_K)
        out = gguf_quants.pack_tq1_0(codes, d)
    return out.reshape(rows, -1)


def _dequantize_bytes(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """The float weight llama.cpp sees: gguf's reference decoder on our bytes."""
    gguf = _gguf()
    if qtype == "F32":
        return data.float()
    if qtype == "F16":
        return data.float()
    if qtype == "BF16":
        return data.view(torch.bfloat16).float()
    arr = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(arr).reshape(data.shape[0], cols)


def _importance_by_weight(calibration, by_name) -> Dict[str, torch.Tensor]:
    """memboost.calibrate's {layer: mean square per input channel} keyed by weight name, checked."""
    if calibration is None:
        return {}
    if not isinstance(calibration, Mapping):
        raise MemboostTypeError(f"'calibration' must be a dict from memboost.calibrate, got {type(calibration).__name__}")
    out = {}
    for layer, stats in calibration.items():
        weight = by_name.get(f"{layer}.weight")
        if weight is None or len(weight.shape) != 2:
            raise MemboostError(f"'calibration' has layer {layer!r}, which is not a weight matrix of this model")
        if not isinstance(stats, torch.Tensor) or stats.dim() not in (1, 2):
            raise MemboostError(f"'calibration'[{layer!r}] must be a 1-D (or 2-D second moment) tensor")
        stats = stats.diagonal() if stats.dim() == 2 else stats
        if stats.numel() != weight.shape[1]:
            raise MemboostError(f"'calibration'[{layer!r}] has {stats.numel()} values; the layer has "
                                f"{weight.shape[1]} input features")
        if not bool(torch.isfinite(stats).all()) or bool((stats < 0).any()):
            raise MemboostError(f"'calibration'[{layer!r}] must hold finite non-negative values")
        out[f"{layer}.weight"] = stats.detach().float().cpu()
    return out


def _convert(value, qtype_requested: str, is_matrix: bool, importance: Optional[torch.Tensor] = None):
    """(stored tensor, GGUF type, source name, note, float source, stored float) for one weight;
    importance: the calibration's per-input-channel mean square for it, if any."""
    from ...formats.tensor import QuantizedTensor

    corrected = isinstance(value, QuantizedTensor) and value.corrector_rank > 0
    if isinstance(value, QuantizedTensor):
        source = value.format
        exact = source == "ternary" and _ternary_exact(value)
    else:
        source, exact = "float", False
    if not is_matrix:
        w = value.dequantize().float() if isinstance(value, QuantizedTensor) else value.float()
        return w.cpu().contiguous(), "F32", source, "", w, w
    cols = value.shape[1]
    # A weight with a corrector (memboost.heal) is its dequantized weight, corrector
    # merged, converted as a float one: its codes alone are not the weight.
    qtype, how, note = gguf_type_for("float" if corrected else source, qtype_requested, cols, exact)
    if corrected:
        source, note = f"{source}+corrector", "; ".join(filter(None, (note, "corrector merged")))
    w = (value.dequantize() if isinstance(value, QuantizedTensor) else value).detach().float().cpu()
    if how == "copy" and source == "int8":
        data = gguf_quants.pack_q8_0(value.tensors["values"].cpu(), value.tensors["scales"].cpu())
    elif how == "copy":
        data = _ternary_copy(value, qtype)
    elif how == "cast":
        data = gguf_quants.to_float_type(w, qtype).contiguous()
    else:
        data = gguf_quants.quantize(w, qtype, importance)
        if importance is not None and qtype in gguf_quants.IMPORTANCE_TYPES:
            note = "; ".join(filter(None, (note, "calibration-weighted")))
    return data, qtype, source, note, w, _dequantize_bytes(data, qtype, cols)


# -- tokenizer -------------------------------------------------------------------
def _bpe_pre(pre: Optional[dict]) -> Optional[str]:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json), None if unknown."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _prepends_space(normalizer: Optional[dict]) -> bool:
    """Whether a SentencePiece-style tokenizer.json normalizer prepends "▁" (llama.cpp's add_space_prefix)."""
    if not normalizer:
        return False
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    return any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps)


def _token_table(tokenizer, n_vocab: int, sentencepiece: bool):
    """(tokens, scores, token types) by id, padded to the model's n_vocab with unused tokens."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise MemboostError(f"the tokenizer has {len(vocab)} tokens (largest id {max(vocab.values())}) but "
                            f"the model's vocab_size is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    scores = [-1000.0] * n_vocab
    for text, idx in vocab.items():
        tokens[idx], types[idx], scores[idx] = text, int(gguf.TokenType.NORMAL), -float(idx)
        if sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[idx], scores[idx] = int(gguf.TokenType.BYTE), 0.0
    for idx, added in tokenizer.added_tokens_decoder.items():
        tokens[idx] = added.content
        if types[idx] == int(gguf.TokenType.BYTE):
            continue
        if added.special:
            types[idx] = int(gguf.TokenType.UNKNOWN if added.content == tokenizer.unk_token else gguf.TokenType.CONTROL)
        else:
            types[idx] = int(gguf.TokenType.USER_DEFINED)
        scores[idx] = 0.0
    return tokens, scores, types


def _add_tokenizer(writer, tokenizer, n_vocab: int) -> List[str]:
    """Writes the tokenizer's vocabulary, merges or scores, token types,
    special ids and chat template; returns notes for the report."""
    gguf = _gguf()
    if tokenizer is None:
        # llama.cpp then loads the weights without a vocabulary (no text in or out).
        writer.add_tokenizer_model("none")
        return ["no tokenizer given: the file has no vocabulary"]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MemboostError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model", {})
    notes = []
    with tempfile.TemporaryDirectory(prefix="memboost-gguf-tok-") as folder:
        tokenizer.save_pretrained(folder)
        byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        if model_spec.get("type") != "BPE" or not (byte_level or model_spec.get("byte_fallback")):
            raise MemboostError(f"GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers; "
                                f"this one is {model_spec.get('type')!r}")
        sentencepiece = not byte_level
        tokens, scores, types = _token_table(tokenizer, n_vocab, sentencepiece)
        if sentencepiece:
            # Llama 2 / Mistral style: llama.cpp's SentencePiece tokenizer merges by
            # score, and the vocabulary is in merge order, so the score is -id.
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_add_space_prefix(_prepends_space(spec.get("normalizer")))
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
        else:
            pre = _bpe_pre(spec.get("pre_tokenizer"))
            if pre is None:
                notes.append("pre-tokenizer not one llama.cpp names: its default (GPT-2's) is used")
                pre = "default"
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
        load_merges = not sentencepiece
        special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    return notes


# llama.cpp marks these tokens of a model whose general.name says Phi-3 (llama-vocab.cpp), failing to load the
# file when one is missing from the vocabulary.
_PHI3_NAMED_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _check_name_tokens(hp: _HParams, name: str, tokenizer) -> None:
    lowered = name.lower()
    if tokenizer is None or hp.arch != "phi3" or not ("phi3" in lowered or "phi-3" in lowered):
        return
    lacking = [t for t in _PHI3_NAMED_TOKENS if t not in tokenizer.get_vocab()]
    if lacking:
        raise MemboostError(f"llama.cpp looks up the tokens {lacking} in a model named {name!r} (a Phi-3 name) and "
                            "fails to load the file without them; pass another 'name' or a tokenizer that has them")


def _add_hparams(writer, hp: _HParams, weight_type: str, name: str) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_rope_dimension_count(hp.rope_dim)
    if hp.sliding_window is not None:
        writer.add_sliding_window(int(hp.sliding_window))
    if hp.attn_softcap is not None:
        writer.add_attn_logit_softcapping(float(hp.attn_softcap))
    if hp.final_softcap is not None:
        writer.add_final_logit_softcapping(float(hp.final_softcap))
    if hp.orig_ctx:
        writer.add_rope_scaling_orig_ctx_len(int(hp.orig_ctx))
    if hp.head_dim * hp.n_head != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] != "llama3":   # llama3: the rope_freqs tensor
        factor = hp.rope_scaling.get("factor")
        if factor is None:
            raise MemboostError(f"rope scaling {hp.rope_scaling['rope_type']!r} in the config lacks 'factor'")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if hp.rope_scaling["rope_type"] == "linear"
                                     else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        orig = hp.rope_scaling.get("original_max_position_embeddings")
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[weight_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_weight_type(weight_type) -> str:
    if hasattr(weight_type, "name"):       # a gguf.GGMLQuantizationType
        weight_type = weight_type.name
    if not isinstance(weight_type, str):
        raise MemboostTypeError(f"'weight_type' must be a GGUF type name, got {type(weight_type).__name__}")
    upper = weight_type.upper()
    if upper not in WEIGHT_TYPES:
        raise MemboostError(f"'weight_type' must be one of {list(WEIGHT_TYPES)}, got {weight_type!r}")
    return upper


def export_gguf(model, path: str, weight_type: str = "F16", tokenizer=None, *, output_type: Optional[str] = None,
                name: Optional[str] = None, calibration: Optional[Mapping[str, torch.Tensor]] = None,
                progress: Optional[bool] = None, verbose: bool = True, correctors: str = "merge") -> GGUFExportReport:
    """Writes `model` (a Hugging Face causal LM of a model type in
    ARCHITECTURES: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text,
    Phi-3, OLMo 2; plain or with memboost-quantized layers) to the GGUF file
    `path`, with llama.cpp's tensor names, layouts (Llama's q/k rows in its rope
    order, Gemma's norms as 1 + weight, Phi-3's fused qkv and gate/up kept
    fused) and hyper-parameters (sliding window, soft-capping, partial rotary).
    Settings llama.cpp does not run (another sliding-window layer pattern, an
    unknown rope scaling, ...) are refused by name.

    weight_type: the GGUF type of the weight matrices (F32, F16, BF16, Q4_0,
    Q5_0, Q8_0, IQ4_NL, TQ1_0, TQ2_0, Q2_K, Q3_K, Q4_K, Q5_K); what each memboost format
    becomes is `gguf_type_for`'s rule. Norms and biases stay F32.
    output_type: type of the output matrix (lm_head, or the token embedding
    when tied); default Q8_0 when weight_type has fewer than 8 bits (the
    output is the most error-sensitive matrix; llama.cpp's quantizer keeps
    it at 6 bits or more too) or when lm_head is an int8 layer (quantize_model's
    default; its values and scales are copied into Q8_0 unchanged), else
    weight_type. The float token embedding of a model with an int8 lm_head
    gets output_type too, as when the two were tied.
    tokenizer: the model's Hugging Face tokenizer (fast); without it the
    file has no vocabulary.
    calibration: memboost.calibrate(model, batches) of the model (layer name
    -> mean square of each input channel; a full second moment is taken by
    its diagonal; of an NF4 or other memboost-quantized model,
    calibrate(..., quantized=True)): the Q4_0, Q5_0 and IQ4_NL scale
    searches then weigh each weight's error by its input channel's
    activations (llama.cpp's importance matrix), which lowers the error
    where the model looks. An NF4 model keeps its behaviour in Q5_0 with
    a calibration (gguf_type_for).
    progress: a progress bar (default: for models over 100 M weights);
    verbose: print the per-tensor table and a summary.
    correctors: what becomes of the low-rank correctors of a healed model
    (memboost.heal): "merge" (default) merges each into its weight, which is
    then converted as a float weight; "adapter" leaves them out (the codes
    converted as without them, e.g. ternary trits copied into TQ2_0): write
    them with export_lora_adapter and give llama.cpp both files.

    Everything is converted and checked before the file is opened; it is
    written to a temporary name, fsync'ed and renamed, so an error leaves no
    partial file. Raises MemboostError naming the problem (architecture,
    type, row length, config key, path).
    """
    gguf = _gguf()
    weight_type = _check_weight_type(weight_type)
    if correctors not in ("merge", "adapter"):
        raise MemboostError(f"'correctors' must be 'merge' or 'adapter', got {correctors!r}")
    weights = list(_weights(model, correctors))
    by_name = dict(weights)
    lm_head, embed = by_name.get("lm_head.weight"), by_name.get("model.embed_tokens.weight")
    int8_head = getattr(lm_head, "format", None) == "int8"
    if output_type is None:
        # an int8 output layer (quantize_model's default) is Q8_0 already: copied, not rounded again
        output_type = "Q8_0" if int8_head or gguf_quants.bits_per_weight(weight_type) < 8 else weight_type
    output_type = _check_weight_type(output_type)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MemboostError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise MemboostError(f"cannot write {path!r}: folder {folder!r} is not writable")
    hp = _hparams(model)
    name = name or getattr(model.config, "_name_or_path", "") or hp.arch
    _check_name_tokens(hp, name, tokenizer)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[hp.arch.upper()], hp.n_layer)

    importance = _importance_by_weight(calibration, by_name)
    tied = lm_head is None or (isinstance(lm_head, torch.Tensor) and isinstance(embed, torch.Tensor)
                               and lm_head.data_ptr() == embed.data_ptr())
    if not tied and not hp.family.output_tensor:
        _check_output_is_embedding(lm_head, embed, hp.arch)
        tied = True  # llama.cpp computes the logits with token_embd: lm_head is not written
    total = sum(math.prod(v.shape) for _, v in weights)
    show_bar = progress if progress is not None else total > 100_000_000

    # Each converted tensor is spilled to an unnamed scratch file beside the
    # output and written from there through a memory map: memory holds one
    # tensor's conversion at a time, not the whole file (a model whose weights
    # are memory-mapped, load_quantized's or memboost.io.streaming.load_mapped's,
    # exports in bounded memory).
    try:
        scratch = tempfile.TemporaryFile(dir=folder)
    except OSError as exc:
        raise MemboostError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    with scratch:
        return _export_spilled(model, path, weight_type, output_type, tokenizer, name, weights, hp, name_map,
                               importance, tied, int8_head, show_bar, verbose, scratch)


def _check_output_is_embedding(lm_head, embed, arch: str) -> None:
    """An architecture whose llama.cpp output is always the token embedding takes an untied lm_head only when it is
    the embedding up to its own rounding (quantize_model's int8 output layer of a tied model): within 5%, where an
    unrelated matrix is ~140% away."""
    def dense(w):
        return (w.dequantize() if hasattr(w, "dequantize") else w).detach().float().cpu()

    if lm_head is not None and embed is not None and tuple(lm_head.shape) == tuple(embed.shape):
        head, emb = dense(lm_head), dense(embed)
        if float((head - emb).norm() / emb.norm().clamp_min(1e-30)) < 0.05:
            return
    raise MemboostError(f"llama.cpp's {arch!r} always computes the logits with the token embedding, but this model's "
                        "lm_head is another matrix (untied); it cannot be exported for it")



def _row_slices(value):
    """`value` (a float matrix or an int8 QuantizedTensor) as slices of whole
    rows (memboost._slices); other quantized formats whole."""
    from ...formats.int8 import Int8QuantizedTensor

    rows, cols = value.shape
    step = rows_per_slice(value.shape)
    if rows <= step or not (isinstance(value, torch.Tensor) or type(value) is Int8QuantizedTensor):
        yield value
        return
    for r in range(0, rows, step):
        if isinstance(value, torch.Tensor):
            yield value[r:r + step]
        else:
            part = {k: t[r:r + step] for k, t in value.tensors.items()}
            yield Int8QuantizedTensor._wrap(part, dict(value.meta, shape=[part["values"].shape[0], cols]))


def _write_atomically(writer, path: str) -> None:
    """Writes a filled GGUFWriter to `path` through atomic_write (a failed
    write leaves no half-written file in place of a good one)."""
    try:
        with atomic_write(path) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
    except OSError as exc:
        raise MemboostError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        writer.close()


def _spill(scratch, data: torch.Tensor, qtype: str):
    """Appends a converted tensor's bytes to `scratch`: (offset, numpy dtype, shape) to read them back."""
    arr = data.contiguous().numpy() if qtype in ("F32", "F16") else data.contiguous().view(torch.uint8).numpy()
    offset = scratch.seek(0, os.SEEK_END)
    arr.tofile(scratch)
    return offset, arr.dtype, arr.shape


def _export_spilled(model, path, weight_type, output_type, tokenizer, name, weights, hp, name_map, importance, tied,
                    int8_head, show_bar, verbose, scratch) -> "GGUFExportReport":
    import numpy as np
    from tqdm.auto import tqdm

    gguf = _gguf()
    converted = []
    rows: List[TensorRow] = []
    for hf_name, value in tqdm(weights, desc="GGUF export", unit="tensor", disable=not show_bar):
        if hf_name == "lm_head.weight" and tied and not hp.family.output_required:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MemboostError(f"tensor {hf_name!r} has no GGUF name for architecture {hp.arch!r}")
        is_matrix = len(value.shape) == 2
        # The token embedding of a model whose output layer quantize_model made
        # int8 (and untied) keeps the output type it had when tied.
        is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and (tied or int8_head))
        role = "output" if is_output else "embedding" if gguf_name == "token_embd.weight" else "matrix"
        wanted = requested_type(role, weight_type, output_type)
        permuted = hp.permute and gguf_name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias"))
        err_sq = src_sq = 0.0
        nbytes = 0
        spilled = None
        # The rows of a large matrix (an 8B model's 128256 x 4096 embedding or
        # output layer) a slice at a time: its float32 copies (source,
        # dequantized bytes, their difference) are then one slice's; the bytes
        # are the same (rows are quantized independently).
        for piece in ([value] if permuted or not is_matrix else _row_slices(value)):
            try:
                data, qtype, source, note, w_src, w_out = _convert(piece, wanted, is_matrix, importance.get(hf_name))
            except MemboostError as exc:
                raise MemboostError(f"tensor {hf_name!r} ({gguf_name}): {exc}") from None
            if permuted:
                heads = hp.n_head if ".attn_q." in gguf_name else hp.n_head_kv
                data = _rope_rows(data, heads)
            if _offset_norm(hp, gguf_name):
                data, note = data + 1, "stored as 1 + weight (llama.cpp's Gemma norms)"
            err_sq += float((w_out - w_src).norm()) ** 2
            src_sq += float(w_src.norm()) ** 2
            at = _spill(scratch, data, qtype)
            if spilled is None:
                spilled = at
            else:   # appended right after the previous slice: one tensor of all the rows
                spilled = (spilled[0], spilled[1], (spilled[2][0] + at[2][0],) + tuple(at[2][1:]))
            nbytes += data.numel() * data.element_size()
            del data, w_src, w_out
        # a model mapped from its files (load_quantized, load_mapped) would otherwise keep every page read
        release_mapped_pages()
        err = math.sqrt(err_sq) / max(math.sqrt(src_sq), 1e-30)
        numel = math.prod(value.shape)
        rows.append(TensorRow(gguf_name, source, qtype, 8.0 * nbytes / numel, err, note, numel, nbytes))
        converted.append((gguf_name, spilled, qtype))

    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp.head_dim, hp.rope_theta, hp.rope_scaling)
        rows.append(TensorRow("rope_freqs.weight", "config", "F32", 32.0, 0.0, "llama3 rope scaling",
                              factors.numel(), 4 * factors.numel()))
        converted.append(("rope_freqs.weight", _spill(scratch, factors, "F32"), "F32"))

    writer = gguf.GGUFWriter(None, hp.arch)
    _add_hparams(writer, hp, weight_type, name)
    tok_notes = _add_tokenizer(writer, tokenizer, hp.n_vocab)
    scratch.flush()
    for gguf_name, (offset, dtype, shape), qtype in converted:
        # One map per tensor: the writer drops each array once written, which unmaps its pages; through one
        # map of the whole scratch file, every page written would stay in this process's resident memory (the
        # whole output's size by the end).
        arr = (np.memmap(scratch, dtype=dtype, mode="r", offset=offset, shape=tuple(shape)) if math.prod(shape)
               else np.empty(shape, dtype))
        if qtype in ("F32", "F16"):
            writer.add_tensor(gguf_name, arr)
        else:
            writer.add_tensor(gguf_name, arr, raw_dtype=gguf.GGMLQuantizationType[qtype])
    _write_atomically(writer, path)
    report = GGUFExportReport(path, hp.arch, weight_type, rows, os.path.getsize(path))
    if verbose:
        print(report.table())
        for note in tok_notes:
            print("note:", note)
        print(report.summary())
    return report


# -- the correctors as a llama.cpp LoRA adapter ------------------------------------
def export_lora_adapter(model, path: str) -> int:
    """Writes the low-rank correctors of a healed model (memboost.heal) as a
    llama.cpp LoRA adapter GGUF (general.type "adapter", adapter.type "lora",
    tensors `<weight>.lora_a` [r, in] and `.lora_b` [out, r] in F32, scale 1),
    to load beside the base exported with export_gguf(..., correctors="adapter"):
    llama.cpp's --lora, llama-cpp-python's lora_path. Returns the number of
    layers written; raises MemboostError when the model has no corrector."""
    from ...nn import QuantizedLinear

    gguf = _gguf()
    hp = _hparams(model)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[hp.arch.upper()], hp.n_layer)
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or not module.weight.tensor().corrector_rank:
            continue
        hf_name = f"{name}.weight"
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise MemboostError(f"tensor {hf_name!r} has no GGUF name for architecture {hp.arch!r}")
        a, b = module.weight.tensor().corrector(torch.float32)
        lora_b = a.cpu()   # [out, r]: the output rows, in llama.cpp's rope order for q and k
        if hp.permute and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            lora_b = _rope_rows(lora_b, hp.n_head if ".attn_q." in gguf_name else hp.n_head_kv)
        pairs.append((gguf_name, b.T.contiguous().cpu(), lora_b.contiguous()))
    if not pairs:
        raise MemboostError("'model' has no low-rank corrector to export (heal it first: memboost.heal)")
    ranks = {a.shape[0] for _, a, _ in pairs}
    writer = gguf.GGUFWriter(None, hp.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales B @ A by alpha / rank, or by 1 when alpha is 0: the corrector is applied as it is
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ranks.pop()) if len(ranks) == 1 else 0.0)
    for gguf_name, lora_a, lora_b in pairs:
        writer.add_tensor(gguf_name + ".lora_a", lora_a.numpy())
        writer.add_tensor(gguf_name + ".lora_b", lora_b.numpy())
    path = os.fspath(path)
    _write_atomically(writer, path)
    return len(pairs)


# -- reading back ------------------------------------------------------------------
def gguf_state_dict(path: str, model) -> Dict[str, torch.Tensor]:
    """The float weights of an exported GGUF file under `model`'s Hugging Face
    names (q/k rows back in Hugging Face order, tied lm_head included): load
    them into a float copy of the model to compute what llama.cpp computes."""
    gguf = _gguf()
    hp = _hparams(model)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[hp.arch.upper()], hp.n_layer)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for hf_name, value in _weights(model):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in tensors:
            if hf_name == "lm_head.weight" and "token_embd.weight" in tensors:
                gguf_name = "token_embd.weight"
            else:
                raise MemboostError(f"{path!r} has no tensor {gguf_name!r} (for {hf_name!r})")
        t = tensors[gguf_name]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(tuple(value.shape))
        if hp.permute and gguf_name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            w = _rope_rows(w, hp.n_head if ".attn_q." in gguf_name else hp.n_head_kv, inverse=True)
        if _offset_norm(hp, gguf_name):
            w = w - 1
        out[hf_name] = w
    return out
