"""Pure-PyTorch oracles for every native op. They define the semantics the
CPU and CUDA kernels must match (tests compare each kernel with these), and
they run on any device, which makes them readable documentation of the bit
layouts too."""

from typing import Optional

import torch


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    n = values.shape[-1]
    pad = (-n) % per_word
    v = torch.nn.functional.pad(values.to(torch.int64) & ((1 << bits) - 1), (0, pad))
    v = v.reshape(*values.shape[:-1], (n + pad) // per_word, per_word)
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int64) * bits
    return _to_int32_bits((v << shifts).sum(-1))


def _unpack(packed: torch.Tensor, num_elements: int, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    v = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1)[..., :num_elements].to(torch.uint8)


def pack_2bit(values: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> int32 [..., ceil(n/16)], element j at bits 2j (LSB first), tail zero-padded."""
    return _pack(values, 2)


def unpack_2bit(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    return _unpack(packed, num_elements, 2)


def pack_4bit(values: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> int32 [..., ceil(n/8)], element j at bits 4j (LSB first), tail zero-padded."""
    return _pack(values, 4)


def unpack_4bit(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    return _unpack(packed, num_elements, 4)


def unpack_bitmask(mask: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [rows, words] bitset -> bool [rows, count] (bit i of word i//32)."""
    bits = (mask.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=mask.device)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :count].bool()


def mixed_dequantize(plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals,
                     group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The mixed 2/4/16-bit format (csrc/common/mixed_format.h) -> W [N, K]."""
    n, k = plane2.shape[0], plane2.shape[1] * 16
    groups = k // group_size
    hi = unpack_2bit(plane2, k).to(torch.int64).reshape(n, groups, group_size)
    four = unpack_bitmask(mask, groups)  # [n, G]
    codes = hi.clone()
    n4 = lowbits.shape[1] * 16 // group_size
    if n4 > 0:
        lo = unpack_2bit(lowbits, n4 * group_size).to(torch.int64).reshape(n, n4, group_size)
        codes[four] = (hi[four] << 2) | lo.reshape(-1, group_size)
    scale_code = (meta & 0xF).to(torch.float32)
    rng = torch.exp2(row_scale[:, :1] + scale_code * row_scale[:, 1:])
    zero = (meta >> 4).to(torch.float32) * torch.where(four, 1.0, 0.25)  # quarter steps in 2-bit groups
    step = rng / torch.where(four, 15.0, 3.0)
    # q * step - zero * step: the same float operations as the kernels
    w = codes.to(torch.float32) * step.unsqueeze(-1) - (zero * step).unsqueeze(-1)
    w = w.reshape(n, k)
    if outlier_vals.numel():
        rows = torch.repeat_interleave(
            torch.arange(n, device=plane2.device), (outlier_rowptr[1:] - outlier_rowptr[:-1]).to(torch.int64)
        )
        cols = outlier_cols.to(torch.int64) & 0xFFFF
        w = w.index_put((rows, cols), outlier_vals.to(torch.float32), accumulate=True)
    return w.to(dtype)


def quantize_activations_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., k] float32 -> its int8 round trip with one scale (absmax / 127)
    per block of `block` values: what the CPU int8 kernels multiply with."""
    xb = x.reshape(*x.shape[:-1], -1, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(xb * (127.0 / xb.abs().amax(-1, keepdim=True))), 0.0)
    return (q * scale).reshape(x.shape)


def mixed_linear(x, plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals,
                 bias: Optional[torch.Tensor], group_size: int, act_bits: int = 0) -> torch.Tensor:
    """x @ W.T + bias in float32 from the dequantized weight, cast to x's dtype.
    act_bits=8 (CPU, batch < 32, group sizes that are multiples of 64): the
    weight's codes meet x quantized to int8 per block of 32; its outliers
    meet the exact x."""
    w = mixed_dequantize(plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals,
                         group_size, torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    xf = x.to(torch.float32)
    rows = xf.numel() // max(xf.shape[-1], 1)
    if act_bits == 8 and group_size % 64 == 0 and rows < 32 and x.device.type == "cpu":
        empty = outlier_vals[:0]
        base = mixed_dequantize(plane2, lowbits, meta, mask, row_scale, torch.zeros_like(outlier_rowptr),
                                outlier_cols[:0], empty, group_size, torch.float32)
        y = torch.nn.functional.linear(quantize_activations_int8(xf, 32), base, b)
        y = y + torch.nn.functional.linear(xf, w - base)
    else:
        y = torch.nn.functional.linear(xf, w, b)
    return y.to(x.dtype)
