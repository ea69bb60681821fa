"""LoRT weights: W ~ alpha * T + A @ B.T, a ternary matrix T in {-1, 0, +1}
with a scale alpha (one, or one per row) plus a rank-r correction A @ B.T.

    q, errors = memboost.lort.decompose(w, rank=64, iters=10)   # also lort.decompose
    q.avg_bits                  # T, alpha, A and B as stored, metadata included
    y = q.linear(x)             # ternary_linear kernel + (x @ B) @ A.T, one output buffer

The solver alternates two exact minimisations of ||W - alpha*T - A@B.T||_F,
so no step can raise the error:
- ternary step: the best ternary fit of R = W - A@B.T. For a fixed support
  S (the non-zero positions of T) the best T is sign(R) on S and the best
  alpha the mean of |R| over S, leaving ||R||^2 - (sum_S |R|)^2 / |S|; so the
  best support of size j holds the j largest |R|, and sorting |R| (per row
  for per-row alphas) finds the best j.
- low-rank step: the best rank-r fit of W - alpha*T, the truncated SVD
  (from the smaller Gram matrix's eigenvectors, in float64; randomized for
  large matrices; a candidate that does not lower the error,
  including the fp16 rounding of the stored factors, is not taken).
The error reported after each iteration is that of the weight as stored
(A and B rounded to fp16), so `errors` never rises.

With H (a layer's input second moment X^T X / rows, decompose(W, H=...))
the error minimised is the layer's output error tr(E H E^T) instead: the
ternary step rounds with GPTQ's error feedback at the levels {-alpha, 0,
alpha} (memboost.formats.gptq, the sweep the mixed format uses) and refits
alpha by weighted least squares, the low-rank step is the H-whitened SVD;
each candidate is again taken only if it lowers that error.

Storage: T in the project's one ternary packing (csrc/common/trits.h, the
`ternary_*` ops and kernels), alpha float32 [1 or out, 1] (the ternary
format's per-tensor / per-row scale), A float16 [out, r] and B float16
[in, r], each factor carrying sqrt of the singular values. Rank 64 on a
576x576 layer costs 2*64*(576+576)*16 / 576^2 = 3.6 bits per weight on top
of T's 2: `resolve_rank` turns a fraction of min(out, in) or a bits budget
into the rank a layer can afford.
"""

import json
import math
from typing import List, Optional, Tuple, Union

import torch

from .. import ops, reference
from .._slices import row_slices
from ..errors import MemboostError, MemboostTypeError, check_float_weight
from .gptq import conditioned_hessian, inverse_factor, sweep
from .tensor import QuantizedTensor, dtype_name
from .ternary import _check_codes, check_act_bits

_ACT_BITS = {None: 0, 8: 8}
_FP16_MAX = 65504.0
# Above this many elements in min(out, in) the low-rank step uses a
# randomized SVD (a few power iterations) instead of the full one.
_EXACT_SVD_MAX_DIM = 1024


