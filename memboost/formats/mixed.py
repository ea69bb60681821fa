"""Mixed 2/4/16-bit weight quantization (after arXiv 2311.16442).

Most groups of `group_size` consecutive input columns are 2-bit; in every row
the `ratio_4bit` most sensitive groups are 4-bit; the largest deviations
inside 2-bit groups are kept as sparse 16-bit outliers. Scales are two-level:
each group stores a 4-bit log2 code of its quantization range, and each row
an fp32 (base, step) pair for those codes. The layout is documented in
csrc/common/mixed_format.h.

Choices the paper leaves open, and why:
- Every row gets the same number of 4-bit groups (ratio_4bit * G rounded half up), so
  every row has the same size and the GEMV kernel needs no per-row offsets.
- A group's sensitivity is its squared error at 2 bits, weighted per column
  by the calibration (the Hessian diagonal when given, else 1), measured with
  the same search that stores it, not estimated from its range.
- The scale code and the zero point are chosen by a small search that
  minimises that weighted squared error of the stored format. 2-bit zero
  points have quarter steps (four levels that must include 0.0 fit a
  symmetric group badly); exact_zero restricts them to whole steps.
"""

import warnings
from typing import Optional

import torch

from .. import ops, reference
from .._threads import map_chunks, row_chunk_size
from ..errors import MemboostError, MemboostTypeError, check_float_weight
from .gptq import hessian_factor, sweep
from .tensor import QuantizedTensor, dtype_name

_LOG2_STEP_MIN = 1e-4  # keeps the per-row code step finite when all ranges agree
_SCALE_LEVELS = 15  # 4-bit scale codes: 0..15
_CHUNK_ELEMENTS = 1 << 19  # rows are processed in chunks of at most this many weights (memboost/_threads.py)
# Range shrink factors tried per group, in octaves (1, 0.93, ..., 0.66 of the full range).
_CLIP_OCTAVES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
_MAX_ROW_SPAN_OCTAVES = 8.0  # groups with smaller ranges than 2^-8 of the row's largest share code 0
_ZERO_RESOLUTION = {3: 0.25, 15: 1.0}  # zero point steps per width (see csrc/common/mixed_format.h)
# Outliers cost 2 + 2 bytes each plus kernel time (the paper: 1.5% of them cost
# over 30% of it); past a few percent a wider format is the better deal.
MAX_OUTLIER_FRACTION = 0.05
# An outlier candidate this many times farther from its group's median than
# the group's other values would cost a 4-bit group over 2 of its 4 bits.
_EXTREME_OUTLIER = 4.0


