"""Ternary (BitNet b1.58) weights: every weight is s * t with t in {-1, 0, +1}.

    q = memboost.ternary.quantize(w)                     # per-row absmean scales
    q = memboost.ternary.quantize(w, per_row=False)      # BitNet's per-tensor scale
    q = memboost.ternary.quantize(w, group_size=256)     # a scale per 256 input columns
    y = q.linear(x)                                      # exact: equals x @ q.dequantize().T
    y = q.linear(x, act_bits=8)                          # W1.58A8: int8 activations, integer kernel

Quantization (BitNet b1.58, arXiv 2402.17764): gamma = mean(|W|) over the
scale's span (absmean) or max(|W|) (absmax), t = clamp(round(W / (gamma + eps)),
-1, 1), stored scale s = gamma; eps = 1e-5 (BitNet's reference code's clamp)
keeps an all-zero span finite (it stores t = 0, s = 0).

Scales (float32): per tensor (BitNet's choice, for models trained ternary),
per row (the default: for post-training quantization of a float model, whose
rows differ in scale by several times, one tensor scale would round the small
rows to zero), or per group of `group_size` input columns, a multiple of 128
(one 128-trit chunk is what one SIMD load of the kernels covers, so a group
never splits a load; 256 matches GGUF TQ2_0's blocks).

Storage (csrc/common/trits.h): code t + 1, 4 trits per byte, rows padded to
128-trit chunks of 32 bytes, trit 32*s + m of a chunk in byte m at bits 2s;
GGUF TQ2_0's byte order. `avg_bits` counts every stored byte: 2 bits per
weight plus the scales, the padding and the metadata.
"""

from typing import Optional

import torch

from .. import ops, reference
from .._slices import row_slices
from ..errors import MemboostError, MemboostTypeError, check_float_weight
from .tensor import QuantizedTensor, dtype_name

EPS = 1e-5
METHODS = ("absmean", "absmax")
CHUNK = reference.TERNARY_CHUNK  # 128 trits, 32 bytes
_ACT_BITS = {None: 0, 8: 8}


def _check_group_size(group_size, in_features: Optional[int] = None) -> int:
    """group_size None -> 0 (no groups), else a positive multiple of 128."""
    if group_size is None:
        return 0
    if type(group_size) is not int or group_size <= 0 or group_size % CHUNK:
        raise MemboostError(f"'group_size' must be None or a positive multiple of {CHUNK} (a group holds whole "
                            f"128-trit chunks), got {group_size!r}")
    return group_size


def check_act_bits(act_bits) -> Optional[int]:
    if act_bits not in _ACT_BITS or isinstance(act_bits, bool):
        raise MemboostError(f"'act_bits' must be None (exact float activations) or 8 (int8 activations), "
                            f"got {act_bits!r}")
    return act_bits


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else -(-in_features // group_size)


class TernaryQuantizedTensor(QuantizedTensor):
    format = "ternary"
    version = 1
    tensor_names = ("packed", "scales")

    @property
    def group_size(self) -> int:
        """0: one scale per row or for the whole tensor; else columns per scale."""
        return int(self.meta["group_size"])

    @property
    def granularity(self) -> str:
        if self.group_size:
            return f"group{self.group_size}"
        return "tensor" if self.tensors["scales"].shape[0] == 1 and self.shape[0] != 1 else "row"

    @classmethod
    def zeros(cls, shape, dtype=torch.float16, group_size: Optional[int] = None, per_row: bool = True,
              device=None) -> "TernaryQuantizedTensor":
        """A valid all-zero weight of this shape (what a layer holds before load_state_dict)."""
        n, k = shape
        gs = _check_group_size(group_size)
        packed = torch.full((n, reference.ternary_row_bytes(k)), 0x55, dtype=torch.uint8, device=device)
        scale_rows = n if (per_row or gs) else 1
        scales = torch.zeros(scale_rows, num_groups(k, gs), dtype=torch.float32, device=device)
        return cls({"packed": packed, "scales": scales}, {"shape": [n, k], "dtype": dtype_name(dtype), "group_size": gs})

    def trits(self) -> torch.Tensor:
        """The int8 trits [out, in] in {-1, 0, 1}."""
        return ops.ternary_unpack(self.tensors["packed"], self.shape[1])

    def dequantize(self) -> torch.Tensor:
        return ops.ternary_dequantize(self.tensors["packed"], self.tensors["scales"], self.shape[1], self.group_size,
                                      self.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None
               ) -> torch.Tensor:
        """x @ W.T + bias from the packed weight. act_bits=None: exact (float
        activations); act_bits=8: each row of x quantized to int8 with one
        scale (BitNet's W1.58A8) and integer kernels on the CPU."""
        return ops.ternary_linear(x, self.tensors["packed"], self.tensors["scales"], bias, self.shape[1],
                                  self.group_size, _ACT_BITS[check_act_bits(act_bits)])

    def linear_bound(self, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None):
        return ops.ternary_linear_bound(self.tensors["packed"], self.tensors["scales"], bias, self.shape[1],
                                        self.group_size, _ACT_BITS[check_act_bits(act_bits)])

    def _repr_fields(self) -> dict:
        fields = {"scales": self.granularity}
        if "method" in self.meta:
            fields["method"] = self.meta["method"]
        return fields

    def _validate(self) -> None:
        meta, t = self.meta, self.tensors
        for key in ("shape", "dtype", "group_size"):
            if key not in meta:
                raise MemboostError(f"ternary format metadata is missing '{key}'")
        shape, gs = meta["shape"], meta["group_size"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int for s in shape)
                and shape[0] >= 0 and shape[1] >= 1):
            raise MemboostError(f"metadata 'shape' must be [out_features, in_features >= 1], got {shape!r}")
        if not (type(gs) is int and gs >= 0 and gs % CHUNK == 0):
            raise MemboostError(f"metadata 'group_size' must be 0 or a positive multiple of {CHUNK}, got {gs!r}")
        if meta.get("method", "absmean") not in METHODS:
            raise MemboostError(f"metadata 'method' must be one of {METHODS}, got {meta['method']!r}")
        self.dtype  # validates the dtype name
        n, k = shape
        packed, scales = t.get("packed"), t.get("scales")
        for name, value, dt in (("packed", packed, torch.uint8), ("scales", scales, torch.float32)):
            if not isinstance(value, torch.Tensor):
                raise MemboostError(f"'{name}' must be a tensor, got {type(value).__name__}")
            if value.dtype != dt:
                raise MemboostError(f"'{name}' must have dtype {dt}, got {value.dtype}")
        row_bytes = reference.ternary_row_bytes(k)
        if tuple(packed.shape) != (n, row_bytes):
            raise MemboostError(f"'packed' must have shape ({n}, {row_bytes}) for a [{n}, {k}] weight (rows padded "
                                f"to 128 trits, 4 per byte), got {tuple(packed.shape)}")
        g = num_groups(k, gs)
        if scales.dim() != 2 or scales.shape[1] != g or scales.shape[0] not in ((1, n) if gs == 0 else (n,)):
            want = f"(1 or {n}, 1)" if gs == 0 else f"({n}, {g})"
            raise MemboostError(f"'scales' must have shape {want} for group_size {gs}, got {tuple(scales.shape)}")
        for name, value in (("packed", packed), ("scales", scales)):  # the kernels read their raw buffers
            if not value.is_contiguous():
                raise MemboostError(f"'{name}' must be contiguous (call .contiguous()), got strides {value.stride()}")
        if packed.device != scales.device:
            raise MemboostError(f"all tensors of a quantized weight must be on one device, got {packed.device} and "
                                f"{scales.device}")
        if not bool(torch.isfinite(scales).all()):
            raise MemboostError("'scales' contains NaN or Inf values")
        _check_codes(packed, k)