class LoRTQuantizedTensor(QuantizedTensor):
    format = "lort"
    version = 1
    tensor_names = ("packed", "alpha", "A", "B")

    @property
    def rank(self) -> int:
        return int(self.tensors["A"].shape[1])

    @property
    def per_row_alpha(self) -> bool:
        return self.tensors["alpha"].shape[0] != 1 or self.shape[0] == 1

    @classmethod
    def zeros(cls, shape, rank: int, per_row_alpha: bool = False, dtype=torch.float16, device=None
              ) -> "LoRTQuantizedTensor":
        """A valid all-zero weight (what a layer holds before load_state_dict)."""
        n, k = shape
        packed = torch.full((n, reference.ternary_row_bytes(k)), 0x55, dtype=torch.uint8, device=device)
        alpha = torch.zeros(n if per_row_alpha else 1, 1, dtype=torch.float32, device=device)
        a = torch.zeros(n, rank, dtype=torch.float16, device=device)
        b = torch.zeros(k, rank, dtype=torch.float16, device=device)
        return cls({"packed": packed, "alpha": alpha, "A": a, "B": b}, {"shape": [n, k], "dtype": dtype_name(dtype)})

    def trits(self) -> torch.Tensor:
        """The int8 ternary matrix T [out, in] in {-1, 0, 1}."""
        return ops.ternary_unpack(self.tensors["packed"], self.shape[1])

    def low_rank(self) -> torch.Tensor:
        """A @ B.T in float32."""
        return self.tensors["A"].float() @ self.tensors["B"].float().T

    def dequantize(self) -> torch.Tensor:
        t = self.tensors
        w = ops.ternary_dequantize(t["packed"], t["alpha"], self.shape[1], 0, torch.float32)
        return w.addmm_(t["A"].float(), t["B"].float().T).to(self.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None
               ) -> torch.Tensor:
        """x @ (alpha*T + A@B.T).T + bias in one op (memboost::lort_linear): the
        ternary kernel (exact, or int8 activations with act_bits=8) plus the
        low-rank path (x @ B) @ A.T from the float16 factors, in float32.
        Gradients flow to x and bias."""
        t = self.tensors
        # meta's list, not self.shape (a torch.Size built on every call)
        return ops.lort_linear(x, t["packed"], t["alpha"], t["A"], t["B"], bias, self.meta["shape"][1],
                               _ACT_BITS[check_act_bits(act_bits)])

    def linear_bound(self, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None):
        t = self.tensors
        return ops.lort_linear_bound(t["packed"], t["alpha"], t["A"], t["B"], bias, self.shape[1],
                                     _ACT_BITS[check_act_bits(act_bits)])

    def _repr_fields(self) -> dict:
        return {"rank": self.rank, "alpha": "row" if self.per_row_alpha else "tensor"}

    def _validate(self) -> None:
        meta, t = self.meta, self.tensors
        for key in ("shape", "dtype"):
            if key not in meta:
                raise MemboostError(f"lort format metadata is missing '{key}'")
        shape = meta["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int for s in shape)
                and shape[0] >= 1 and shape[1] >= 1):
            raise MemboostError(f"metadata 'shape' must be [out_features >= 1, in_features >= 1], got {shape!r}")
        self.dtype  # validates the dtype name
        n, k = shape
        want = {"packed": torch.uint8, "alpha": torch.float32, "A": torch.float16, "B": torch.float16}
        for name, dt in want.items():
            value = t.get(name)
            if not isinstance(value, torch.Tensor):
                raise MemboostError(f"'{name}' must be a tensor, got {type(value).__name__}")
            if value.dtype != dt:
                raise MemboostError(f"'{name}' must have dtype {dt}, got {value.dtype}")
            if value.device != t["packed"].device:
                raise MemboostError(f"all tensors of a quantized weight must be on one device, got "
                                    f"{t['packed'].device} and {value.device}")
        row_bytes = reference.ternary_row_bytes(k)
        if tuple(t["packed"].shape) != (n, row_bytes):
            raise MemboostError(f"'packed' must have shape ({n}, {row_bytes}) for a [{n}, {k}] weight (rows padded "
                                f"to 128 trits, 4 per byte), got {tuple(t['packed'].shape)}")
        if t["alpha"].dim() != 2 or t["alpha"].shape[1] != 1 or t["alpha"].shape[0] not in (1, n):
            raise MemboostError(f"'alpha' must have shape (1, 1) or ({n}, 1), got {tuple(t['alpha'].shape)}")
        for name in ("packed", "alpha"):  # the ternary kernels read their raw buffers
            if not t[name].is_contiguous():
                raise MemboostError(f"'{name}' must be contiguous (call .contiguous()), got strides {t[name].stride()}")
        a, b = t["A"], t["B"]
        if a.dim() != 2 or a.shape[0] != n:
            raise MemboostError(f"'A' must have shape ({n}, rank), got {tuple(a.shape)}")
        r = a.shape[1]
        if r > min(n, k):
            raise MemboostError(f"rank {r} (A's columns) exceeds min(out, in) = {min(n, k)}")
        if tuple(b.shape) != (k, r):
            raise MemboostError(f"'B' must have shape ({k}, {r}) (in_features, A's rank), got {tuple(b.shape)}")
        for name in ("alpha", "A", "B"):
            if not bool(torch.isfinite(t[name]).all()):
                raise MemboostError(f"'{name}' contains NaN or Inf values")
        _check_codes(t["packed"], k)


