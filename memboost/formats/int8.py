"""int8 weights in llama.cpp's Q8_0 layout: 8.5 bits per weight, for the
output layer (lm_head) of a model quantized for generation, as llama.cpp
stores its output tensor.

    q = memboost.int8.quantize(w)          # w [out, in], in a multiple of 32
    y = q.linear(x)                        # exact: equals x @ q.dequantize().T
    y = q.linear(x, act_bits=8)            # int8 activations per block of 32, integer kernel (CPU)

Quantization (GGUF's Q8_0, memboost.reference.q8_0_blocks): per block of
32 weights along in_features, d = fp16(absmax / 127) and q =
round-half-even(w / d) with the stored d, so a GGUF export writes the very
same numbers as Q8_0 (memboost.io.gguf) and re-quantizing the dequantized
weight returns them.

State tensors: `values` int8 [out, in]; `scales` float16 [out, in / 32].
Metadata: shape, dtype.
"""

from typing import Optional

import torch

from .. import ops, reference
from .._slices import rows_per_slice
from ..errors import MemboostError, check_float_weight
from .tensor import QuantizedTensor, dtype_name
from .ternary import check_act_bits

BLOCK = reference.INT8_BLOCK  # 32


def skip_reason(in_features: int) -> Optional[str]:
    """Why a layer with this many inputs cannot hold an int8 weight (None: it can)."""
    if in_features % BLOCK:
        return f"in_features {in_features} is not a multiple of {BLOCK} (int8 scales blocks of {BLOCK})"
    return None


class Int8QuantizedTensor(QuantizedTensor):
    format = "int8"
    version = 1
    tensor_names = ("values", "scales")

    @classmethod
    def zeros(cls, shape, dtype=torch.float32, device=None) -> "Int8QuantizedTensor":
        """A valid all-zero weight of this shape (what a layer holds before load_state_dict)."""
        n, k = shape
        return cls({"values": torch.zeros(n, k, dtype=torch.int8, device=device),
                    "scales": torch.zeros(n, k // BLOCK, dtype=torch.float16, device=device)},
                   {"shape": [n, k], "dtype": dtype_name(dtype)})

    def dequantize(self) -> torch.Tensor:
        return ops.int8_dequantize(self.tensors["values"], self.tensors["scales"], self.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None
               ) -> torch.Tensor:
        """x @ W.T + bias from the int8 values. act_bits=None: exact float
        (equal to dequantize + F.linear within float rounding); 8: x
        quantized to int8 per block of 32 and int8 x int8 dot products on the
        CPU (llama.cpp's Q8_0 x Q8_0)."""
        return ops.int8_linear(x, self.tensors["values"], self.tensors["scales"], bias,
                               check_act_bits(act_bits) or 0)

    def linear_bound(self, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None):
        return ops.int8_linear_bound(self.tensors["values"], self.tensors["scales"], bias,
                                     check_act_bits(act_bits) or 0)

    def _repr_fields(self) -> dict:
        return {"block_size": BLOCK}

    def _validate(self) -> None:
        meta, t = self.meta, self.tensors
        for key in ("shape", "dtype"):
            if key not in meta:
                raise MemboostError(f"int8 format metadata is missing '{key}'")
        shape = meta["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s >= 0 for s in shape)
                and shape[1] % BLOCK == 0):
            raise MemboostError(f"metadata 'shape' must be [out_features, in_features] with in_features a "
                                f"multiple of {BLOCK}, got {shape!r}")
        self.dtype  # validates the dtype name
        n, k = shape
        for name, dt, want in (("values", torch.int8, (n, k)), ("scales", torch.float16, (n, k // BLOCK))):
            value = t.get(name)
            if not isinstance(value, torch.Tensor):
                raise MemboostError(f"'{name}' must be a tensor, got {type(value).__name__}")
            if value.dtype != dt:
                raise MemboostError(f"'{name}' must have dtype {dt}, got {value.dtype}")
            if tuple(value.shape) != want:
                raise MemboostError(f"'{name}' must have shape {want} for a [{n}, {k}] weight, got "
                                    f"{tuple(value.shape)}")
        if t["values"].device != t["scales"].device:
            raise MemboostError(f"all tensors of a quantized weight must be on one device, got "
                                f"{t['values'].device} and {t['scales'].device}")
        if not bool(torch.isfinite(t["scales"]).all()):
            raise MemboostError("'scales' contains NaN or Inf values")


def quantize(w: torch.Tensor) -> Int8QuantizedTensor:
    """int8 (Q8_0) quantization of a weight [out_features, in_features]
    (fp16/bf16/fp32, any device; in_features a multiple of 32)."""
    check_float_weight(w)
    if w.dim() != 2:
        raise MemboostError(f"'w' must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    why = skip_reason(w.shape[1])
    if why:
        raise MemboostError(f"'w': {why}")
    n, k = w.shape
    values = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scales = torch.empty((n, k // BLOCK), dtype=torch.float16, device=w.device)
    # A slice of rows at a time: the float32 copies are one slice's (64 MiB), not the whole weight's (a
    # 128256 x 4096 output layer's are 2 GiB each). The same bytes as one call.
    rows = rows_per_slice(w.shape)
    for r in range(0, n, rows):
        values[r:r + rows], scales[r:r + rows] = reference.int8_quantize(w[r:r + rows])
    if not bool(torch.isfinite(scales).all()):
        raise MemboostError("'w' has a block whose largest value / 127 overflows float16 (the Q8_0 scale)")
    return Int8QuantizedTensor._wrap({"values": values.contiguous(), "scales": scales.contiguous()},
                                     {"shape": list(w.shape), "dtype": dtype_name(w.dtype)})
