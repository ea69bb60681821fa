"""The tritter-accel Python API on memboost's kernels.

Code written against tritter-accel runs with one changed import,
`from memboost.tritter import ...`. Every function takes numpy arrays or
torch tensors and returns the kind it was given (a tensor stays on its
device; numpy results are float32 / uint8 as in tritter-accel):

    quantize_weights_absmean(weights)            -> (ternary_weights, scales)   # per-row absmean
    quantize_weights_absmax(weights)             -> (ternary_weights, scales)   # per-row absmax
    pack_ternary_weights(ternary_weights, scales) -> (packed, scales)
    unpack_ternary_weights(packed, scales, shape) -> float weights (scale * trit)
    ternary_matmul(input, packed, scales, shape)  -> input @ weights.T (fused kernel, exact)
    compress_gradients_vsa(gradients, ratio, seed) -> (compressed, seed)         # memboost.vsa
    decompress_gradients_vsa(compressed, dim, seed) -> gradients                # memboost.vsa
    version(), cuda_available_py(), cuda_available()

`ternary_weights` are float32 values in {-1, 0, +1} [out, in], `scales`
float32 [out] (one per row, as tritter-accel), `packed` uint8
[out, ceil(in / 128) * 32] in memboost's trit layout (csrc/common/trits.h:
code t + 1, four per byte, GGUF TQ2_0's byte order), not tritter-accel's
bit order: arrays packed by tritter-accel must be unpacked there and packed
again here.

The rest of tritter-accel maps onto memboost and torch rather than being
rewritten:

- `TernaryLayer` (pre-quantized layer): `memboost.nn.TernaryLinear.from_linear(linear)`,
  or `memboost.quantize_model(model, "ternary")` for a whole model;
  `act_bits=8` gives BitNet's W1.58A8.
- `PackedTernary` / `QuantizationResult`: `memboost.ternary.quantize(w)`, a
  `TernaryQuantizedTensor` (`dequantize()`, `linear(x)`, `state_dict()`).
- `InferenceEngine` and `KVCache`: the Hugging Face model's own `generate()`
  and cache, on a model whose linears `memboost.quantize_model` replaced.
- BF16 mixed-precision helpers: torch's own. Cast with
  `tensor.to(torch.bfloat16)` / `model.to(torch.bfloat16)`; compute in bf16
  with `with torch.autocast("cuda", dtype=torch.bfloat16):` (or `"cpu"`);
  scale losses with `torch.amp.GradScaler("cuda")` (needed for float16,
  harmless for bfloat16).
- `VsaOps`, `GradientCompressor`: `memboost.vsa` (the gradient sketch) and
  `memboost.distributed` (the DDP communication hook).
"""

from typing import Tuple

import numpy as np
import torch

from . import ops, reference
from .errors import MemboostError, MemboostTypeError, check_float_weight
from .formats.ternary import TernaryQuantizedTensor, _check_codes, quantize

__all__ = [
    "quantize_weights_absmean", "quantize_weights_absmax", "pack_ternary_weights", "unpack_ternary_weights",
    "ternary_matmul", "compress_gradients_vsa", "decompress_gradients_vsa", "version", "cuda_available_py",
    "cuda_available",
]


def _tensor(a, name: str, dtype=None) -> Tuple[torch.Tensor, bool]:
    """(tensor, given_as_numpy)."""
    if isinstance(a, torch.Tensor):
        t, was_numpy = a.detach(), False
    elif isinstance(a, np.ndarray):
        t, was_numpy = torch.from_numpy(np.ascontiguousarray(a)), True
    else:
        raise MemboostTypeError(f"'{name}' must be a numpy array or a torch tensor, got {type(a).__name__}")
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t, was_numpy


def _out(t: torch.Tensor, as_numpy: bool):
    return t.cpu().numpy() if as_numpy else t


def _check_2d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise MemboostError(f"'{name}' must be 2-D [out_features, in_features], got shape {tuple(t.shape)}")


