"""Thin wrappers over torch.ops.memboost plus the fake (meta) kernels that let
the ops run under torch.compile and FakeTensor tracing. The schemas are in
csrc/registration.cpp; pure-PyTorch references are in memboost/reference.py."""

from typing import Optional

import torch

from . import _native  # noqa: F401  (loads the library before registering fakes)

_ops = torch.ops.memboost


def _check_one_device(op: str, names, args) -> None:
    """Every tensor argument of an op on one device, as the C++ checks
    (MB_CHECK_SAME_DEVICE) require: here too for the meta device, where
    the dispatcher calls the fake kernel instead of a C++ one."""
    first = None
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            if first is None:
                first = (name, value.device)
            elif value.device != first[1]:
                raise ValueError(f"memboost::{op}: '{name}' is on {value.device} but '{first[0]}' is on {first[1]}")


def _register_fake(op: str):
    """torch.library.register_fake for memboost::op, after the device check every op makes."""
    names = [a.name for a in getattr(_ops, op).default._schema.arguments]

    def register(fake):
        def checked(*args, **kwargs):
            _check_one_device(op, names, args)
            return fake(*args, **kwargs)

        torch.library.register_fake(f"memboost::{op}")(checked)
        return fake

    return register


def _packed_words(n: int, per_word: int) -> int:
    return (n + per_word - 1) // per_word


def _fake_pack(per_word: int):
    def fake(values):
        torch._check(values.dtype == torch.uint8, lambda: "values must be uint8")
        return values.new_empty((*values.shape[:-1], _packed_words(values.shape[-1], per_word)), dtype=torch.int32)

    return fake


def _fake_unpack(per_word: int):
    def fake(packed, num_elements):
        torch._check(packed.dtype == torch.int32, lambda: "packed must be int32")
        torch._check(num_elements <= packed.shape[-1] * per_word, lambda: "num_elements too large")
        return packed.new_empty((*packed.shape[:-1], num_elements), dtype=torch.uint8)

    return fake


_register_fake("pack_2bit")(_fake_pack(16))
_register_fake("unpack_2bit")(_fake_unpack(16))
_register_fake("pack_4bit")(_fake_pack(8))
_register_fake("unpack_4bit")(_fake_unpack(8))


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every op computes in and returns


def _call_linear(op, args, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """op(*args) for a *_linear op, below the autograd layer when no gradient
    can flow. The ops' autograd kernels (register_autograd) are Python: on
    every call, even under no_grad, they cost more than the kernel itself
    does on a small layer at batch 1. The quantized weight never requires
    grad, so the product is differentiable only through x and bias; under
    torch.compile the plain call is traced."""
    if (not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad))) \
            and not torch.compiler.is_compiling():
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op(*args)
    return op(*args)


def _bound_linear(op, rest: tuple):
    """x -> op(x, *rest): a *_linear op with every argument but x bound, for
    inference (torch.inference_mode, where the dispatcher skips the autograd
    kernels). A memboost._C.BoundOp: the bound arguments are converted once,
    so a call is one dispatcher call with no per-argument parsing (through
    torch.ops, a dozen arguments cost about 2 us a call, as much as a small
    layer's kernel). torch.compile cannot trace it: compiled code calls the
    format's linear."""
    return _native.C.bind_op(op._schema.name, tuple(rest))


@_register_fake("mixed_dequantize")
def _(plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals, group_size, dtype):
    torch._check_value(dtype in _FLOAT_DTYPES, lambda: f"'dtype' must be float16, bfloat16 or float32, got {dtype}")
    return plane2.new_empty((plane2.shape[0], plane2.shape[1] * 16), dtype=dtype)


@_register_fake("mixed_linear")
def _(x, plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals, bias, group_size,
      act_bits=0):
    torch._check_value(act_bits in (0, 8), lambda: f"'act_bits' must be 0 (exact float) or 8, got {act_bits}")
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(x.shape[-1] == plane2.shape[1] * 16, lambda: "'x' last dimension must equal in_features")
    return x.new_empty((*x.shape[:-1], plane2.shape[0]))