class MixedQuantizedTensor(QuantizedTensor):
    format = "mixed"
    version = 2  # 2: quarter-step zero points in 2-bit groups
    tensor_names = ("plane2", "lowbits", "meta", "mask", "row_scale", "outlier_rowptr", "outlier_cols", "outlier_vals")

    @property
    def group_size(self) -> int:
        return int(self.meta["group_size"])

    @property
    def groups_4bit_per_row(self) -> int:
        return self.tensors["lowbits"].shape[1] * 16 // self.group_size

    @property
    def num_outliers(self) -> int:
        return self.tensors["outlier_vals"].numel()

    @property
    def ratio_4bit(self) -> float:
        """The realised fraction of 4-bit groups (a whole number per row)."""
        return self.groups_4bit_per_row / (self.shape[1] // self.group_size)

    @classmethod
    def zeros(cls, shape, dtype=torch.float16, group_size: int = 64, ratio_4bit: float = 0.1,
              device=None) -> "MixedQuantizedTensor":
        """A valid all-zero weight of this shape (what a layer holds before load_state_dict)."""
        n, k = shape
        if k % group_size or group_size % 16:
            raise MemboostError(f"'group_size' {group_size} must be a multiple of 16 dividing in_features {k}")
        g = k // group_size
        n4 = _num_4bit_groups(ratio_4bit, g)
        z = lambda *s, dt=torch.int32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        tensors = {"plane2": z(n, k // 16), "lowbits": z(n, n4 * group_size // 16), "meta": z(n, g, dt=torch.uint8),
                   "mask": _bitset(torch.arange(g, device=device).expand(n, g) < n4),
                   "row_scale": z(n, 2, dt=torch.float32), "outlier_rowptr": z(n + 1),
                   "outlier_cols": z(0, dt=torch.int16), "outlier_vals": z(0, dt=torch.float16)}
        return cls(tensors, {"shape": [n, k], "dtype": dtype_name(dtype), "group_size": group_size})

    def dequantize(self) -> torch.Tensor:
        return ops.mixed_dequantize(self.tensors, self.group_size, self.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None) -> torch.Tensor:
        """x @ W.T + bias. act_bits=8 multiplies int8 activations (one scale
        per 32 values) with the codes on the CPU (faster, within about 1% of
        the exact product); None computes exactly in float."""
        return ops.mixed_linear(x, self.tensors, bias, self.group_size, 0 if act_bits is None else act_bits)

    def linear_bound(self, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None):
        if act_bits not in (None, 0, 8):
            raise MemboostError(f"'act_bits' must be None (exact) or 8, got {act_bits!r}")
        return ops.mixed_linear_bound(self.tensors, bias, self.group_size, act_bits or 0)

    def _repr_fields(self) -> dict:
        return {"group_size": self.group_size, "ratio_4bit": round(self.ratio_4bit, 4), "outliers": self.num_outliers}

    def _validate(self) -> None:
        meta, t = self.meta, self.tensors
        for key in ("shape", "dtype", "group_size"):
            if key not in meta:
                raise MemboostError(f"mixed format metadata is missing '{key}'")
        shape, gs = meta["shape"], meta["group_size"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s >= 0 for s in shape)):
            raise MemboostError(f"metadata 'shape' must be [out_features, in_features], got {shape!r}")
        if not (type(gs) is int and gs >= 16 and gs % 16 == 0 and shape[1] % gs == 0):
            raise MemboostError(f"metadata 'group_size' {gs!r} must be a multiple of 16 dividing in_features {shape[1]}")
        self.dtype  # validates the dtype name
        n, k = shape
        g = k // gs
        expected = {
            "plane2": (torch.int32, (n, k // 16)),
            "meta": (torch.uint8, (n, g)),
            "mask": (torch.int32, (n, (g + 31) // 32)),
            "row_scale": (torch.float32, (n, 2)),
            "outlier_rowptr": (torch.int32, (n + 1,)),
        }
        for name, (dt, shp) in expected.items():
            _check_tensor(t, name, dt, shp)
        _check_tensor(t, "lowbits", torch.int32, None)
        low = t["lowbits"]
        if low.dim() != 2 or low.shape[0] != n or low.shape[1] % (gs // 16) or low.shape[1] * 16 // gs > g:
            raise MemboostError(f"'lowbits' must have shape [{n}, n4*{gs // 16}] with n4 <= {g}, got {tuple(low.shape)}")
        _check_tensor(t, "outlier_cols", torch.int16, None)
        _check_tensor(t, "outlier_vals", torch.float16, None)
        nnz = t["outlier_vals"].numel()
        if t["outlier_cols"].dim() != 1 or t["outlier_vals"].dim() != 1 or t["outlier_cols"].numel() != nnz:
            raise MemboostError("'outlier_cols' and 'outlier_vals' must be 1-D and of equal length")
        if nnz > n * k:
            raise MemboostError(f"{nnz} outliers cannot fit a weight of {n * k} elements")
        if nnz and k > 65536:
            raise MemboostError(f"outlier column indices are 16-bit: in_features {k} > 65536 allows no outliers")
        devices = {v.device for v in t.values()}
        if len(devices) != 1:
            raise MemboostError(f"all tensors of a quantized weight must be on one device, got {sorted(map(str, devices))}")
        self._validate_contents(n, k, g, low.shape[1] * 16 // gs, nnz)

    def _validate_contents(self, n: int, k: int, groups: int, n4: int, nnz: int) -> None:
        # The kernels index with these, so they are checked wherever the
        # tensors live (a checkpoint loaded straight onto the GPU too): the
        # few index tensors are copied to the CPU. Construction only; layers
        # reuse an already validated weight without this.
        t = self.tensors
        rowptr = t["outlier_rowptr"].cpu().to(torch.int64)
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise MemboostError(f"'outlier_rowptr' must rise from 0 to the outlier count {nnz}")
        if nnz:
            cols = t["outlier_cols"].cpu().to(torch.int64) & 0xFFFF
            if int(cols.max()) >= k:
                raise MemboostError(f"'outlier_cols' must be column indices below in_features {k}")
            # Two outliers at one position would be added twice by the CPU kernels
            # and race in the CUDA dequantize: refuse them.
            rows = torch.repeat_interleave(torch.arange(n), rowptr[1:] - rowptr[:-1])
            if torch.unique(rows * k + cols).numel() != nnz:
                raise MemboostError("'outlier_cols' repeats a column within a row")
        per_row = reference.unpack_bitmask(t["mask"].cpu(), groups).sum(1)
        if n and not bool((per_row == n4).all()):
            raise MemboostError(f"'mask' must mark exactly n4={n4} 4-bit groups in every row (the size of 'lowbits')")
        if groups % 32 and n:  # bits past the last group must be clear
            tail = t["mask"][:, -1].cpu().to(torch.int64) & 0xFFFFFFFF
            if bool((tail >> (groups % 32)).any()):
                raise MemboostError("'mask' has bits set past the last group")


def _check_tensor(tensors: dict, name: str, dtype: torch.dtype, shape) -> None:
    t = tensors.get(name)
    if not isinstance(t, torch.Tensor):
        raise MemboostError(f"'{name}' must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise MemboostError(f"'{name}' must have dtype {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise MemboostError(f"'{name}' must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():  # the kernels read the raw buffers
        raise MemboostError(f"'{name}' must be contiguous (call .contiguous()), got strides {t.stride()}")


def _check_args(w, ratio_4bit, group_size, outlier_fraction, calibration):
    check_float_weight(w)
    if w.dim() != 2:
        raise MemboostError(f"'w' must be a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    if not isinstance(ratio_4bit, (int, float)) or isinstance(ratio_4bit, bool) or not 0.0 <= ratio_4bit <= 1.0:
        raise MemboostError(f"'ratio_4bit' must be a number in [0, 1], got {ratio_4bit!r}")
    if type(group_size) is not int or group_size < 16 or group_size % 16:
        raise MemboostError(f"'group_size' must be a positive multiple of 16, got {group_size!r}")
    k = w.shape[1]
    if k % group_size:
        raise MemboostError(f"'group_size' {group_size} does not divide in_features {k}; "
                            f"group sizes that do: {fitting_group_sizes(k) or 'none (in_features must be a multiple of 16)'}")
    if not isinstance(outlier_fraction, (int, float)) or not 0.0 <= outlier_fraction <= MAX_OUTLIER_FRACTION:
        raise MemboostError(f"'outlier_fraction' must be in [0, {MAX_OUTLIER_FRACTION}], got {outlier_fraction!r}")
    if outlier_fraction > 0 and k > 65536:
        raise MemboostError(f"outlier column indices are 16-bit: in_features {k} > 65536 needs outlier_fraction=0")
    if calibration is not None:
        if not isinstance(calibration, torch.Tensor) or calibration.shape != (k,):
            got = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
            raise MemboostError(f"'calibration' must be a tensor of shape [in_features]=({k},), got {got}")
        if not torch.isfinite(calibration).all() or (calibration < 0).any():
            raise MemboostError("'calibration' must hold finite, non-negative per-input-channel weights")


def fitting_group_sizes(in_features: int) -> list:
    """The usual group sizes that divide in_features."""
    return [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]


def quantize(w: torch.Tensor, ratio_4bit: float = 0.1, group_size: int = 64, outlier_fraction: float = 0.002,
             calibration: Optional[torch.Tensor] = None, exact_zero: Optional[bool] = None,
             hessian: Optional[torch.Tensor] = None, damp: float = 0.01,
             shrink: float = 0.5) -> MixedQuantizedTensor:
    """Quantizes a 2-D weight [out, in] to the mixed 2/4/16-bit format.

    ratio_4bit: fraction of each row's groups stored in 4 bits (0: all 2-bit,
        1: all 4-bit).
    group_size: consecutive input columns sharing a scale and zero (multiple
        of 16 dividing in_features).
    outlier_fraction: at most this fraction of each row's weights is kept
        exactly as sparse 16-bit outliers (0 disables; at most 0.05).
    calibration: optional per-input-channel importance [in_features], e.g. the
        Hessian diagonal E[x^2] or squared activation norms; it weights the
        error that picks the 4-bit groups and the scales.
    exact_zero: keep 0.0 one of the four levels of every 2-bit group (whole
        zero points). Default: when no calibration is given. Quarter-step
        zero points lower the squared weight error (about 8% at 2 bits), but
        small weights then move by up to half a step, which the input
        channels with very large activations amplify: without calibration,
        which would weigh those channels, SmolLM2's perplexity is several
        times worse (benchmarks/bench_mixed_quality.py).
    hessian: optional input second moment H = X^T X / rows [in, in] (from
        memboost.calibrate(..., hessian=True); a 2-D `calibration` is taken
        as this): the weights are then quantized GPTQ-style, column by column,
        each column's rounding error spread over the columns not yet
        quantized through the Cholesky factor of the damped H^-1, so the
        layer's output error on inputs like the calibration ones is what is
        minimised. The 4-bit groups, the outliers and the row grids are
        decided first from diag(H); each group's scale code and zero point
        when the sweep reaches it. The stored format is the same.
    damp: added to H's diagonal, as a fraction of its mean (GPTQ's 0.01).
    shrink: H is first shrunk toward its diagonal, (1 - shrink) * H +
        shrink * diag(H), as covariance estimates from few samples are: the
        cross-channel correlations of a few thousand calibration tokens hold
        for text like them and not for other text, while the per-channel
        magnitudes do. 0 is GPTQ's sweep; 1 keeps only the diagonal (the
        sweep then still carries each column's error on, within the same
        input channel weighting). On SmolLM2 at 2.83 bits, calibrated on 8192
        tokens of varied text, 0.25 and 0.5 gave perplexity 66 / 63 and
        70 / 67 on fortunes / GPL-3, the plain sweep 71 / 72, 0.9 82 / 84, and
        rounding with the diagonal alone 88 / 90 (README, Results).
    """
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and hessian is None:
        calibration, hessian = None, calibration
    if hessian is not None:
        k = w.shape[1] if isinstance(w, torch.Tensor) and w.dim() == 2 else None
        if not isinstance(hessian, torch.Tensor) or hessian.dim() != 2 or hessian.shape != (k, k):
            got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
            raise MemboostError(f"'hessian' must be a tensor of shape [in_features, in_features]=({k}, {k}), got {got}")
        if not bool(torch.isfinite(hessian).all()):
            raise MemboostError("'hessian' contains NaN or Inf values")
        if not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise MemboostError(f"'damp' must be in (0, 1), got {damp!r}")
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= shrink <= 1:
            raise MemboostError(f"'shrink' must be in [0, 1], got {shrink!r}")
        if calibration is None:
            calibration = hessian.diagonal().clamp_min(0).to(torch.float32)
    _check_args(w, ratio_4bit, group_size, outlier_fraction, calibration)
    if exact_zero is None:
        exact_zero = calibration is None
    elif not isinstance(exact_zero, bool):
        raise MemboostTypeError(f"'exact_zero' must be True, False or None, got {exact_zero!r}")
    n, k = w.shape
    groups = k // group_size
    n4 = _num_4bit_groups(ratio_4bit, groups)
    if abs(n4 / groups - ratio_4bit) > 0.1:
        warnings.warn(f"ratio_4bit={ratio_4bit} becomes {n4}/{groups} = {n4 / groups:.3f} on rows of {groups} groups "
                      f"(every row has a whole number of 4-bit groups); a smaller group_size is finer", stacklevel=2)
    k_out = int(outlier_fraction * k + 0.5)
    h = None if calibration is None else calibration.to(device=w.device, dtype=torch.float32)
    u = None if hessian is None else hessian_factor(hessian.to(w.device), damp, shrink)
    chunk = row_chunk_size(n, k, _CHUNK_ELEMENTS)
    parts = map_chunks(lambda r: _quantize_rows(w[r:r + chunk].to(torch.float32), h, n4, group_size, k_out,
                                                exact_zero, u),
                       range(0, n, chunk), w.device)

    tensors = {name: torch.cat([p[name] for p in parts]) for name in ("plane2", "lowbits", "meta", "mask", "row_scale")}
    counts = torch.cat([p["outlier_counts"] for p in parts])
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    tensors["outlier_rowptr"] = rowptr.to(torch.int32)
    tensors["outlier_cols"] = torch.cat([p["outlier_cols"] for p in parts])
    tensors["outlier_vals"] = torch.cat([p["outlier_vals"] for p in parts])
    meta = {"shape": [n, k], "dtype": dtype_name(w.dtype), "group_size": group_size}
    return MixedQuantizedTensor(tensors, meta)


def _num_4bit_groups(ratio_4bit: float, groups: int) -> int:
    # Half rounds up (Python's round() would give 0 groups for 0.25 of 2).
    return int(ratio_4bit * groups + 0.5)


def _bitset(flags: torch.Tensor) -> torch.Tensor:
    """bool [rows, count] -> int32 [rows, ceil(count/32)], bit i of word i//32."""
    rows, count = flags.shape
    padded = torch.nn.functional.pad(flags.to(torch.int64), (0, (-count) % 32)).reshape(rows, -1, 32)
    words = (padded << torch.arange(32, device=flags.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _search_codes(x, err_weight, levels: int, log2_base, log2_step, exact_zero: bool):
    """Best (scale code, zero nibble, codes, dequantized values) per group of x
    [n, G, gs] at one width (levels 3 or 15), by err_weight-ed squared error.

    Candidates: the scale code that covers the group's range shrunk by each of
    _CLIP_OCTAVES; for each, the zero points on the width's zero grid (quarter
    steps for 2-bit, whole steps for 4-bit) next to the value that centres the
    levels on the group; for 2-bit also one step further each way and the
    whole zeros (which keep 0.0 a level); with exact_zero the whole zeros
    only. Returns the error [n, G] too, for the choice of 4-bit groups.
    """
    zero_res = _ZERO_RESOLUTION[levels]
    mid = (x.amin(-1) + x.amax(-1)) * 0.5
    log_rng = _log2_range(x)
    best_err = best_code = best_zero = None
    for clip in _CLIP_OCTAVES:
        code = torch.ceil((log_rng - clip - log2_base) / log2_step - 1e-3).clamp(0, _SCALE_LEVELS)
        step = _group_step(code, levels, log2_base, log2_step)
        centre = levels * 0.5 - mid / step  # in steps
        whole = [torch.floor(centre) / zero_res, torch.ceil(centre) / zero_res]
        near = torch.floor(centre / zero_res)
        zeros = whole if zero_res == 1.0 or exact_zero else [near - 1, near, near + 1, near + 2] + whole
        step3, inv_step3 = step.unsqueeze(-1), (1.0 / step).unsqueeze(-1)
        for zero in zeros:
            zero = zero.clamp(0, 15)  # the zero nibble
            # The squared error of these codes, in place (this loop is the cost of quantize).
            z3 = (zero * zero_res).unsqueeze(-1)
            err = torch.addcmul(z3, x, inv_step3).round_().clamp_(0, levels).sub_(z3).mul_(step3).sub_(x).square_()
            err = (err if err_weight is None else err.mul_(err_weight)).sum(-1)
            if best_err is None:
                best_err, best_code, best_zero = err, code, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_code = torch.where(better, code, best_code)
                best_zero = torch.where(better, zero, best_zero)
    step3 = _group_step(best_code, levels, log2_base, log2_step).unsqueeze(-1)
    z3 = (best_zero * zero_res).unsqueeze(-1)
    q = torch.addcmul(z3, x, 1.0 / step3).round_().clamp_(0, levels)  # the same operations as the search
    return best_err, [best_code, best_zero, q, (q - z3) * step3]


def _group_step(code, levels: int, log2_base, log2_step):
    return torch.exp2(log2_base + code * log2_step) / levels


def _requantize(result, groups: torch.Tensor, x, err_weight, levels: int, log2_base, log2_step,
                exact_zero: bool) -> None:
    """Quantizes the groups flagged in `groups` [n, G] of x [n, G, gs] at one
    width and writes them into result = [code, zero, codes, values] in place."""
    n, g, gs = x.shape
    count = int(groups.sum())
    if count == 0:
        return
    pick = lambda t: t.expand(n, g, gs)[groups].view(count, 1, gs)  # noqa: E731
    base, step = (t.expand(n, g)[groups].view(count, 1) for t in (log2_base, log2_step))
    _, found = _search_codes(pick(x), None if err_weight is None else pick(err_weight), levels, base, step, exact_zero)
    for dst, src in zip(result, found):
        dst[groups] = src.reshape(count, *dst.shape[2:])


def _log2_range(x: torch.Tensor) -> torch.Tensor:
    """log2 of the range [n, G] a group of x [n, G, gs] needs: the levels are
    (q - zero) * step with 0 <= zero <= levels, so they always reach 0.0 and
    the range must too (a group of equal values needs no more)."""
    rng = x.amax(-1).clamp_min(0) - x.amin(-1).clamp_max(0)
    return torch.log2(rng.clamp_min(torch.finfo(torch.float32).tiny))


def _pick_outliers(dev: torch.Tensor, count: int) -> torch.Tensor:
    """bool [n, k]: the `count` largest entries of dev [n, k] per row."""
    flags = torch.zeros(dev.shape, dtype=torch.bool, device=dev.device)
    if count > 0:
        flags.scatter_(1, dev.topk(count, dim=1).indices, True)
    return flags


def _quantize_rows(w: torch.Tensor, h: Optional[torch.Tensor], n4: int, gs: int, k_out: int,
                   exact_zero: bool, hessian_factor: Optional[torch.Tensor] = None) -> dict:
    n, k = w.shape
    groups = k // gs
    wg = w.view(n, groups, gs)
    group_mean = wg.mean(-1, keepdim=True)
    col_weight = None if h is None else h.view(1, groups, gs)

    def error_weight(out: torch.Tensor) -> Optional[torch.Tensor]:
        # outliers are stored exactly: their codes' error does not count
        keep = None if k_out == 0 else (~out).to(torch.float32)
        return col_weight if keep is None else keep if col_weight is None else keep * col_weight

    # 1. Outlier candidates: the k_out largest deviations from the group mean
    #    per row, weighted by sqrt(calibration) (their share of the output
    #    error). They are quantized as the group's mean and kept exactly as
    #    residuals. Extreme ones, more than _EXTREME_OUTLIER times the largest
    #    other deviation of their group, are taken out before anything else is
    #    decided: they stay outliers whatever width their group gets, and the
    #    mean, the row's scale grid and the choice of 4-bit groups are computed
    #    without them (one huge value must not make its group 4-bit, nor
    #    stretch its row's grid). Without extremes this is the plain scheme.
    raw_dev = (wg - group_mean).abs()
    dev = raw_dev.view(n, k) if h is None else raw_dev.view(n, k) * h.sqrt()
    is_out = _pick_outliers(dev, k_out).view(n, groups, gs)
    others = raw_dev.masked_fill(is_out, 0.0).amax(-1, keepdim=True)
    extreme = is_out & (raw_dev > _EXTREME_OUTLIER * others)
    if bool(extreme.any()):
        kept = (~extreme).to(w.dtype)
        group_mean = (wg * kept).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
    clean = torch.where(is_out, group_mean, wg)
    without_extremes = torch.where(extreme, group_mean, wg)  # what 4-bit groups quantize

    # 2. Two-level scales: a 4-bit log2 code per group on a per-row grid from
    #    a little below the smallest range (so every group can clip) to the
    #    largest. The grid spans at most _MAX_ROW_SPAN_OCTAVES: a constant or
    #    near-constant group must not coarsen it for the whole row.
    log_clean, log_top = _log2_range(clean), _log2_range(without_extremes).amax(1, keepdim=True)
    log2_base = torch.maximum(log_clean.amin(1, keepdim=True), log_top - _MAX_ROW_SPAN_OCTAVES) - _CLIP_OCTAVES[-1]
    log2_step = ((log_top - log2_base) / _SCALE_LEVELS).clamp_min(_LOG2_STEP_MIN)

    # 3. 4-bit groups: per row, the n4 groups with the largest (calibration-
    #    weighted) 2-bit error. Ranking by the error saved (2-bit minus 4-bit
    #    error) picks almost the same groups at twice the search cost.
    if n4 == groups:
        four = torch.ones(n, groups, dtype=torch.bool, device=w.device)
        is_out = extreme  # 4-bit groups keep only the extreme outliers
        code, zero, q, deq = _search_codes(without_extremes, error_weight(is_out), 15, log2_base, log2_step,
                                           True)[1]
    else:
        four = torch.zeros(n, groups, dtype=torch.bool, device=w.device)
        err2, result = _search_codes(clean, error_weight(is_out), 3, log2_base, log2_step, exact_zero)
        if n4 > 0:
            four.scatter_(1, err2.topk(n4, dim=1).indices, True)
            # 4-bit groups quantize their values but the extreme ones (every row has n4 of them).
            _requantize(result, four, without_extremes, error_weight(extreme), 15, log2_base, log2_step, True)
            if k_out > 0:
                # Other outliers live in 2-bit groups only (4-bit is precise
                # enough for them): the budget of the candidates that fell in
                # 4-bit groups goes to the next largest deviations of the 2-bit
                # groups, and the groups that gained one are quantized again.
                in_four = four.unsqueeze(-1).expand(n, groups, gs).reshape(n, k)
                dev = dev.masked_fill(in_four, -1.0).masked_fill(extreme.view(n, k), float("inf"))
                was_out = is_out
                budget = min(k_out, (groups - n4) * gs + int(extreme.view(n, k).sum(1).max()))
                is_out = _pick_outliers(dev, budget).view(n, groups, gs) & (dev.view(n, groups, gs) >= 0)
                changed = (is_out & ~was_out).any(-1) & ~four
                clean = torch.where(is_out, group_mean, wg)
                _requantize(result, changed, clean, error_weight(is_out), 3, log2_base, log2_step, exact_zero)
        code, zero, q, deq = result

    if hessian_factor is not None:
        # 4'. Error compensation: the decisions above stay (4-bit groups,
        #     outliers, row grids); codes, scale codes and zero points are
        #     chosen again column by column while each column's error is spread
        #     over the columns not yet quantized (_compensated_codes).
        code, zero, q, deq, wg = _compensated_codes(wg, four, is_out, hessian_factor, col_weight, log2_base,
                                                    log2_step, exact_zero)

    # 4. Outliers keep their exact value as a 16-bit residual on top of their code.
    resid = (wg - deq)[is_out]
    if resid.numel() and resid.abs().max() > torch.finfo(torch.float16).max:
        raise MemboostError("'w' has outliers too large for the format's float16 residuals")
    cols = is_out.view(n, k).nonzero()[:, 1]

    q = q.to(torch.uint8)
    high = torch.where(four.unsqueeze(-1), q >> 2, q).view(n, k)
    low = (q[four] & 3).reshape(n, n4 * gs)
    return {
        "plane2": ops.pack_2bit(high),
        "lowbits": ops.pack_2bit(low) if n4 else torch.zeros(n, 0, dtype=torch.int32, device=w.device),
        "meta": (code.to(torch.uint8) | (zero.to(torch.uint8) << 4)),
        "mask": _bitset(four),
        "row_scale": torch.cat([log2_base, log2_step], dim=1).contiguous(),
        "outlier_counts": is_out.view(n, k).sum(1),
        # uint16 column indices stored in an int16 tensor (safetensors has no uint16)
        "outlier_cols": torch.where(cols >= 32768, cols - 65536, cols).to(torch.int16),
        "outlier_vals": resid.to(torch.float16),
    }


def _compensated_codes(wg: torch.Tensor, four: torch.Tensor, is_out: torch.Tensor, u: torch.Tensor,
                       col_weight: Optional[torch.Tensor], log2_base, log2_step, exact_zero: bool):
    """GPTQ's sweep in the mixed format, for rows wg [n, G, gs].

    Columns are quantized in order. At the first column of a group, the
    group's scale code and zero point are searched (_search_codes) on its
    values as the sweep has updated them so far, at the width the group was
    given; each column is then rounded to its group's grid, its outliers kept
    exact, and its error spread over the columns after it (gptq.sweep). Returns code, zero, q, deq (like _search_codes) and
    the updated weights, whose outliers are what is stored exactly."""
    n, g, gs = wg.shape
    k = g * gs
    w = wg.reshape(n, k).clone()
    codes = torch.empty(n, k, device=w.device)
    deq = torch.empty(n, k, device=w.device)
    code = torch.empty(n, g, device=w.device)
    zero = torch.empty(n, g, device=w.device)
    out = is_out.reshape(n, k)
    grid = {}  # the current group's step, zero point and top level

    def round_column(j, w):
        grp = j // gs
        if j % gs == 0:  # this group's scale code and zero point, from its updated values
            x = w[:, j:j + gs].unsqueeze(1)
            keep = (~is_out[:, grp:grp + 1]).to(torch.float32)
            weight = keep if col_weight is None else keep * col_weight[:, grp:grp + 1]
            c2, z2 = _search_codes(x, weight, 3, log2_base, log2_step, exact_zero)[1][:2]
            c4, z4 = _search_codes(x, weight, 15, log2_base, log2_step, True)[1][:2]
            f = four[:, grp:grp + 1]
            code[:, grp:grp + 1] = torch.where(f, c4, c2)
            zero[:, grp:grp + 1] = torch.where(f, z4, z2)
            levels = torch.where(f[:, 0], 15.0, 3.0)
            grid["step"] = _group_step(code[:, grp], 1, log2_base[:, 0], log2_step[:, 0]) / levels
            grid["zero_at"] = zero[:, grp] * torch.where(f[:, 0], 1.0, _ZERO_RESOLUTION[3])
            grid["levels"] = levels
        col = w[:, j]
        step, zero_at = grid["step"], grid["zero_at"]
        q = torch.minimum(torch.round(col / step + zero_at).clamp_(min=0), grid["levels"])
        d = (q - zero_at) * step
        codes[:, j] = q
        deq[:, j] = d
        return torch.where(out[:, j], col, d)  # outliers are stored exactly: no error

    sweep(w, u, round_column, block=max(gs, (128 // gs) * gs))
    return code, zero, codes.view(n, g, gs), deq.view(n, g, gs), w.view(n, g, gs)