_CHECK_SLICE_BYTES = 1 << 20


def _check_codes(packed: torch.Tensor, cols: int) -> None:
    """Code 3 is invalid anywhere; padding past `cols` must hold code 1 (zero)."""
    if packed.numel() == 0:
        return
    p = packed.view(torch.uint8)
    # A slice of rows at a time: checking a model as it loads, whole-weight
    # temporaries (three per layer, freed between layers) left 1.6 GiB of
    # glibc's heap resident after loading an 8B-shaped ternary model.
    for rows in row_slices(p, _CHECK_SLICE_BYTES):
        if bool(((rows & (rows >> 1)) & 0x55).any()):
            raise MemboostError("'packed' holds the invalid 2-bit code 3 (codes are trit + 1: 0, 1 or 2)")
    tail = cols % CHUNK
    if tail:
        last = reference.ternary_codes(p[:, -CHUNK // 4:])[:, tail:]
        if not bool((last == 1).all()):
            raise MemboostError(f"'packed' padding past in_features {cols} must hold code 1 (zero)")


def _check_args(w, method, group_size, per_row, eps):
    check_float_weight(w)
    if w.dim() != 2:
        raise MemboostError(f"'w' must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if method not in METHODS:
        raise MemboostError(f"'method' must be one of {METHODS}, got {method!r}")
    gs = _check_group_size(group_size)
    if not isinstance(per_row, bool):
        raise MemboostTypeError(f"'per_row' must be a bool, got {type(per_row).__name__}")
    if gs and not per_row:
        raise MemboostError("'group_size' gives every row its own group scales: per_row=False cannot be combined "
                            "with it")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise MemboostError(f"'eps' must be a finite number >= 0, got {eps!r}")
    return gs


def quantize(w: torch.Tensor, method: str = "absmean", group_size: Optional[int] = None, per_row: bool = True,
             eps: float = EPS) -> TernaryQuantizedTensor:
    """Ternary quantization of a weight [out_features, in_features] (fp16/bf16/fp32, any device).

    method: "absmean" (BitNet b1.58: gamma = mean |W|) or "absmax" (gamma = max |W|,
    only weights above gamma/2 stay non-zero). Scales: per row (default), per tensor
    (per_row=False, BitNet's), or per group of `group_size` input columns (a multiple
    of 128). t = clamp(round(W / (gamma + eps)), -1, 1), s = gamma.
    """
    gs = _check_args(w, method, group_size, per_row, eps)
    n, k = w.shape
    wf = w.detach().to(torch.float32)
    g = num_groups(k, gs)
    if gs:
        padded = torch.nn.functional.pad(wf.abs(), (0, g * gs - k)).reshape(n, g, gs)
        counts = torch.full((g,), float(gs), device=w.device)
        counts[-1] = k - (g - 1) * gs
        gamma = padded.amax(-1) if method == "absmax" else padded.sum(-1) / counts  # [n, g]
        col_gamma = gamma.repeat_interleave(gs, dim=1)[:, :k]
    else:
        a = wf.abs()
        if per_row:
            gamma = a.amax(1, keepdim=True) if method == "absmax" else a.mean(1, keepdim=True)  # [n, 1]
        else:
            gamma = (a.amax() if method == "absmax" else a.mean()).reshape(1, 1)
        col_gamma = gamma
    t = torch.clamp(torch.round(wf / (col_gamma + eps)), -1, 1).to(torch.int8)
    packed = ops.ternary_pack(t)
    meta = {"shape": [n, k], "dtype": dtype_name(w.dtype), "group_size": gs, "method": method}
    return TernaryQuantizedTensor._wrap({"packed": packed, "scales": gamma.contiguous()}, meta)