def _float_weights(weights, name: str = "weights") -> Tuple[torch.Tensor, bool]:
    t, as_numpy = _tensor(weights, name)
    if not (t.is_floating_point()):
        raise MemboostTypeError(f"'{name}' must hold floating-point values, got {t.dtype}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        t = t.to(torch.float32)
    _check_2d(t, name)
    check_float_weight(t, name)
    return t, as_numpy


def _quantize(weights, method: str):
    w, as_numpy = _float_weights(weights)
    q = quantize(w, method=method)  # per-row scales, as tritter-accel
    trits = q.trits().to(torch.float32)
    return _out(trits, as_numpy), _out(q.tensors["scales"].reshape(-1), as_numpy)


def quantize_weights_absmean(weights):
    """weights [out, in] -> (ternary_weights float32 in {-1, 0, 1}, scales float32 [out]):
    BitNet b1.58 absmean per row, t = clamp(round(w / (mean|w| + eps)), -1, 1)."""
    return _quantize(weights, "absmean")


def quantize_weights_absmax(weights):
    """Like quantize_weights_absmean with the row scale max|w|."""
    return _quantize(weights, "absmax")


def _row_scales(scales, rows: int, device) -> torch.Tensor:
    s, _ = _tensor(scales, "scales", torch.float32)
    if s.dim() == 2 and s.shape[1] == 1:
        s = s.reshape(-1)
    if s.dim() != 1 or s.shape[0] != rows:
        raise MemboostError(f"'scales' must have shape ({rows},) (one per row), got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise MemboostError("'scales' contains NaN or Inf values")
    return s.to(device).contiguous()


def pack_ternary_weights(ternary_weights, scales):
    """(ternary_weights [out, in] in {-1, 0, 1}, scales [out]) -> (packed uint8
    [out, ceil(in / 128) * 32], scales float32 [out]): 16x smaller than float32."""
    t, as_numpy = _tensor(ternary_weights, "ternary_weights")
    _check_2d(t, "ternary_weights")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MemboostError("'ternary_weights' contains NaN or Inf values")
    if t.numel() and not bool(((t == -1) | (t == 0) | (t == 1)).all()):
        raise MemboostError("'ternary_weights' must hold only -1, 0 and +1 (quantize with quantize_weights_absmean)")
    s = _row_scales(scales, t.shape[0], t.device)
    packed = ops.ternary_pack(t.to(torch.int8).contiguous())
    return _out(packed, as_numpy), _out(s, as_numpy)


def _weight(packed, scales, shape) -> Tuple[TernaryQuantizedTensor, bool]:
    p, as_numpy = _tensor(packed, "packed")
    if p.dtype != torch.uint8:
        raise MemboostTypeError(f"'packed' must hold uint8 bytes (from pack_ternary_weights), got {p.dtype}")
    try:
        n, k = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise MemboostTypeError(f"'shape' must be (out_features, in_features), got {shape!r}") from None
    if n < 1 or k < 1:
        raise MemboostError(f"'shape' must be positive, got {tuple(shape)}")
    row_bytes = reference.ternary_row_bytes(k)
    if tuple(p.shape) != (n, row_bytes):
        raise MemboostError(f"'packed' must have shape ({n}, {row_bytes}) for shape ({n}, {k}) (rows padded to 128 "
                            f"trits, 4 per byte), got {tuple(p.shape)}")
    p = p.contiguous()
    _check_codes(p, k)
    s = _row_scales(scales, n, p.device).reshape(n, 1)
    meta = {"shape": [n, k], "dtype": "float32", "group_size": 0}
    return TernaryQuantizedTensor._wrap({"packed": p, "scales": s}, meta), as_numpy


def unpack_ternary_weights(packed, scales, shape):
    """(packed, scales [out], shape (out, in)) -> float32 weights [out, in] = scale * trit."""
    q, as_numpy = _weight(packed, scales, shape)
    return _out(q.dequantize(), as_numpy)


def ternary_matmul(input, packed, scales, shape):
    """input [batch, in] (or [in]) @ weights.T -> [batch, out] (or [out]), straight from
    the packed weights with memboost's fused kernel (exact float path)."""
    q, _ = _weight(packed, scales, shape)
    x, as_numpy = _tensor(input, "input")
    if not x.is_floating_point():
        raise MemboostTypeError(f"'input' must hold floating-point values, got {x.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.to(torch.float32)
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise MemboostError(f"'input' must have last dimension in_features={q.shape[1]}, got shape {tuple(x.shape)}")
    return _out(q.linear(x.to(q.device)), as_numpy)


def compress_gradients_vsa(gradients, ratio, seed):
    """tritter-accel's gradient compression, by memboost.vsa: (compressed, seed)."""
    from .train.vsa import compress_gradients_vsa as compress

    return compress(gradients, ratio, seed)


def decompress_gradients_vsa(compressed, dim, seed):
    """The inverse of compress_gradients_vsa, by memboost.vsa: gradients of length dim."""
    from .train.vsa import decompress_gradients_vsa as decompress

    return decompress(compressed, dim, seed)


def version() -> str:
    """memboost's version."""
    from ._version import __version__

    return __version__


def cuda_available_py() -> bool:
    """Whether memboost's CUDA kernels can run here (compiled in and a GPU present)."""
    from ._native import cuda_kernels_usable

    return bool(cuda_kernels_usable())


cuda_available = cuda_available_py
