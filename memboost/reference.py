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
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)[..., :num_elements].to(torch.uint8)


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
    return bits.reshape(mask.shape[0], mask.shape[1] * 32)[:, :count].bool()


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


def quantize_activations_int8(x: torch.Tensor, block: Optional[int] = None):
    """int8 activations as the CPU kernels compute them (cpu/int8/act_quant.h),
    one scale per row (block None) or per block of `block` values:
    scale = amax / 127, q = round-half-even(x * (127 / amax)), all in float32.
    Returns (q [..., k] holding integers, scale [..., 1] per row or
    [..., k / block, 1] per block)."""
    xf = x.to(torch.float32)
    xb = xf if block is None else xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv).reshape(xf.shape), amax / 127.0


def dequantize_activations_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """The round trip x -> int8 per block of `block` -> float32."""
    q, scale = quantize_activations_int8(x, block)
    return (q.reshape(*q.shape[:-1], q.shape[-1] // block, block) * scale).reshape(q.shape)


def mixed_linear(x, plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals,
                 bias: Optional[torch.Tensor], group_size: int, act_bits: int = 0) -> torch.Tensor:
    """x @ W.T + bias in float32 from the dequantized weight, cast to x's dtype.
    act_bits=8 (CPU, any batch, group sizes that are multiples of 64): the
    weight's codes meet x quantized to int8 per block of 32; its outliers
    meet the exact x."""
    w = mixed_dequantize(plane2, lowbits, meta, mask, row_scale, outlier_rowptr, outlier_cols, outlier_vals,
                         group_size, torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    xf = x.to(torch.float32)
    rows = xf.numel() // max(xf.shape[-1], 1)
    if act_bits == 8 and group_size % 64 == 0 and x.device.type == "cpu":
        empty = outlier_vals[:0]
        base = mixed_dequantize(plane2, lowbits, meta, mask, row_scale, torch.zeros_like(outlier_rowptr),
                                outlier_cols[:0], empty, group_size, torch.float32)
        y = torch.nn.functional.linear(dequantize_activations_int8(xf, 32), base, b)
        y = y + torch.nn.functional.linear(xf, w - base)
    else:
        y = torch.nn.functional.linear(xf, w, b)
    return y.to(x.dtype)


# -- ternary (BitNet b1.58), layout in csrc/common/trits.h -------------------
TERNARY_CHUNK = 128  # trits per chunk: 32 bytes, trit 32*s + m in byte m at bits 2s..2s+1
_TRIT_SHIFTS = (0, 2, 4, 6)


def ternary_row_bytes(cols: int) -> int:
    """Packed bytes per row: cols padded to a multiple of 128 trits, 4 per byte."""
    return (cols + TERNARY_CHUNK - 1) // TERNARY_CHUNK * (TERNARY_CHUNK // 4)


def ternary_pack(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits [..., K] in {-1, 0, 1} -> uint8 [..., ternary_row_bytes(K)]: code t + 1
    (0, 1, 2), rows padded with code 1 to 128-trit chunks; in a chunk, trit 32*s + m
    is byte m, bits 2s..2s+1 (GGUF TQ2_0's qs order)."""
    k = trits.shape[-1]
    chunks = ternary_row_bytes(k) // 32
    codes = torch.nn.functional.pad(trits.to(torch.int64) + 1, (0, chunks * TERNARY_CHUNK - k), value=1)
    codes = codes.reshape(*trits.shape[:-1], chunks, 4, 32)
    shifts = torch.tensor(_TRIT_SHIFTS, device=trits.device, dtype=torch.int64).reshape(4, 1)
    return (codes << shifts).sum(-2).reshape(*trits.shape[:-1], chunks * 32).to(torch.uint8)


def ternary_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C*32] -> the 2-bit codes (int64) [..., C*128], padding included."""
    shifts = torch.tensor(_TRIT_SHIFTS, device=packed.device, dtype=torch.int64).reshape(4, 1)
    chunks = packed.shape[-1] // 32  # explicit sizes: a -1 is ambiguous for zero rows
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], chunks, 1, 32)
    return ((p >> shifts) & 3).reshape(*packed.shape[:-1], chunks * TERNARY_CHUNK)


def ternary_unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [..., ternary_row_bytes(cols)] -> int8 trits [..., cols] (code - 1)."""
    return (ternary_codes(packed)[..., :cols] - 1).to(torch.int8)


def _ternary_column_scales(scales: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """float32 [N or 1, groups] -> the scale of every column [N or 1, cols]."""
    if group_size == 0:
        return scales[:, :1].expand(scales.shape[0], cols)
    # indexed, not repeat_interleave'd: a group far longer than the row must not allocate its length
    return scales[:, torch.arange(cols, device=scales.device) // group_size]


def ternary_dequantize(packed, scales, cols: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, cols] = scale * trit, scales per tensor / row ([1 or N, 1], group_size 0) or per
    group of group_size consecutive columns ([N, ceil(cols / group_size)])."""
    t = ternary_unpack(packed, cols).to(torch.float32)
    return (t * _ternary_column_scales(scales, cols, group_size)).to(dtype)


def ternary_linear(x, packed, scales, bias: Optional[torch.Tensor], cols: int, group_size: int,
                   act_bits: int) -> torch.Tensor:
    """x @ W.T + bias. act_bits 0: in float32 from the dequantized weight. act_bits 8
    (W1.58A8): each row of x quantized to int8 with one scale; per group the exact
    integer dot of trits and int8 values, times the group's scale; summed over
    groups in float32 and times the activation scale."""
    n = packed.shape[0]
    b = None if bias is None else bias.to(torch.float32)
    if act_bits == 0:
        w = ternary_dequantize(packed, scales, cols, group_size, torch.float32)
        return torch.nn.functional.linear(x.to(torch.float32), w, b).to(x.dtype)
    if act_bits != 8:
        raise ValueError(f"'act_bits' must be 0 or 8, got {act_bits}")
    xr = x.reshape(-1, cols)
    q, xscale = quantize_activations_int8(xr)
    gs = group_size if group_size > 0 else cols
    groups = (cols + gs - 1) // gs
    pad = groups * gs - cols
    t = torch.nn.functional.pad(ternary_unpack(packed, cols).to(torch.float64), (0, pad)).reshape(n, groups, gs)
    qg = torch.nn.functional.pad(q.to(torch.float64), (0, pad)).reshape(-1, groups, gs)
    idot = torch.einsum("ngk,mgk->mng", t, qg).to(torch.float32)  # exact integers (float64 below 2**53)
    s = scales.to(torch.float32).expand(n, groups) if scales.shape[0] == 1 else scales.to(torch.float32)
    y = (idot * s).sum(-1) * xscale
    if b is not None:
        y = y + b
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def lort_linear(x, packed, alpha, A, B, bias: Optional[torch.Tensor], cols: int, act_bits: int) -> torch.Tensor:
    """x @ (alpha * T + A @ B.T).T + bias: ternary_linear (group_size 0) in
    float32, plus (x @ B) @ A.T in float32, one rounding to x's dtype."""
    xf = x.to(torch.float32)
    y = ternary_linear(xf, packed, alpha, None, cols, 0, act_bits)
    y = y + (xf @ B.to(torch.float32)) @ A.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def low_rank_linear(x, A, B, base: Optional[torch.Tensor]) -> torch.Tensor:
    """base + (x @ B) @ A.T in float32, one rounding to x's dtype."""
    xf = x.to(torch.float32)
    y = (xf @ B.to(torch.float32)) @ A.to(torch.float32).T
    if base is not None:
        y = base.to(torch.float32) + y
    return y.to(x.dtype)


# ---------------------------------------------------------------------- NF4
# Layout and rounding: csrc/common/nf4.h. These follow bitsandbytes' pure
# PyTorch backend, which the tests check byte for byte.

NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_CODE = 7
NF4_NESTED_BLOCK_SIZE = 256
NF4_NESTED_GRID_POINTS = 65536  # bitsandbytes' CPU kernel snaps to this grid (csrc/common/nf4.h)


def nf4_codebook(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def nf4_codebook_int8(device=None) -> torch.Tensor:
    """The codebook x 127 rounded (the integer CPU path's weight values)."""
    return torch.round(nf4_codebook(device) * 127).to(torch.int8)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (float32 [256], sorted), the
    code of the double quantization: for exponents e = 0..6 the 2^e midpoints
    of 2^e + 1 evenly spaced points in [0.1, 1] (float32), times 10^(e - 6),
    with both signs; then 0 and 1. Built with the same float32 operations as
    bitsandbytes, so the values agree bit for bit."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist()
        values += (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _blockwise_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, block_size).amax(1)


def _per_element(stat: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    # indexed, not repeat_interleave'd: a block far longer than n must not allocate its length
    return stat[torch.arange(n, device=stat.device) // block_size]


def nf4_quantize(w: torch.Tensor, block_size: int):
    """-> (codes uint8 [ceil(n/2)], absmax float32 [ceil(n/block_size)])."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    absmax = _blockwise_absmax(flat, block_size)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = torch.clamp(flat * _per_element(inv, n, block_size), -1, 1)
    book = nf4_codebook(w.device)
    codes = torch.bucketize(scaled, (book[:-1] + book[1:]) / 2).to(torch.uint8)  # ties go to the lower code
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    return (codes[0::2] << 4) | codes[1::2], absmax


def nf4_quantize_absmax(absmax: torch.Tensor, offset: torch.Tensor, nested_map: torch.Tensor, block_size: int):
    """Double quantization: (absmax - offset) blockwise to an entry of
    nested_map, chosen as bitsandbytes' CPU kernel chooses it (csrc/common/nf4.h,
    nested_map_code): the scaled value is snapped to the nearest of 65,536 evenly
    spaced points of [-1, 1] first, then the entry nearest to that point is
    taken (ties low); an all-zero block takes code 0.
    -> (codes uint8 [len], nested_absmax float32)."""
    centred = absmax.float() - offset.float().reshape(())
    n = centred.numel()
    nested = _blockwise_absmax(centred, block_size)
    inv = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))
    scaled = torch.clamp(centred * _per_element(inv, n, block_size), -1, 1)
    # each step a separate float32 op (rounded, no fused multiply-add), as in the kernel
    index = ((scaled + 1.0) * 0.5 * (NF4_NESTED_GRID_POINTS - 1) + 0.5).to(torch.int32)
    point = -1.0 + (2.0 * index.float()) / (NF4_NESTED_GRID_POINTS - 1)
    codes = torch.bucketize(point, 0.5 * (nested_map[:-1] + nested_map[1:])).to(torch.uint8)
    codes[_per_element(inv, n, block_size) == 0] = 0
    return codes, nested


def nf4_block_scales(absmax, nested_absmax, nested_map, nested_offset, nested_block_size: int) -> torch.Tensor:
    """float32 scale per block: absmax itself, or map[code] * nested + offset
    (rounded after the product and after the sum)."""
    if absmax.dtype == torch.float32:
        return absmax
    n = absmax.numel()
    scales = nested_map[absmax.long()] * _per_element(nested_absmax, n, nested_block_size)
    return scales + nested_offset.reshape(())


def nf4_unpack_codes(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(n/2)] -> int64 [n]: element 2i is the high nibble of byte i."""
    return torch.stack([codes >> 4, codes & 0xF], dim=1).reshape(-1)[:numel].long()


def nf4_dequantize(codes, absmax, nested_absmax, nested_map, nested_offset, numel: int, block_size: int,
                   nested_block_size: int, dtype: torch.dtype) -> torch.Tensor:
    scales = nf4_block_scales(absmax, nested_absmax, nested_map, nested_offset, nested_block_size)
    values = nf4_codebook(codes.device)[nf4_unpack_codes(codes, numel)]
    return (values * _per_element(scales, numel, block_size)).to(dtype)


def nf4_linear(x, codes, absmax, nested_absmax, nested_map, nested_offset, out_features: int, block_size: int,
               nested_block_size: int, bias: Optional[torch.Tensor], act_bits: int) -> torch.Tensor:
    """act_bits 0: x @ W.T in float32. act_bits 8 where the CPU kernel has its
    integer path (CPU; k and block_size multiples of 64, k a multiple of
    block_size): W with the int8 codebook (/127), x rounded per row to int8.
    Elsewhere (the GPU, other shapes) the kernels compute act_bits 8 exactly."""
    if act_bits not in (0, 8):
        raise ValueError(f"'act_bits' must be 0 or 8, got {act_bits}")
    k = x.shape[-1]
    n = out_features * k
    xf = x.reshape(-1, k).float()
    integer_path = (act_bits == 8 and x.device.type == "cpu" and k % 64 == 0 and block_size % 64 == 0
                    and k % block_size == 0)
    if integer_path:
        scales = nf4_block_scales(absmax, nested_absmax, nested_map, nested_offset, nested_block_size)
        values = nf4_codebook_int8(codes.device).float()[nf4_unpack_codes(codes, n)] / 127
        w = (values * _per_element(scales, n, block_size)).view(out_features, k)
        q, step = quantize_activations_int8(xf)  # one scale per row
        xf = q * step
    else:
        w = nf4_dequantize(codes, absmax, nested_absmax, nested_map, nested_offset, n, block_size,
                           nested_block_size, torch.float32).view(out_features, k)
    y = xf @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: bool = False) -> torch.Tensor:
    """memboost::rms_norm in plain PyTorch: transformers' LlamaRMSNorm
    (weight_offset=False) and GemmaRMSNorm (True) forward."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_attention(q, k, v, cos, sin, key_cache, value_cache, start: int, key_mask, scale: float) -> torch.Tensor:
    """memboost::decode_attention in plain PyTorch: transformers' rotary
    (apply_rotary_pos_emb with rotate_half), the cache writes, then grouped
    attention over keys 0..start in float32. Writes the caches in place."""
    batch, dim = q.shape[0], cos.shape[-1]
    kv_heads = key_cache.shape[1]
    heads = q.shape[-1] // dim
    c, s = cos.float().view(batch, 1, dim), sin.float().view(batch, 1, dim)
    qh = q.float().view(batch, heads, dim)
    kh = k.float().view(batch, kv_heads, dim)
    qr = qh * c + _rotate_half(qh) * s
    kr = kh * c + _rotate_half(kh) * s
    key_cache[:batch, :, start] = kr.to(key_cache.dtype)
    value_cache[:batch, :, start] = v.view(batch, kv_heads, dim)
    keys = key_cache[:batch, :, :start + 1].float().repeat_interleave(heads // kv_heads, dim=1)
    values = value_cache[:batch, :, :start + 1].float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhd,bhjd->bhj", qr, keys) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:batch, None, :start + 1], float("-inf"))
    out = torch.einsum("bhj,bhjd->bhd", torch.softmax(scores, dim=-1), values)
    return out.reshape(batch, 1, heads * dim).to(q.dtype)

# -- int8 weights (llama.cpp's Q8_0 layout; csrc/common/int8_args.h) ---------
INT8_BLOCK = 32  # weights per float16 scale (GGUF's QK8_0)


def q8_0_blocks(x: torch.Tensor):
    """Q8_0 rounding of float32 blocks x [n, 32]: (d float32 [n], a float16
    value; q int8 [n, 32]) with d = fp16(absmax / 127) and q =
    round-half-even(x / d) (x times the float32 reciprocal of the stored d),
    clamped to [-128, 127]; an all-zero block gets d = 0, q = 0. Rounding with
    the stored (fp16) scale, not the exact absmax / 127, makes q the nearest
    codes for the scale the file holds: quantizing the dequantized weight again
    returns the same d and q, so a GGUF Q8_0 export of an int8 weight is
    lossless. The one Q8_0 quantizer: memboost.formats.int8 and the GGUF
    writer (memboost.io.gguf.quants) both call it."""
    d = (x.abs().amax(1) / 127.0).to(torch.float16).to(torch.float32)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))
    q = torch.round(x * inv[:, None]).clamp(-128, 127).to(torch.int8)
    return d, q


def int8_quantize(w: torch.Tensor):
    """w [out, in] (in a multiple of 32) -> (values int8 [out, in], scales float16 [out, in / 32])."""
    n, k = w.shape
    d, q = q8_0_blocks(w.detach().to(torch.float32).reshape(-1, INT8_BLOCK))
    return q.reshape(n, k), d.to(torch.float16).reshape(n, k // INT8_BLOCK)


def int8_dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = values.shape
    w = values.to(torch.float32).reshape(n, k // INT8_BLOCK, INT8_BLOCK) * scales.to(torch.float32)[:, :, None]
    return w.reshape(n, k).to(dtype)


def int8_linear(x, values, scales, bias: Optional[torch.Tensor], act_bits: int = 0) -> torch.Tensor:
    """x @ W.T + bias in float32, cast to x's dtype. act_bits 8 (CPU): x
    quantized to int8 per block of 32 (the activation blocks coincide with
    the weight's), so each block's product is an exact integer dot product
    times the two scales. Elsewhere (the GPU) act_bits 8 is computed exactly."""
    if act_bits not in (0, 8):
        raise ValueError(f"'act_bits' must be 0 or 8, got {act_bits}")
    w = int8_dequantize(values, scales, torch.float32)
    xf = x.to(torch.float32)
    if act_bits == 8 and x.device.type == "cpu" and xf.shape[-1] > 0:
        xf = dequantize_activations_int8(xf, INT8_BLOCK)
    y = torch.nn.functional.linear(xf, w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
