"""memboost: weight quantization for PyTorch (mixed 2/4/16-bit, ternary,
NF4, LoRT), with fused CPU and CUDA kernels.

    import memboost
    q = memboost.quantize(w, ratio_4bit=0.1)     # w: [out, in] fp16/bf16/fp32
    q.avg_bits                                   # every stored bit counted
    w_hat = memboost.dequantize(q)
    y = q.linear(x)                              # x @ w_hat.T without building w_hat
    torch.save(q.state_dict(), "w.pt")
    q2 = memboost.QuantizedTensor.from_state_dict(torch.load("w.pt", weights_only=True))
    stats = memboost.calibrate(model, batches)   # per-layer E[x^2], optional
    report = memboost.quantize_model(model, "mixed", ratio_4bit=0.25, calibration=stats)
    plan = memboost.allocate_ratio_4bit(model, batches, bits=2.9)  # {layer: ratio_4bit}
    text = memboost.generate(model, "The moon is", tokenizer=tok)  # static-cache decode loop
    memboost.heal(model, float_model, batches, rank=16, steps=200)    # low-rank correctors, distilled

Every error for bad input is a memboost.MemboostError (a ValueError).
"""

import sys

import torch

from ._version import __version__
from .errors import MemboostError, MemboostTypeError
from ._native import build_info, cuda_kernels_usable
from . import ops, reference
from .formats import int8, lort, mixed, nf4, ternary
from .formats.tensor import QuantizedTensor
from .formats.mixed import MixedQuantizedTensor, quantize
from .formats.ternary import TernaryQuantizedTensor
from .formats.nf4 import NF4QuantizedTensor
from .formats.int8 import Int8QuantizedTensor
from .formats.lort import LoRTQuantizedTensor
from . import nn
from .model import (QuantizationReport, allocate_ratio_4bit, calibrate, load_quantized_, output_sensitivity,
                    quantize_linears_, quantize_model)
from .io import load_quantized, load_safetensors, save_quantized, save_safetensors
from .io.gguf import export_gguf
from . import runtime
from .runtime import Decoder, generate
from .train import distributed, qlora, vsa
from .train.heal import HealReport, heal
from . import testbed, tritter

# Module paths from before the regrouping into formats/, model/, io/ and
# train/ (memboost.nf4, memboost.gguf, ...) stay importable and reachable as attributes.
for _old, _module in {
    "tensor": "formats.tensor", "mixed": "formats.mixed", "ternary": "formats.ternary", "nf4": "formats.nf4",
    "lort": "formats.lort", "int8": "formats.int8", "allocate": "model.plan", "serialization": "io.serialization",
    "checkpoint": "io.checkpoint", "gguf": "io.gguf.export", "gguf_quants": "io.gguf.quants",
    "qlora": "train.qlora", "vsa": "train.vsa", "distributed": "train.distributed",
}.items():
    sys.modules.setdefault(f"{__name__}.{_old}", sys.modules[f"{__name__}.{_module}"])
    globals().setdefault(_old, sys.modules[f"{__name__}.{_module}"])
del _old, _module

__all__ = [
    "QuantizedTensor", "MixedQuantizedTensor", "quantize", "dequantize", "pack_2bit", "unpack_2bit",
    "pack_4bit", "unpack_4bit", "build_info", "cuda_kernels_usable", "nn", "ops", "reference", "calibrate",
    "quantize_linears_", "quantize_model", "QuantizationReport", "load_quantized_", "save_safetensors",
    "load_safetensors", "heal", "HealReport", "MemboostError", "MemboostTypeError", "testbed", "save_quantized", "load_quantized",
    "ternary", "TernaryQuantizedTensor", "tritter", "vsa", "distributed", "nf4", "NF4QuantizedTensor", "qlora",
    "lort", "LoRTQuantizedTensor", "int8", "Int8QuantizedTensor", "export_gguf", "allocate_ratio_4bit", "output_sensitivity", "runtime", "Decoder",
    "generate",
]


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The weight back in its original dtype and on q's device, outliers included."""
    if not isinstance(q, QuantizedTensor):
        raise MemboostTypeError(f"'q' must be a QuantizedTensor, got {type(q).__name__}")
    return q.dequantize()


def _check_codes(values: torch.Tensor, bits: int) -> None:
    if not isinstance(values, torch.Tensor) or values.dtype != torch.uint8:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise MemboostTypeError(f"'values' must be a torch.uint8 tensor, got {got}")
    if values.numel() and int(values.max()) >= (1 << bits):
        raise MemboostError(f"'values' must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
                         f"got a maximum of {int(values.max())}")


def pack_2bit(values: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..3 [..., n] -> int32 [..., ceil(n/16)]: 16 per word, element
    j at bits 2j..2j+1 (LSB first). A length that is not a multiple of 16 is
    zero-padded; pass the original length to unpack_2bit."""
    _check_codes(values, 2)
    return ops.pack_2bit(values)


def unpack_2bit(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    """int32 [..., w] -> uint8 [..., num_elements] (num_elements <= 16*w)."""
    return ops.unpack_2bit(packed, num_elements)


def pack_4bit(values: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., n] -> int32 [..., ceil(n/8)]: 8 per word, element
    j at bits 4j..4j+3 (LSB first); tail zero-padded like pack_2bit."""
    _check_codes(values, 4)
    return ops.pack_4bit(values)


def unpack_4bit(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    """int32 [..., w] -> uint8 [..., num_elements] (num_elements <= 8*w)."""
    return ops.unpack_4bit(packed, num_elements)


# --- Hugging Face transformers registration (memboost.integrations) -----------
# Registers quant_method "memboost" with transformers once transformers loads
# its quantizer registry; never imports transformers itself (about 2 s).
from .integrations import watch_transformers as _watch_transformers

_watch_transformers()
# --- end of transformers registration ---------------------------------------
