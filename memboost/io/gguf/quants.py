"""GGUF (llama.cpp) block quantizers in vectorized PyTorch.

Each quantizer takes a float weight [rows, cols] (cols a multiple of the
type's block) and returns the type's bytes as a uint8 tensor
[rows, cols / block * bytes_per_block], row-major, blocks in order: exactly
what a GGUF file stores for a tensor of that type. The byte layouts are
llama.cpp's (ggml-common.h); `gguf.quants.dequantize` (the `gguf` package's
reference decoder) reads them back, and tests/test_gguf.py checks every
type against it.

The scales are chosen to minimise the squared error of the stored block
(a small search over candidate scales, each refined by least squares over
the codes it selects), not just from the block's largest value: that is
what makes re-quantizing an already-quantized weight (NF4 -> IQ4_NL, say)
lose little.

Types: Q4_0, Q5_0, Q8_0, IQ4_NL (blocks of 32); TQ1_0, TQ2_0, Q2_K, Q3_K,
Q4_K, Q5_K (super-blocks of 256). F32/F16/BF16 are plain casts (`to_float_type`).
"""

from typing import Dict, Optional, Tuple

import torch

from ... import reference

QK = 32      # block of the 32-element types
QK_K = 256   # super-block of the K-quants and the ternary types

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# name -> (elements per block, bytes per block)
BLOCK: Dict[str, Tuple[int, int]] = {
    "Q4_0": (QK, 2 + QK // 2),
    "Q5_0": (QK, 2 + 4 + QK // 2),
    "Q8_0": (QK, 2 + QK),
    "IQ4_NL": (QK, 2 + QK // 2),
    "TQ1_0": (QK_K, 48 + 4 + 2),
    "TQ2_0": (QK_K, QK_K // 4 + 2),
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 4),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q4_K": (QK_K, 4 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 4 + 12 + QK_K // 8 + QK_K // 2),
}
FLOAT_TYPES = ("F32", "F16", "BF16")

# Rows are processed this many weights at a time: the scale search holds a
# few float32 copies of the chunk per candidate.
_CHUNK_WEIGHTS = 1 << 20


def bits_per_weight(qtype: str) -> float:
    if qtype in FLOAT_TYPES:
        return {"F32": 32.0, "F16": 16.0, "BF16": 16.0}[qtype]
    block, nbytes = BLOCK[qtype]
    return 8.0 * nbytes / block


def row_bytes(qtype: str, cols: int) -> int:
    if qtype in FLOAT_TYPES:
        return cols * (4 if qtype == "F32" else 2)
    block, nbytes = BLOCK[qtype]
    return cols // block * nbytes


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float [n] -> uint8 [n, 2]: little-endian IEEE half (GGUF's ggml_fp16_t)."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _f16(d: torch.Tensor) -> torch.Tensor:
    """d rounded to what a half-precision scale field stores, back in float32."""
    return d.to(torch.float16).to(torch.float32)


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of sorted `levels` for every element of x."""
    mids = (levels[1:] + levels[:-1]) * 0.5
    return torch.bucketize(x, mids)


def _symmetric_blocks(x: torch.Tensor, levels: torch.Tensor, n_try: int = 2, lo: float = 0.85, hi: float = 1.0,
                      weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blocks x [n, B] on the grid d * levels (sorted, a zero-crossing set):
    (d float32 [n], already fp16-rounded; codes int64 [n, B]) with the least
    squared error among the candidate scales. Candidates put the block's
    largest-magnitude value at each end of the grid, shrunk by factors in
    [lo, hi]; each candidate's codes get their least-squares scale, and the
    final codes are the nearest ones for the best (stored) scale, which can
    only lower the error further."""
    n = x.shape[0]
    m = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)   # signed value of largest magnitude
    w = torch.ones_like(x) if weights is None else weights
    wx = w * x
    xx = torch.linalg.vecdot(wx, x)
    best_err = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    best_d = torch.zeros(n, dtype=torch.float32, device=x.device)
    uniform = bool((levels[1:] - levels[:-1] == 1).all())
    # More candidates than two per end lower the error by under 0.1% on
    # Gaussian and real weights: the least-squares refit does the work.
    factors = torch.linspace(lo, hi, n_try).tolist() if n_try > 1 else [hi]
    for end in (float(levels[0]), float(levels[-1])):
        for f in factors:
            q = _nearest_values(x, _safe_inv(m / (end * f)), levels, uniform)
            qq, xq = torch.linalg.vecdot(w * q, q), torch.linalg.vecdot(wx, q)
            d = _f16(torch.where(qq > 0, xq / qq.clamp_min(1e-30), torch.zeros_like(xq)))
            err = xx - 2 * d * xq + d * d * qq          # error of these codes at the stored scale
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_d = torch.where(better, d, best_d)
    return best_d, _nearest_codes(x, _safe_inv(best_d), levels, uniform)


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _nearest_values(x: torch.Tensor, inv: torch.Tensor, levels: torch.Tensor, uniform: bool) -> torch.Tensor:
    """The level nearest to x * inv (per block), as a float."""
    y = x * inv[:, None]
    if uniform:
        return torch.round(y).clamp_(float(levels[0]), float(levels[-1]))
    return levels[_nearest(y, levels)]


def _nearest_codes(x: torch.Tensor, inv: torch.Tensor, levels: torch.Tensor, uniform: bool) -> torch.Tensor:
    """Index into `levels` of the level nearest to x * inv (per block)."""
    y = x * inv[:, None]
    if uniform:   # consecutive integers: rounding is the nearest-level search
        return (torch.round(y) - levels[0]).clamp_(0, len(levels) - 1).to(torch.int64)
    return _nearest(y, levels)


def _pack_nibbles_split(codes: torch.Tensor) -> torch.Tensor:
    """codes [n, 32] in 0..15 -> [n, 16]: element j in the low nibble of byte j, j+16 in the high."""
    c = codes.to(torch.uint8)
    return c[:, :16] | (c[:, 16:] << 4)


def _blocks_q4_0(x: torch.Tensor, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    levels = torch.arange(-8, 8, dtype=torch.float32, device=x.device)
    weights = None if importance is None else _iq4_nl_weights(x, importance)
    d, codes = _symmetric_blocks(x, levels, weights=weights)
    return torch.cat([_fp16_bytes(d), _pack_nibbles_split(codes)], 1)


def _blocks_q5_0(x: torch.Tensor, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Q5_0: d * (q - 16), q in 0..31; the low nibbles as Q4_0's, bit j of the
    little-endian uint32 qh the fifth bit of element j."""
    levels = torch.arange(-16, 16, dtype=torch.float32, device=x.device)
    weights = None if importance is None else _iq4_nl_weights(x, importance)
    # a wider scale search than Q4_0's: on NF4-dequantized weights 8 candidates
    # per end down to 0.7 lower the error from 4.5% to 3.8% (llm-like weights)
    d, codes = _symmetric_blocks(x, levels, n_try=8, lo=0.7, weights=weights)
    high = (codes >> 4) & 1
    qh = (high << torch.arange(32, device=x.device)).sum(1)                 # < 2**32, in int64
    qh_bytes = torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], 1).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), qh_bytes, _pack_nibbles_split(codes & 0x0F)], 1)


def _iq4_nl_weights(x: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-weight error weights of the IQ4_NL search (llama.cpp's choice):
    x^2 without calibration; with an importance matrix (E[a^2] of the input
    channel each weight multiplies) importance * sqrt(sigma^2 + x^2), sigma^2
    twice the block's mean square."""
    if importance is None:
        return x * x
    sigma2 = x.square().sum(1, keepdim=True) * (2.0 / x.shape[1])
    return importance * torch.sqrt(sigma2 + x * x)


def _blocks_iq4_nl(x: torch.Tensor, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """IQ4_NL blocks by llama.cpp's search (on SmolLM2 over 99.8% of the
    blocks come out byte-identical to llama.cpp's quantizer; the rest differ
    in float summation order): the block's largest-magnitude
    value is put at the grid's long end (-127) and at 7 steps either side of
    it, each candidate's codes refitted by weighted least squares, the best
    candidate kept; ties between two levels round up, as llama.cpp's
    best_index_int8 does."""
    levels = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=x.device)
    mids = (levels[1:] + levels[:-1]) * 0.5
    w = _iq4_nl_weights(x, importance)
    amax, where = x.abs().max(1)
    m = x.gather(1, where[:, None]).squeeze(1)
    zero = amax < 1e-15
    m = torch.where(zero, torch.ones_like(m), m)

    def fit(inv: torch.Tensor):
        q = levels[torch.bucketize(x * inv[:, None], mids, right=True)]
        wq = w * q
        return torch.linalg.vecdot(wq, x), torch.linalg.vecdot(wq, q)

    sqx, sqq = fit(-levels[0] / m)
    d = sqx / torch.where(sqq > 0, sqq, torch.ones_like(sqq))
    best = d * sqx
    for step in range(-7, 8):
        sqx, sqq = fit((step + levels[0]) / m)
        fitted = sqx / torch.where(sqq > 0, sqq, torch.ones_like(sqq))
        take = (sqq > 0) & (sqx * sqx > best * sqq)
        d, best = torch.where(take, fitted, d), torch.where(take, fitted * sqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    codes = torch.bucketize(x * _safe_inv(d)[:, None], mids, right=True)
    return torch.cat([_fp16_bytes(d), _pack_nibbles_split(codes)], 1)


def _blocks_q8_0(x: torch.Tensor) -> torch.Tensor:
    # 255 levels: the largest value at +-127 is as good as any search finds.
    # The rounding is memboost's int8 weight format's (one Q8_0 quantizer).
    d, q = reference.q8_0_blocks(x)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], 1)


def pack_q8_0(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An int8 weight's values int8 [rows, cols] and float16 scales [rows,
    cols / 32] as GGUF Q8_0 bytes [rows, cols / 32 * 34]: the same numbers,
    so nothing is rounded again."""
    rows, cols = values.shape
    q = values.reshape(-1, QK).view(torch.uint8)
    return torch.cat([_fp16_bytes(scales.reshape(-1)), q], 1).reshape(rows, cols // QK * BLOCK["Q8_0"][1])


def _ternary_blocks(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d [n], codes [n, 256] in {0, 1, 2} = trit + 1) for float blocks."""
    levels = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    # a trit grid wants the scale well below the largest value (absmean-like)
    d, codes = _symmetric_blocks(x, levels, n_try=8, lo=1.0, hi=6.0)
    return d, codes


def pack_tq2_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes [n, 256] (trit + 1), d [n] -> TQ2_0 blocks [n, 66]: element
    128*j + 32*s + m at bits 2s of byte 32*j + m, then the fp16 scale."""
    c = codes.to(torch.uint8).reshape(-1, 2, 4, 32)
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return torch.cat([qs.reshape(-1, 64), _fp16_bytes(d)], 1)


def pack_tq1_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes [n, 256] (trit + 1), d [n] -> TQ1_0 blocks [n, 54]: five trits
    per byte as a base-3 fraction of 256 (elements 32k + m of the first 160
    in byte m, elements 160 + 16k + m in byte 32 + m; the last 16 four to a
    byte in bytes 48..51), then the fp16 scale."""
    c = codes.to(torch.int32)
    n = c.shape[0]

    def fold(part: torch.Tensor, digits: int, width: int) -> torch.Tensor:
        part = part.reshape(n, digits, width)
        weights = torch.tensor([3 ** (4 - k) for k in range(digits)], dtype=torch.int32, device=c.device)
        v = (part * weights[None, :, None]).sum(1)
        return ((v * 256 + 242) // 243).to(torch.uint8)

    qs0 = fold(c[:, :160], 5, 32)
    qs1 = fold(c[:, 160:240], 5, 16)
    qh = fold(c[:, 240:], 4, 4)
    return torch.cat([qs0, qs1, qh, _fp16_bytes(d)], 1)


def _blocks_tq2_0(x: torch.Tensor) -> torch.Tensor:
    d, codes = _ternary_blocks(x)
    return pack_tq2_0(codes, d)


def _blocks_tq1_0(x: torch.Tensor) -> torch.Tensor:
    d, codes = _ternary_blocks(x)
    return pack_tq1_0(codes, d)


# -- K-quants --------------------------------------------------------------
def _pack_2bit_k(codes: torch.Tensor) -> torch.Tensor:
    """codes [n, 256] in 0..3 -> [n, 64]: element 128*h + 32*s + m at bits 2s of byte 32*h + m."""
    c = codes.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def _asymmetric_sub_blocks(x: torch.Tensor, nmax: int, n_try: int = 6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sub-blocks x [n, S] on the grid scale * q - min, q in 0..nmax, min >= 0:
    (scale [n], min [n]) with the least squared error among ranges shrunk
    from [min(x, 0), max(x)] (each refined by least squares)."""
    lo = x.amin(1).clamp_max(0.0)
    hi = x.amax(1)
    best = (torch.full_like(lo, float("inf")), torch.zeros_like(lo), torch.zeros_like(lo))
    for t in torch.linspace(1.0, 0.8, n_try).tolist():
        scale = (hi - lo) * t / nmax
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        q = torch.round((x - lo[:, None]) * inv[:, None]).clamp(0, nmax)
        # least squares for (scale, offset) over these codes, offset kept <= 0
        s = x.shape[1]
        sq, sqq, sx, sqx = q.sum(1), (q * q).sum(1), x.sum(1), (q * x).sum(1)
        det = s * sqq - sq * sq
        a = torch.where(det > 0, (s * sqx - sq * sx) / det.clamp_min(1e-30), scale)
        b = torch.where(det > 0, (sqq * sx - sq * sqx) / det.clamp_min(1e-30), lo)
        b = b.clamp_max(0.0)
        a = a.clamp_min(0.0)
        err = ((x - (a[:, None] * q + b[:, None])) ** 2).sum(1)
        better = err < best[0]
        best = (torch.where(better, err, best[0]), torch.where(better, a, best[1]), torch.where(better, -b, best[2]))
    return best[1], best[2]


def _quantize_sub_scales(values: torch.Tensor, qmax: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values [n, G] -> (fp16-rounded super scale [n], codes [n, G] in 0..qmax)."""
    d = _f16(values.amax(1) / qmax)
    inv = torch.where(d > 0, 1.0 / d.clamp_min(1e-30), torch.zeros_like(d))
    return d, torch.round(values * inv[:, None]).clamp(0, qmax)


def _requantize_asymmetric(x, d, sc, dmin, mc, sub: int, nmax: int) -> torch.Tensor:
    """Codes in 0..nmax for x [n, 256] given the stored super/sub scales and mins."""
    n = x.shape[0]
    scale = (d[:, None] * sc).repeat_interleave(sub, 1)
    offset = (dmin[:, None] * mc).repeat_interleave(sub, 1)
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    return torch.round((x + offset) * inv).clamp(0, nmax).reshape(n, -1)


def _k_scale_bytes(sc: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q4_K / Q5_K from 8 six-bit scales and mins:
    sub-blocks 0..3 in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins);
    sub-blocks 4..7 split: low nibbles in bytes 8..11, top 2 bits over bytes 0..7."""
    sc, mc = sc.to(torch.uint8), mc.to(torch.uint8)
    b0 = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    b1 = (mc[:, :4] & 0x3F) | ((mc[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0x0F) | ((mc[:, 4:] & 0x0F) << 4)
    return torch.cat([b0, b1, b2], 1)


def _blocks_q4_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    scale, mins = _asymmetric_sub_blocks(x.reshape(n * 8, 32), 15)
    d, sc = _quantize_sub_scales(scale.reshape(n, 8), 63)
    dmin, mc = _quantize_sub_scales(mins.reshape(n, 8), 63)
    q = _requantize_asymmetric(x, d, sc, dmin, mc, 32, 15).to(torch.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _k_scale_bytes(sc, mc), qs], 1)


def _blocks_q5_k(x: torch.Tensor) -> torch.Tensor:
    """Q5_K: Q4_K's sub-block scales and mins with 5-bit codes (0..31); the low
    nibbles as Q4_K's, the fifth bits in qh[32]: bit 2p of byte j for element
    64p + j, bit 2p + 1 for element 64p + 32 + j."""
    n = x.shape[0]
    scale, mins = _asymmetric_sub_blocks(x.reshape(n * 8, 32), 31)
    d, sc = _quantize_sub_scales(scale.reshape(n, 8), 63)
    dmin, mc = _quantize_sub_scales(mins.reshape(n, 8), 63)
    q = _requantize_asymmetric(x, d, sc, dmin, mc, 32, 31).to(torch.uint8).reshape(n, 4, 2, 32)
    low, high = q & 0x0F, q >> 4
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    qh = torch.zeros(n, 32, dtype=torch.uint8, device=x.device)
    for p in range(4):
        qh |= (high[:, p, 0] << (2 * p)) | (high[:, p, 1] << (2 * p + 1))
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _k_scale_bytes(sc, mc), qh, qs], 1)


def _blocks_q2_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    scale, mins = _asymmetric_sub_blocks(x.reshape(n * 16, 16), 3)
    d, sc = _quantize_sub_scales(scale.reshape(n, 16), 15)
    dmin, mc = _quantize_sub_scales(mins.reshape(n, 16), 15)
    q = _requantize_asymmetric(x, d, sc, dmin, mc, 16, 3)
    scales = sc.to(torch.uint8) | (mc.to(torch.uint8) << 4)
    return torch.cat([scales, _pack_2bit_k(q), _fp16_bytes(d), _fp16_bytes(dmin)], 1)


def _blocks_q3_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    levels = torch.arange(-4, 4, dtype=torch.float32, device=x.device)
    sub_d, _ = _symmetric_blocks(x.reshape(n * 16, 16), levels, n_try=3, lo=0.85, hi=1.0)
    sub_d = sub_d.reshape(n, 16)
    # signed 6-bit sub-scales (-32..31) under one fp16 super scale
    d = _f16(sub_d.abs().amax(1) / 32.0)
    inv = torch.where(d > 0, 1.0 / d.clamp_min(1e-30), torch.zeros_like(d))
    sc = torch.round(sub_d * inv[:, None]).clamp(-32, 31)
    scale = (d[:, None] * sc).repeat_interleave(16, 1)
    sinv = _safe_inv(scale)
    q = (torch.round(x * sinv).clamp(-4, 3) + 4).to(torch.uint8)         # 0..7
    low = _pack_2bit_k(q & 3)
    hbit = (q >> 2).reshape(n, 8, 32)                                       # bit b of byte m: element 32b + m
    hmask = torch.zeros(n, 32, dtype=torch.uint8, device=x.device)
    for b in range(8):
        hmask |= hbit[:, b] << b
    s = (sc + 32).to(torch.uint8)                                           # 0..63
    lscales = (s[:, :8] & 0x0F) | ((s[:, 8:] & 0x0F) << 4)
    hs = (s >> 4).reshape(n, 4, 4)                                          # [i, k] = sub-block 4i + k
    hscales = hs[:, 0] | (hs[:, 1] << 2) | (hs[:, 2] << 4) | (hs[:, 3] << 6)
    return torch.cat([hmask, low, lscales, hscales, _fp16_bytes(d)], 1)


_BLOCK_QUANTIZERS = {
    "Q4_0": _blocks_q4_0, "Q8_0": _blocks_q8_0, "IQ4_NL": _blocks_iq4_nl, "TQ1_0": _blocks_tq1_0,
    "TQ2_0": _blocks_tq2_0, "Q2_K": _blocks_q2_k, "Q3_K": _blocks_q3_k, "Q4_K": _blocks_q4_k,
    "Q5_0": _blocks_q5_0, "Q5_K": _blocks_q5_k,
}
QUANT_TYPES = tuple(_BLOCK_QUANTIZERS)


# Types whose search weighs each weight's error by an importance matrix.
IMPORTANCE_TYPES = ("Q4_0", "Q5_0", "IQ4_NL")


def quantize(w: torch.Tensor, qtype: str, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float weight [rows, cols] -> uint8 [rows, row_bytes(qtype, cols)] in GGUF type `qtype`.
    cols must be a multiple of the type's block (the caller checks and names it).
    importance: optional float [cols], the mean square of each input channel
    on calibration text (llama.cpp's importance matrix; memboost.calibrate's
    diagonal): the scale searches of IMPORTANCE_TYPES then minimise the
    error weighted by it; the other types ignore it."""
    if qtype not in _BLOCK_QUANTIZERS:
        raise ValueError(f"no quantizer for GGUF type {qtype!r}; expected one of {QUANT_TYPES}")
    block, nbytes = BLOCK[qtype]
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {block} elements, got {cols}")
    w = w.detach().to(torch.float32)
    if importance is not None:
        importance = importance.detach().to(device=w.device, dtype=torch.float32).reshape(-1)
        if importance.numel() != cols or not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError(f"importance must be {cols} finite non-negative values (one per input channel), "
                             f"got {importance.numel()} values")
    out = torch.empty(rows, cols // block * nbytes, dtype=torch.uint8)
    step = max(1, _CHUNK_WEIGHTS // cols)
    fn = _BLOCK_QUANTIZERS[qtype]
    weighted = importance is not None and qtype in IMPORTANCE_TYPES
    for r in range(0, rows, step):
        chunk = w[r:r + step].reshape(-1, block)
        if weighted:
            imp = importance.reshape(1, -1, block).expand(chunk.shape[0] * block // cols, -1, -1).reshape(-1, block)
            blocks = fn(chunk, imp)
        else:
            blocks = fn(chunk)
        out[r:r + step] = blocks.reshape(-1, cols // block * nbytes).cpu()
    return out


def to_float_type(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """A float tensor in F32, F16 or BF16 storage (BF16 as its raw uint16 bits, as GGUF stores it)."""
    w = w.detach()
    if qtype == "F32":
        return w.to(torch.float32)
    if qtype == "F16":
        return w.to(torch.float16)
    if qtype == "BF16":
        return w.to(torch.bfloat16).view(torch.int16)
    raise ValueError(f"{qtype!r} is not a float GGUF type; expected one of {FLOAT_TYPES}")