def pack_2bit(values: torch.Tensor) -> torch.Tensor:
    return _ops.pack_2bit.default(values)


def unpack_2bit(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    return _ops.unpack_2bit.default(packed, num_elements)


def pack_4bit(values: torch.Tensor) -> torch.Tensor:
    return _ops.pack_4bit.default(values)


def unpack_4bit(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    return _ops.unpack_4bit.default(packed, num_elements)


def mixed_dequantize(tensors: dict, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    t = tensors
    return _ops.mixed_dequantize.default(
        t["plane2"], t["lowbits"], t["meta"], t["mask"], t["row_scale"],
        t["outlier_rowptr"], t["outlier_cols"], t["outlier_vals"], group_size, dtype,
    )


def _mixed_linear_rest(t: dict, bias: Optional[torch.Tensor], group_size: int, act_bits: int) -> tuple:
    return (t["plane2"], t["lowbits"], t["meta"], t["mask"], t["row_scale"], t["outlier_rowptr"],
            t["outlier_cols"], t["outlier_vals"], bias, group_size, act_bits)


def mixed_linear(x: torch.Tensor, tensors: dict, bias: Optional[torch.Tensor], group_size: int,
                 act_bits: int = 0) -> torch.Tensor:
    return _call_linear(_ops.mixed_linear.default, (x, *_mixed_linear_rest(tensors, bias, group_size, act_bits)),
                        x, bias)


def mixed_linear_bound(tensors: dict, bias: Optional[torch.Tensor], group_size: int, act_bits: int = 0):
    """mixed_linear with everything but x bound (see _bound_linear)."""
    return _bound_linear(_ops.mixed_linear.default, _mixed_linear_rest(tensors, bias, group_size, act_bits))


def _mixed_linear_setup_context(ctx, inputs, output):
    x, *quantized, bias, group_size, act_bits = inputs
    ctx.quantized = quantized
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _mixed_linear_backward(ctx, grad):
    # The quantized weight is frozen: gradients flow to x and bias only
    # (through the exact weight, whatever act_bits the forward used).
    w = _ops.mixed_dequantize.default(*ctx.quantized, ctx.group_size, grad.dtype)
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return (grad_x,) + (None,) * len(ctx.quantized) + (grad_bias, None, None)


torch.library.register_autograd(
    "memboost::mixed_linear", _mixed_linear_backward, setup_context=_mixed_linear_setup_context
)


# -- ternary (layout: csrc/common/trits.h) -----------------------------------
def _ternary_row_bytes(cols: int) -> int:
    return (cols + 127) // 128 * 32


@_register_fake("ternary_pack")
def _(trits):
    torch._check_value(trits.dtype == torch.int8, lambda: f"'trits' must be torch.int8, got {trits.dtype}")
    return trits.new_empty((*trits.shape[:-1], _ternary_row_bytes(trits.shape[-1])), dtype=torch.uint8)


@_register_fake("ternary_unpack")
def _(packed, cols):
    torch._check_value(packed.dtype == torch.uint8, lambda: f"'packed' must be torch.uint8, got {packed.dtype}")
    torch._check_value(packed.shape[-1] == _ternary_row_bytes(cols),
                       lambda: f"'packed' must have last dimension {_ternary_row_bytes(cols)} for cols={cols}")
    return packed.new_empty((*packed.shape[:-1], cols), dtype=torch.int8)


def _check_ternary_fake(packed, scales, cols):
    torch._check_value(packed.dtype == torch.uint8, lambda: f"'packed' must be torch.uint8, got {packed.dtype}")
    torch._check_value(scales.dtype == torch.float32, lambda: f"'scales' must be torch.float32, got {scales.dtype}")
    torch._check_value(packed.shape[-1] == _ternary_row_bytes(cols),
                       lambda: f"'packed' must have {_ternary_row_bytes(cols)} bytes per row for cols={cols}")


@_register_fake("ternary_dequantize")
def _(packed, scales, cols, group_size, dtype):
    _check_ternary_fake(packed, scales, cols)
    torch._check_value(dtype in _FLOAT_DTYPES, lambda: f"'dtype' must be float16, bfloat16 or float32, got {dtype}")
    return packed.new_empty((packed.shape[0], cols), dtype=dtype)


@_register_fake("ternary_linear")
def _(x, packed, scales, bias, cols, group_size, act_bits):
    _check_ternary_fake(packed, scales, cols)
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(x.shape[-1] == cols, lambda: "'x' last dimension must equal in_features")
    torch._check_value(act_bits in (0, 8), lambda: f"'act_bits' must be 0 or 8, got {act_bits}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def ternary_pack(trits: torch.Tensor) -> torch.Tensor:
    return _ops.ternary_pack.default(trits)


def ternary_unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return _ops.ternary_unpack.default(packed, cols)


def ternary_dequantize(packed: torch.Tensor, scales: torch.Tensor, cols: int, group_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    return _ops.ternary_dequantize.default(packed, scales, cols, group_size, dtype)


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                   cols: int, group_size: int, act_bits: int = 0) -> torch.Tensor:
    return _call_linear(_ops.ternary_linear.default, (x, packed, scales, bias, cols, group_size, act_bits), x, bias)


def ternary_linear_bound(packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor], cols: int,
                         group_size: int, act_bits: int = 0):
    """ternary_linear with everything but x bound (see _bound_linear)."""
    return _bound_linear(_ops.ternary_linear.default, (packed, scales, bias, cols, group_size, act_bits))


def _ternary_linear_setup_context(ctx, inputs, output):
    x, packed, scales, bias, cols, group_size, act_bits = inputs
    ctx.weight = (packed, scales, cols, group_size)
    ctx.has_bias = bias is not None


def _ternary_linear_backward(ctx, grad):
    # The ternary weight is frozen: gradients flow to x and bias only. The
    # int8 activation rounding (act_bits=8) is passed straight through, as
    # BitNet trains it.
    w = _ops.ternary_dequantize.default(*ctx.weight, grad.dtype)
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_bias, None, None, None


torch.library.register_autograd(
    "memboost::ternary_linear", _ternary_linear_backward, setup_context=_ternary_linear_setup_context
)


# ---------------------------------------------------------------------- LoRT
@_register_fake("lort_linear")
def _(x, packed, alpha, A, B, bias, cols, act_bits):
    _check_ternary_fake(packed, alpha, cols)
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(x.shape[-1] == cols, lambda: "'x' last dimension must equal in_features")
    torch._check_value(act_bits in (0, 8), lambda: f"'act_bits' must be 0 or 8, got {act_bits}")
    torch._check_value(A.dtype == torch.float16 and B.dtype == torch.float16,
                       lambda: f"'A' and 'B' must be float16, got {A.dtype} and {B.dtype}")
    torch._check_value(A.dim() == 2 and A.shape[0] == packed.shape[0],
                       lambda: "'A' must have shape [out_features, rank]")
    torch._check_value(B.dim() == 2 and B.shape[0] == cols and B.shape[1] == A.shape[1],
                       lambda: "'B' must have shape [in_features, rank]")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def lort_linear(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                bias: Optional[torch.Tensor], cols: int, act_bits: int = 0) -> torch.Tensor:
    return _call_linear(_ops.lort_linear.default, (x, packed, alpha, A, B, bias, cols, act_bits), x, bias)


def lort_linear_bound(packed: torch.Tensor, alpha: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      bias: Optional[torch.Tensor], cols: int, act_bits: int = 0):
    """lort_linear with everything but x bound (see _bound_linear)."""
    return _bound_linear(_ops.lort_linear.default, (packed, alpha, A, B, bias, cols, act_bits))


def _lort_linear_setup_context(ctx, inputs, output):
    x, packed, alpha, A, B, bias, cols, act_bits = inputs
    ctx.weight = (packed, alpha, A, B, cols)
    ctx.has_bias = bias is not None


def _lort_linear_backward(ctx, grad):
    # Gradients to x and bias; the weight (trits, alpha and factors) is frozen
    # here (memboost.heal trains LoRT's factors through its own module).
    packed, alpha, A, B, cols = ctx.weight
    w = _ops.ternary_dequantize.default(packed, alpha, cols, 0, torch.float32).addmm_(A.float(), B.float().T)
    grad_x = grad @ w.to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias, None, None


torch.library.register_autograd(
    "memboost::lort_linear", _lort_linear_backward, setup_context=_lort_linear_setup_context
)


@_register_fake("low_rank_linear")
def _(x, A, B, base):
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(A.dtype in (torch.float16, torch.float32) and B.dtype == A.dtype,
                       lambda: f"'A' and 'B' must both be float16 or float32, got {A.dtype} and {B.dtype}")
    torch._check_value(A.dim() == 2 and B.dim() == 2 and B.shape[1] == A.shape[1],
                       lambda: "'A' [out_features, rank] and 'B' [in_features, rank] must share their rank")
    torch._check_value(x.shape[-1] == B.shape[0], lambda: "'x' last dimension must equal B's rows")
    return x.new_empty((*x.shape[:-1], A.shape[0]))


def low_rank_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """base + (x @ B) @ A.T in one op, for inference (no autograd formula:
    memboost.heal trains correctors through its own module)."""
    return _ops.low_rank_linear.default(x, A, B, base)


def low_rank_linear_bound(A: torch.Tensor, B: torch.Tensor, base_linear):
    """x -> low_rank_linear(x, A, B, base_linear(x)): a bound *_linear op plus
    a low-rank product, for inference (see _bound_linear)."""
    if isinstance(base_linear, _native.C.BoundOp):
        return _native.C.bind_op("memboost::low_rank_linear", (A, B), base_linear)
    op = _ops.low_rank_linear.default

    def call(x: torch.Tensor) -> torch.Tensor:
        return op(x, A, B, base_linear(x))
    return call


# ---------------------------------------------------------------------- NF4
_NF4_MAX_BLOCK_SIZE = 1 << 20  # csrc/common/nf4.h kMaxBlockSize
@_register_fake("nf4_quantize")
def _(w, block_size):
    torch._check_value(w.dtype in _FLOAT_DTYPES, lambda: f"'w' must be float16, bfloat16 or float32, got {w.dtype}")
    torch._check_value(block_size > 0 and block_size % 2 == 0 and block_size <= _NF4_MAX_BLOCK_SIZE,
                       lambda: f"'block_size' must be positive, even and at most {_NF4_MAX_BLOCK_SIZE}")
    n = w.numel()
    return w.new_empty(((n + 1) // 2,), dtype=torch.uint8), w.new_empty(((n + block_size - 1) // block_size,),
                                                                        dtype=torch.float32)


@_register_fake("nf4_quantize_absmax")
def _(absmax, offset, nested_map, block_size):
    torch._check_value(absmax.dtype == torch.float32, lambda: "'absmax' must be float32")
    torch._check_value(0 < block_size <= _NF4_MAX_BLOCK_SIZE, lambda: f"'block_size' must be in [1, {_NF4_MAX_BLOCK_SIZE}]")
    n = absmax.numel()
    return absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty(((n + block_size - 1) // block_size,))


@_register_fake("nf4_dequantize")
def _(codes, absmax, nested_absmax, nested_map, nested_offset, numel, block_size, nested_block_size, dtype):
    torch._check_value(dtype in _FLOAT_DTYPES, lambda: f"'dtype' must be float16, bfloat16 or float32, got {dtype}")
    torch._check_value(codes.dtype == torch.uint8, lambda: "'codes' must be uint8")
    torch._check_value(absmax.dtype in (torch.float32, torch.uint8), lambda: "'absmax' must be float32 or uint8")
    return codes.new_empty((numel,), dtype=dtype)


@_register_fake("nf4_linear")
def _(x, codes, absmax, nested_absmax, nested_map, nested_offset, out_features, block_size, nested_block_size, bias,
      act_bits):
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(codes.dtype == torch.uint8, lambda: "'codes' must be uint8")
    torch._check_value(act_bits in (0, 8), lambda: "'act_bits' must be 0 or 8")
    return x.new_empty((*x.shape[:-1], out_features))


_NF4_STATE = ("codes", "absmax", "nested_absmax", "nested_map", "nested_offset")


def nf4_quantize(w: torch.Tensor, block_size: int):
    return _ops.nf4_quantize.default(w, block_size)


def nf4_quantize_absmax(absmax: torch.Tensor, offset: torch.Tensor, nested_map: torch.Tensor, block_size: int):
    return _ops.nf4_quantize_absmax.default(absmax, offset, nested_map, block_size)


def nf4_dequantize(tensors: dict, numel: int, block_size: int, nested_block_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    return _ops.nf4_dequantize.default(*(tensors[k] for k in _NF4_STATE), numel, block_size, nested_block_size, dtype)


def nf4_linear(x: torch.Tensor, tensors: dict, out_features: int, block_size: int, nested_block_size: int,
               bias: Optional[torch.Tensor] = None, act_bits: int = 0) -> torch.Tensor:
    return _call_linear(_ops.nf4_linear.default, (x, *(tensors[k] for k in _NF4_STATE), out_features, block_size,
                                                   nested_block_size, bias, act_bits), x, bias)


def nf4_linear_bound(tensors: dict, out_features: int, block_size: int, nested_block_size: int,
                     bias: Optional[torch.Tensor] = None, act_bits: int = 0):
    """nf4_linear with everything but x bound (see _bound_linear)."""
    return _bound_linear(_ops.nf4_linear.default, (*(tensors[k] for k in _NF4_STATE), out_features, block_size,
                                                   nested_block_size, bias, act_bits))


def _nf4_linear_setup_context(ctx, inputs, output):
    x, codes, absmax, nested_absmax, nested_map, nested_offset, out_features, block_size, nested_block_size, bias, \
        _act_bits = inputs
    # Only the packed state is kept for backward (no dequantized weight).
    ctx.state = (codes, absmax, nested_absmax, nested_map, nested_offset)
    ctx.dims = (out_features, x.shape[-1], block_size, nested_block_size)
    ctx.has_bias = bias is not None


def _nf4_linear_backward(ctx, grad):
    # The NF4 weight is frozen: gradients flow to x and bias. The weight is
    # dequantized here and freed when backward returns.
    out_features, k, block_size, nested_block_size = ctx.dims
    w = _ops.nf4_dequantize.default(*ctx.state, out_features * k, block_size, nested_block_size, grad.dtype)
    grad_x = grad @ w.view(out_features, k)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return (grad_x,) + (None,) * 8 + (grad_bias, None)


torch.library.register_autograd("memboost::nf4_linear", _nf4_linear_backward, setup_context=_nf4_linear_setup_context)


@_register_fake("rms_norm")
def _(x, weight, eps, weight_offset):
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(weight.dtype == x.dtype, lambda: f"'weight' must have x's dtype {x.dtype}, got {weight.dtype}")
    torch._check_value(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                       lambda: "'weight' must have shape [n] with n x's last dimension")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: bool = False) -> torch.Tensor:
    """RMSNorm over x's last dimension as transformers' Llama-family modules
    compute it (weight_offset=False: weight * (normalized rounded to x's
    dtype)) or Gemma's (True: normalized * (1 + weight), rounded once).
    Inference only (no autograd formula): the decode loop's norm."""
    return _ops.rms_norm.default(x, weight, float(eps), bool(weight_offset))


def rms_norm_bound(weight: torch.Tensor, eps: float, weight_offset: bool = False):
    """x -> rms_norm(x, weight, eps, weight_offset), bound as _bound_linear binds a *_linear op."""
    return _native.C.bind_op("memboost::rms_norm", (weight, float(eps), bool(weight_offset)))


@_register_fake("decode_attention")
def _(q, k, v, cos, sin, key_cache, value_cache, start, key_mask, scale):
    torch._check_value(q.dtype in _FLOAT_DTYPES, lambda: f"'q' must be float16, bfloat16 or float32, got {q.dtype}")
    torch._check_value(q.dim() == 3 and q.shape[1] == 1, lambda: "'q' must have shape [batch, 1, heads * head_dim]")
    torch._check_value(key_cache.dim() == 4 and value_cache.shape == key_cache.shape,
                       lambda: "'key_cache' and 'value_cache' must have one shape [max_batch, kv_heads, length, dim]")
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, start: int,
                     key_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """One decode step of attention over a static KV cache (csrc/registration.cpp
    states the contract): rotary on q and k, k and v written to the caches at
    `start`, each head attending keys 0..start. Inference only."""
    return _ops.decode_attention.default(q, k, v, cos, sin, key_cache, value_cache, start, key_mask, float(scale))

# ----------------------------------------------------- int8 (Q8_0 layout)
def _check_int8_fake(values, scales):
    torch._check_value(values.dtype == torch.int8, lambda: f"'values' must be torch.int8, got {values.dtype}")
    torch._check_value(scales.dtype == torch.float16, lambda: f"'scales' must be torch.float16, got {scales.dtype}")
    torch._check_value(values.dim() == 2 and scales.dim() == 2, lambda: "'values' and 'scales' must be 2-D")
    torch._check_value(values.shape[1] % 32 == 0, lambda: "'values' must have a multiple of 32 columns")
    torch._check_value(scales.shape[0] == values.shape[0] and scales.shape[1] * 32 == values.shape[1],
                       lambda: "'scales' must have shape [out_features, in_features / 32]")


@_register_fake("int8_dequantize")
def _(values, scales, dtype):
    _check_int8_fake(values, scales)
    torch._check_value(dtype in _FLOAT_DTYPES, lambda: f"'dtype' must be float16, bfloat16 or float32, got {dtype}")
    return values.new_empty(values.shape, dtype=dtype)


@_register_fake("int8_linear")
def _(x, values, scales, bias, act_bits=0):
    _check_int8_fake(values, scales)
    torch._check_value(x.dtype in _FLOAT_DTYPES, lambda: f"'x' must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check_value(x.shape[-1] == values.shape[1], lambda: "'x' last dimension must equal in_features")
    torch._check_value(act_bits in (0, 8), lambda: f"'act_bits' must be 0 or 8, got {act_bits}")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def int8_dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _ops.int8_dequantize.default(values, scales, dtype)


def int8_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                act_bits: int = 0) -> torch.Tensor:
    return _call_linear(_ops.int8_linear.default, (x, values, scales, bias, act_bits), x, bias)


def int8_linear_bound(values: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      act_bits: int = 0):
    """int8_linear with everything but x bound (see _bound_linear)."""
    return _bound_linear(_ops.int8_linear.default, (values, scales, bias, act_bits))


def _int8_linear_setup_context(ctx, inputs, output):
    x, values, scales, bias, _act_bits = inputs
    ctx.weight = (values, scales)
    ctx.has_bias = bias is not None


def _int8_linear_backward(ctx, grad):
    # The int8 weight is frozen: gradients flow to x and bias only (int8
    # activation rounding passed straight through).
    w = _ops.int8_dequantize.default(*ctx.weight, grad.dtype)
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_bias, None


torch.library.register_autograd("memboost::int8_linear", _int8_linear_backward,
                                setup_context=_int8_linear_setup_context)