# -- rank and bits -----------------------------------------------------------
def stored_bits(shape, rank: int, per_row_alpha: bool) -> float:
    """Bits per weight of a LoRT weight as stored (state_dict bytes, metadata included)."""
    n, k = shape
    meta = {"shape": [n, k], "dtype": "bfloat16", "format": "lort", "version": LoRTQuantizedTensor.version}
    nbytes = (n * reference.ternary_row_bytes(k) + 4 * (n if per_row_alpha else 1) + 2 * rank * (n + k)
              + len(json.dumps(meta, sort_keys=True).encode()))
    return 8.0 * nbytes / (n * k)


def resolve_rank(shape, rank: Union[int, float] = 64, max_bits: Optional[float] = None,
                 per_row_alpha: bool = False) -> int:
    """The rank a [out, in] layer gets: `rank` as an int, or a float in (0, 1]
    as a fraction of min(out, in); with `max_bits`, the largest rank up to
    that (and up to min(out, in)) whose stored bits per weight stay within
    the budget."""
    n, k = (int(s) for s in shape)
    limit = min(n, k)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise MemboostTypeError(f"'rank' must be an int or a fraction in (0, 1], got {type(rank).__name__}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise MemboostError(f"'rank' as a fraction of min(out, in) must lie in (0, 1], got {rank!r}")
        r = max(1, int(round(rank * limit)))
    else:
        if rank < 0:
            raise MemboostError(f"'rank' must be >= 0, got {rank}")
        if rank > limit and max_bits is None:
            raise MemboostError(f"'rank' {rank} is larger than a [{n}, {k}] matrix allows (at most {limit})")
        r = min(rank, limit)
    if max_bits is not None:
        if isinstance(max_bits, bool) or not isinstance(max_bits, (int, float)) or not math.isfinite(max_bits):
            raise MemboostError(f"'max_bits' must be a number of bits per weight, got {max_bits!r}")
        floor = stored_bits((n, k), 0, per_row_alpha)
        if max_bits < floor:
            raise MemboostError(f"'max_bits' {max_bits} is below what the ternary part alone costs on a [{n}, {k}] "
                                f"layer ({floor:.3f} bits per weight)")
        per_rank = 16.0 * (n + k) / (n * k)
        r = min(r, int((max_bits - floor) / per_rank))
        while r > 0 and stored_bits((n, k), r, per_row_alpha) > max_bits:
            r -= 1
    return r


# -- the solver --------------------------------------------------------------
def best_ternary_fit(r: torch.Tensor, per_row: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(T int8 [n, k], alpha float32 [n or 1, 1]) minimising ||r - alpha*T||:
    per row (or over the whole matrix), the support is the j largest |r| for
    the j maximising (sum of those |r|)^2 / j, and alpha their mean."""
    if not per_row and r.numel() > _SORTED_FIT_MAX:
        return _binned_ternary_fit(r)
    return _sorted_ternary_fit(r, per_row)


# One alpha over more weights than this: best_ternary_fit bins |r| instead of
# sorting it. An 8B model's 58.7 M-weight MLP matrix took 9.0 s per sort on
# 2 cores (1.3 s binned), and decompose fits once per iteration: most of
# LoRT's time at that size.
_SORTED_FIT_MAX = 1 << 22
_FIT_BINS = 4096


def _binned_ternary_fit(r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """best_ternary_fit(r, per_row=False) without sorting every |r|. The
    values fall in _FIT_BINS bins of equal width below max |r| (counts, float64
    sums and extremes per bin, a slice of r at a time). f(j) = S(j)^2 / j, S(j)
    the sum of the j largest, is known at every bin's edge; inside a bin it is
    at most (S + c * hi)^2 / (j + c) (c more values, each at most the bin's
    largest hi: convex in c, so its larger end). Only the bins whose bound
    reaches the best edge are sorted, so the support size is the sorted
    fit's, and alpha agrees within float64 rounding."""
    a = r.detach().abs().reshape(-1)
    top = float(a.max()) if a.numel() else 0.0
    if not top > 0 or not math.isfinite(top):   # all zero, or NaN / Inf: the sorted fit says what it gives
        return _sorted_ternary_fit(r, False)
    scale = _FIT_BINS / top

    def bins_of(v):   # monotone in v: equal values share a bin, a larger value is never in a lower bin
        return (v * scale).to(torch.int64).clamp_(max=_FIT_BINS - 1)

    counts = torch.zeros(_FIT_BINS, dtype=torch.int64, device=a.device)
    sums = torch.zeros(_FIT_BINS, dtype=torch.float64, device=a.device)
    hi = torch.zeros(_FIT_BINS, dtype=a.dtype, device=a.device)
    lo = torch.full((_FIT_BINS,), top, dtype=a.dtype, device=a.device)
    for piece in row_slices(a):
        b = bins_of(piece)
        counts += torch.bincount(b, minlength=_FIT_BINS)
        sums.index_add_(0, b, piece.to(torch.float64))
        hi.scatter_reduce_(0, b, piece, "amax")
        lo.scatter_reduce_(0, b, piece, "amin")
    # Bins from the largest values down: j0, s0 = count and sum of the bins above.
    j_incl = counts.flip(0).cumsum(0).flip(0).to(torch.float64)
    s_incl = sums.flip(0).cumsum(0).flip(0)
    j0, s0 = j_incl - counts, s_incl - sums
    occupied = counts > 0
    edge = torch.where(occupied, s_incl * s_incl / j_incl.clamp_min(1), -1.0)
    best_edge = float(edge.max())
    bound = torch.where(occupied, (s0 + counts * hi.to(torch.float64)) ** 2 / j_incl.clamp_min(1), -1.0)
    best_j, best_s, best_f = None, None, -1.0
    threshold_value = None   # the smallest |r| in the support
    candidate = bound >= best_edge * (1 - 1e-9)   # the slack: hi and the sums are rounded
    chosen = torch.nonzero(candidate).flatten().tolist()   # usually one or two adjacent bins
    if chosen:   # every value of the bins from the first chosen to the last
        low_value, high_value = lo[chosen[0]], hi[chosen[-1]]
        kept = torch.cat([p[(p >= low_value) & (p <= high_value)] for p in row_slices(a)])
        kept_bins = bins_of(kept)
    for b in reversed(chosen):   # largest values first
        v = torch.sort(kept[kept_bins == b], descending=True).values
        s = float(s0[b]) + v.to(torch.float64).cumsum(0)
        j = float(j0[b]) + torch.arange(1, v.numel() + 1, dtype=torch.float64, device=a.device)
        f = s * s / j
        i = int(f.argmax())
        if float(f[i]) > best_f:   # strictly: the smaller support wins a tie, as in the sorted fit
            best_f, best_j, best_s, threshold_value = float(f[i]), int(j[i]), float(s[i]), v[i]
    if best_j is None or best_edge > best_f:   # the best is a whole bin's edge
        b = int(edge.argmax())
        best_j, best_s, threshold_value = int(j_incl[b]), float(s_incl[b]), lo[b]
    alpha = torch.tensor([[best_s / best_j]], dtype=torch.float64, device=a.device).to(torch.float32)
    support = a > threshold_value
    missing = best_j - int(support.sum())
    if missing > 0:   # values equal to the threshold: the first of them in memory order
        ties = torch.nonzero(a == threshold_value).flatten()[:missing]
        support[ties] = True
    t = (torch.sign(r) * support.reshape(r.shape)).to(torch.int8)
    return t, alpha


def _sorted_ternary_fit(r: torch.Tensor, per_row: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    n, k = r.shape
    a = r.abs()
    rows = a if per_row else a.reshape(1, -1)
    sorted_abs, order = torch.sort(rows, dim=1, descending=True)
    csum = sorted_abs.to(torch.float64).cumsum_(1)
    counts = torch.arange(1, rows.shape[1] + 1, device=r.device, dtype=torch.float64)
    best = (csum * csum / counts).argmax(dim=1, keepdim=True)  # support size - 1
    alpha = (csum.gather(1, best) / (best + 1).to(torch.float64)).to(torch.float32)
    del csum, sorted_abs
    keep = torch.arange(rows.shape[1], device=r.device).unsqueeze(0) <= best
    support = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, order, keep).reshape(n, k)
    t = (torch.sign(r) * support).to(torch.int8)
    return t, alpha


def _truncated_svd(m: torch.Tensor, rank: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [n, r], S [r], V [k, r]) of the (near-)best rank-`rank` fit of m, in m's dtype."""
    n, k = m.shape
    if min(n, k) <= _EXACT_SVD_MAX_DIM or rank * 4 >= min(n, k):
        # The exact truncated SVD through the eigenvectors of the smaller Gram
        # matrix, in float64: one GEMM and a small symmetric eigensolve, much
        # faster than a full SVD (and steadier on a busy CPU), and accurate for
        # the leading singular vectors the rank-r fit keeps.
        tall = n >= k
        m64 = m.to(torch.float64)
        gram = m64.T @ m64 if tall else m64 @ m64.T
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        top = evecs[:, -rank:].flip(1) if rank else evecs[:, :0]
        s = evals[-rank:].flip(0).clamp_min(0).sqrt() if rank else evals[:0]
        other = (m64 @ top if tall else m64.T @ top) / s.clamp_min(1e-30)
        u, v = (other, top) if tall else (top, other)
        return u.to(m.dtype), s.to(m.dtype), v.to(m.dtype)
    torch.manual_seed(seed)  # svd_lowrank draws its test matrix from the global RNG
    u, s, v = torch.svd_lowrank(m, q=min(rank + 16, min(n, k)), niter=4)
    return u[:, :rank], s[:rank], v[:, :rank]


def _fp16_factors(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return (a.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).contiguous(),
            b.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).contiguous())


def _low_rank_factors(m: torch.Tensor, rank: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float16 with A @ B.T the (near-)best rank-`rank` fit of m; each
    factor carries sqrt of the singular values (balanced for fp16)."""
    u, s, v = _truncated_svd(m, rank, seed)
    root = s.clamp_min(0).sqrt()
    return _fp16_factors(u * root, v * root)


def _whitened_factors(m: torch.Tensor, rank: int, seed: int, chol: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float16 with A @ B.T the best rank-`rank` fit of m in the norm
    ||E L||_F = tr(E H E^T)^(1/2), H = L L^T (chol: L, float64): the SVD
    U S V^T of m L truncated, A @ B.T = U_r S_r V_r^T L^-1 (QERA, SVD-LLM).
    Each column pair of A and B is rescaled to equal norms (balanced for fp16)."""
    u, s, v = _truncated_svd(m @ chol.to(m.dtype), rank, seed)
    root = s.clamp_min(0).sqrt()
    a = (u * root).to(torch.float64)
    b = torch.linalg.solve_triangular(chol.T, (v * root).to(torch.float64), upper=True)  # L^-T V S^(1/2)
    a_norm, b_norm = a.norm(dim=0), b.norm(dim=0)
    scale = torch.where((a_norm > 0) & (b_norm > 0), (b_norm / a_norm.clamp_min(1e-300)).sqrt(), 1.0)
    return _fp16_factors((a * scale).to(m.dtype), (b / scale).to(m.dtype))


def _error(w: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
           chol: Optional[torch.Tensor] = None) -> float:
    """||W - alpha*T - A@B.T||_F, or with chol (L, H = L L^T) ||(W - ...) L||_F = tr(E H E^T)^(1/2)."""
    resid = w - alpha * t.to(torch.float32)
    if a.shape[1]:
        resid.addmm_(a.float(), b.float().T, alpha=-1.0)
    if chol is not None:
        resid = resid @ chol
    return float(torch.linalg.vector_norm(resid))


def weighted_alpha(r: torch.Tensor, t: torch.Tensor, h: torch.Tensor, per_row: bool) -> torch.Tensor:
    """alpha float32 [n or 1, 1] minimising tr((r - alpha*T) H (r - alpha*T)^T)
    for a fixed T (least squares on the support): per row
    (t_i H r_i^T) / (t_i H t_i^T), or those sums over all rows; never
    negative, 0 for an empty row."""
    th = t.to(torch.float64) @ h
    num = (th * r.to(torch.float64)).sum(1, keepdim=True)
    den = (th * t.to(torch.float64)).sum(1, keepdim=True)
    if not per_row:
        num, den = num.sum().reshape(1, 1), den.sum().reshape(1, 1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0).clamp_min(0).to(torch.float32)


def compensated_ternary(r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """T int8 [n, k]: r rounded to the nearest of {-alpha, 0, +alpha} (alpha
    [n or 1, 1]) column by column with GPTQ's error feedback (gptq.sweep
    with u, the upper Cholesky factor of H^-1), which minimises the output
    error tr(E H E^T) of each column given the ones already rounded."""
    n, k = r.shape
    t = torch.empty(n, k, dtype=torch.int8, device=r.device)
    level = alpha.to(torch.float32).expand(n, 1)[:, 0]
    half = level * 0.5

    def round_column(j, w):
        col = w[:, j]
        trit = torch.sign(col) * (col.abs() > half)
        t[:, j] = trit.to(torch.int8)
        return trit * level

    sweep(r.to(torch.float32).clone(), u, round_column)
    return t


def _check_decompose_args(w, iters, per_row_alpha):
    check_float_weight(w, "W")
    if w.dim() != 2:
        raise MemboostError(f"'W' must be a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise MemboostError(f"'iters' must be an int >= 1, got {iters!r}")
    if not isinstance(per_row_alpha, bool):
        raise MemboostTypeError(f"'per_row_alpha' must be a bool, got {type(per_row_alpha).__name__}")


def _check_hessian_args(h, k: int, damp, shrink) -> None:
    if not isinstance(h, torch.Tensor):
        raise MemboostTypeError(f"'H' must be a tensor [in_features, in_features] (X^T X / rows, as "
                                f"memboost.calibrate(..., hessian=True) returns), got {type(h).__name__}")
    if h.dim() != 2 or tuple(h.shape) != (k, k):
        raise MemboostError(f"'H' must have shape [in_features, in_features] = ({k}, {k}) for this W, got "
                            f"{tuple(h.shape)}")
    if not h.is_floating_point():
        raise MemboostTypeError(f"'H' must be a floating-point tensor, got {h.dtype}")
    if not bool(torch.isfinite(h).all()):
        raise MemboostError("'H' contains NaN or Inf values")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise MemboostError(f"'damp' must be in (0, 1), got {damp!r}")
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= shrink <= 1:
        raise MemboostError(f"'shrink' must be in [0, 1], got {shrink!r}")


def decompose(W: torch.Tensor, rank: Union[int, float] = 64, iters: int = 10, per_row_alpha: bool = False,
              device=None, max_bits: Optional[float] = None, seed: int = 0, H: Optional[torch.Tensor] = None,
              damp: float = 0.01, shrink: float = 0.0) -> Tuple[LoRTQuantizedTensor, List[float]]:
    """W [out, in] (fp16/bf16/fp32) ~ alpha*T + A@B.T by alternating minimisation.

    rank: an int, or a float in (0, 1] (a fraction of min(out, in)); max_bits:
    the largest rank whose stored bits per weight fit (see resolve_rank).
    per_row_alpha: one alpha per output row instead of one for the matrix.
    device: where to solve (default W's device; float32 throughout); the
    result lives on W's device. Returns (q, errors): errors[i] is
    ||W - W_hat|| / ||W|| of the stored weight after iteration i (never
    rising). The start is the best ternary fit of W with A = B = 0.

    H: the layer's input second moment X^T X / rows [in, in] (from
    memboost.calibrate(..., hessian=True)); the error minimised is then the
    output error on such inputs, tr(E H E^T) with E = W - W_hat, H
    conditioned as GPTQ's (shrunk toward its diagonal by `shrink`, + damp *
    mean(diag H) on the diagonal; memboost.formats.gptq). Each step is then:
    - ternary: T from GPTQ's column sweep at the levels {-alpha, 0, alpha}
      (alpha as it stands), or the plain best fit's T, whichever is better;
      then alpha refitted by weighted least squares on T's support;
    - low rank: the H-whitened truncated SVD (SVD of R L with H = L L^T;
      A @ B.T = U_r S_r V_r^T L^-1), the best rank-r fit in that norm.
    A candidate that raises the weighted error is not taken, and errors[i]
    is tr(E H E^T)^(1/2) / tr(W H W^T)^(1/2), never rising.
    """
    _check_decompose_args(W, iters, per_row_alpha)
    r = resolve_rank(W.shape, rank, max_bits, per_row_alpha)
    home = W.device
    work = torch.device(device) if device is not None else home
    w = W.detach().to(device=work, dtype=torch.float32)
    n, k = w.shape
    chol = u = h = None
    if H is not None:
        _check_hessian_args(H, k, damp, shrink)
        h = conditioned_hessian(H.detach().to(work), damp, shrink)
        u = inverse_factor(h, damp)
        chol = torch.linalg.cholesky(h)  # H = L L^T, float64 (positive definite once conditioned)
    weight = None if chol is None else chol.to(torch.float32)
    norm = float(torch.linalg.vector_norm(w if weight is None else w @ weight)) or 1.0
    a = torch.zeros(n, r, dtype=torch.float16, device=work)
    b = torch.zeros(k, r, dtype=torch.float16, device=work)
    t, alpha = best_ternary_fit(w, per_row_alpha)
    if h is not None:
        alpha = weighted_alpha(w, t, h, per_row_alpha)
    err = _error(w, t, alpha, a, b, weight)
    errors: List[float] = []
    for it in range(iters):
        if r:
            m = w - alpha * t.to(torch.float32)
            cand_a, cand_b = (_low_rank_factors(m, r, seed=seed + it) if chol is None
                              else _whitened_factors(m, r, seed + it, chol))
            cand_err = _error(w, t, alpha, cand_a, cand_b, weight)
            if cand_err <= err:
                a, b, err = cand_a, cand_b, cand_err
        resid = w - a.float() @ b.float().T if r else w
        cand_t, cand_alpha = best_ternary_fit(resid, per_row_alpha)
        if h is not None:
            cand_alpha = weighted_alpha(resid, cand_t, h, per_row_alpha)
        cand_err = _error(w, cand_t, cand_alpha, a, b, weight)
        if h is not None:
            swept_t = compensated_ternary(resid, alpha if bool((alpha > 0).any()) else cand_alpha, u)
            swept_alpha = weighted_alpha(resid, swept_t, h, per_row_alpha)
            swept_err = _error(w, swept_t, swept_alpha, a, b, weight)
            if swept_err < cand_err:
                cand_t, cand_alpha, cand_err = swept_t, swept_alpha, swept_err
        if cand_err <= err:
            t, alpha, err = cand_t, cand_alpha, cand_err
        errors.append(err / norm)
    packed = ops.ternary_pack(t)
    q = LoRTQuantizedTensor._wrap({"packed": packed, "alpha": alpha.contiguous(), "A": a, "B": b},
                                  {"shape": [n, k], "dtype": dtype_name(W.dtype)})
    return (q.to(home) if work != home else q), errors
