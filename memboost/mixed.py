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
- Sensitivity of a group is its outlier-free range squared times the summed
  calibration weight of its columns (the Hessian diagonal when given, else 1):
  the expected 2-bit error of that group.
- The scale code and the zero point are chosen by a small search that
  minimises the (calibration-weighted) squared error of the stored format.
"""

from typing import Optional

import torch

from . import ops, reference
from .tensor import QuantizedTensor, dtype_name

_LOG2_STEP_MIN = 1e-4  # keeps the per-row code step finite when all ranges agree
_SCALE_LEVELS = 15  # 4-bit scale codes: 0..15
_CHUNK_ELEMENTS = 1 << 21
# Range shrink factors tried per group, in octaves (1, 0.90, 0.81, 0.71 of the full range).
_CLIP_OCTAVES = (0.0, 0.15, 0.3, 0.5)  # rows are processed in chunks of about this many weights


class MixedQuantizedTensor(QuantizedTensor):
    format = "mixed"
    version = 1
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
            raise ValueError(f"'group_size' {group_size} must be a multiple of 16 dividing in_features {k}")
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

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.mixed_linear(x, self.tensors, bias, self.group_size)

    def _repr_fields(self) -> dict:
        return {"group_size": self.group_size, "ratio_4bit": round(self.ratio_4bit, 4), "outliers": self.num_outliers}

    def _validate(self) -> None:
        meta, t = self.meta, self.tensors
        for key in ("shape", "dtype", "group_size"):
            if key not in meta:
                raise ValueError(f"mixed format metadata is missing '{key}'")
        shape, gs = meta["shape"], meta["group_size"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"metadata 'shape' must be [out_features, in_features], got {shape!r}")
        if not (isinstance(gs, int) and gs >= 16 and gs % 16 == 0 and shape[1] % gs == 0):
            raise ValueError(f"metadata 'group_size' {gs!r} must be a multiple of 16 dividing in_features {shape[1]}")
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
            raise ValueError(f"'lowbits' must have shape [{n}, n4*{gs // 16}] with n4 <= {g}, got {tuple(low.shape)}")
        _check_tensor(t, "outlier_cols", torch.int16, None)
        _check_tensor(t, "outlier_vals", torch.float16, None)
        nnz = t["outlier_vals"].numel()
        if t["outlier_cols"].dim() != 1 or t["outlier_vals"].dim() != 1 or t["outlier_cols"].numel() != nnz:
            raise ValueError("'outlier_cols' and 'outlier_vals' must be 1-D and of equal length")
        devices = {v.device for v in t.values()}
        if len(devices) != 1:
            raise ValueError(f"all tensors of a quantized weight must be on one device, got {sorted(map(str, devices))}")
        if devices == {torch.device("cpu")}:  # the kernels index with these: a corrupt file must not reach them
            self._validate_contents(n, k, g, low.shape[1] * 16 // gs, nnz)

    def _validate_contents(self, n: int, k: int, groups: int, n4: int, nnz: int) -> None:
        # Checked on CPU only (where checkpoints are loaded): on CUDA it would synchronize.
        t = self.tensors
        rowptr = t["outlier_rowptr"]
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise ValueError(f"'outlier_rowptr' must rise from 0 to the outlier count {nnz}")
        if nnz and int((t["outlier_cols"].to(torch.int32) & 0xFFFF).max()) >= k:
            raise ValueError(f"'outlier_cols' must be column indices below in_features {k}")
        per_row = reference.unpack_bitmask(t["mask"], groups).sum(1)
        if n and not bool((per_row == n4).all()):
            raise ValueError(f"'mask' must mark exactly n4={n4} 4-bit groups in every row (the size of 'lowbits')")


def _check_tensor(tensors: dict, name: str, dtype: torch.dtype, shape) -> None:
    t = tensors.get(name)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"'{name}' must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"'{name}' must have dtype {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"'{name}' must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_args(w, ratio_4bit, group_size, outlier_fraction, calibration):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"'w' must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"'w' must be a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"'w' must be float16, bfloat16 or float32, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"'w' is empty (shape {tuple(w.shape)})")
    if not isinstance(ratio_4bit, (int, float)) or not 0.0 <= ratio_4bit <= 1.0:
        raise ValueError(f"'ratio_4bit' must be a number in [0, 1], got {ratio_4bit!r}")
    if not isinstance(group_size, int) or group_size < 16 or group_size % 16:
        raise ValueError(f"'group_size' must be a positive multiple of 16, got {group_size!r}")
    k = w.shape[1]
    if k % group_size:
        fits = [g for g in (16, 32, 64, 128, 256) if k % g == 0]
        raise ValueError(f"'group_size' {group_size} does not divide in_features {k}; "
                         f"group sizes that do: {fits or 'none (in_features must be a multiple of 16)'}")
    if not isinstance(outlier_fraction, (int, float)) or not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"'outlier_fraction' must be in [0, 1), got {outlier_fraction!r}")
    if outlier_fraction > 0 and k > 65536:
        raise ValueError(f"outlier column indices are 16-bit: in_features {k} > 65536 needs outlier_fraction=0")
    if calibration is not None:
        if not isinstance(calibration, torch.Tensor) or calibration.shape != (k,):
            got = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
            raise ValueError(f"'calibration' must be a tensor of shape [in_features]=({k},), got {got}")
        if not torch.isfinite(calibration).all() or (calibration < 0).any():
            raise ValueError("'calibration' must hold finite, non-negative per-input-channel weights")
    if not torch.isfinite(w).all():
        raise ValueError("'w' contains NaN or Inf values")


def quantize(w: torch.Tensor, ratio_4bit: float = 0.1, group_size: int = 64, outlier_fraction: float = 0.002,
             calibration: Optional[torch.Tensor] = None) -> MixedQuantizedTensor:
    """Quantizes a 2-D weight [out, in] to the mixed 2/4/16-bit format.

    ratio_4bit: fraction of each row's groups stored in 4 bits (0: all 2-bit,
        1: all 4-bit).
    group_size: consecutive input columns sharing a scale and zero (multiple
        of 16 dividing in_features).
    outlier_fraction: at most this fraction of each row's weights is kept
        exactly as sparse 16-bit outliers (0 disables).
    calibration: optional per-input-channel importance [in_features], e.g. the
        Hessian diagonal E[x^2] or squared activation norms; it weights the
        error that picks the 4-bit groups and the scales.
    """
    _check_args(w, ratio_4bit, group_size, outlier_fraction, calibration)
    n, k = w.shape
    groups = k // group_size
    n4 = _num_4bit_groups(ratio_4bit, groups)
    k_out = int(outlier_fraction * k + 0.5)
    h = None if calibration is None else calibration.to(device=w.device, dtype=torch.float32)
    chunk = max(1, _CHUNK_ELEMENTS // k)
    parts = [_quantize_rows(w[r:r + chunk].to(torch.float32), h, n4, group_size, k_out) for r in range(0, n, chunk)]

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


def _search_codes(x, err_weight, lo, hi, levels, log2_base, log2_step):
    """Best (scale code, zero, codes) per group by weighted squared error.

    x [n, G, gs] values to quantize; err_weight broadcastable to x; lo/hi
    [n, G] the group min/max; levels [n, G] (3 or 15). Candidates: the scale
    codes nearest to the full range shrunk by each of _CLIP_OCTAVES, and for
    each the two zero points that best centre the grid on [lo, hi].
    """
    best_err = best_code = best_zero = None
    mid = (lo + hi) * 0.5
    log_rng = torch.log2((hi - lo).clamp_min(torch.finfo(torch.float32).tiny))
    for clip in _CLIP_OCTAVES:
        code = torch.ceil((log_rng - clip - log2_base) / log2_step - 1e-3).clamp(0, _SCALE_LEVELS)
        step = torch.exp2(log2_base + code * log2_step) / levels
        z_centre = levels * 0.5 - mid / step
        for z in (torch.floor(z_centre), torch.ceil(z_centre)):
            z = torch.minimum(z.clamp_min(0), levels)
            s3, z3 = step.unsqueeze(-1), z.unsqueeze(-1)
            q = torch.minimum((torch.round(x / s3) + z3).clamp_min(0), levels.unsqueeze(-1))
            err = ((q - z3) * s3 - x).square_().mul_(err_weight).sum(-1)
            if best_err is None:
                best_err, best_code, best_zero = err, code, z
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_code = torch.where(better, code, best_code)
                best_zero = torch.where(better, z, best_zero)
    step = torch.exp2(log2_base + best_code * log2_step) / levels
    s3, z3 = step.unsqueeze(-1), best_zero.unsqueeze(-1)
    q = torch.minimum((torch.round(x / s3) + z3).clamp_min(0), levels.unsqueeze(-1))
    return best_code, best_zero, q, (q - z3) * s3


def _quantize_rows(w: torch.Tensor, h: Optional[torch.Tensor], n4: int, gs: int, k_out: int) -> dict:
    n, k = w.shape
    groups = k // gs
    wg = w.view(n, groups, gs)
    group_mean = wg.mean(-1, keepdim=True)

    # 1. Outlier candidates: the k_out largest deviations from the group mean
    #    per row, weighted by sqrt(calibration) (their share of the output error).
    is_out = torch.zeros(n, groups, gs, dtype=torch.bool, device=w.device)
    if k_out > 0:
        dev = (wg - group_mean).abs().view(n, k)
        if h is not None:
            dev = dev * h.sqrt()
        idx = dev.topk(k_out, dim=1).indices
        is_out.view(n, k).scatter_(1, idx, True)
    clean = torch.where(is_out, group_mean, wg)

    # 2. Sensitivity: expected 2-bit error = outlier-free range^2 x calibration mass.
    range_clean = clean.amax(-1) - clean.amin(-1)
    mass = torch.full((groups,), float(gs), device=w.device) if h is None else h.view(groups, gs).sum(-1)
    four = torch.zeros(n, groups, dtype=torch.bool, device=w.device)
    if n4 > 0:
        sens = range_clean.square() * mass
        four.scatter_(1, sens.topk(n4, dim=1).indices, True)

    # 3. Outliers live in 2-bit groups only (4-bit groups quantize their raw
    #    values), so the budget of candidates that fell in 4-bit groups goes to
    #    the next largest deviations of the 2-bit groups.
    if k_out > 0 and n4 > 0:
        dev = dev.masked_fill(four.repeat_interleave(gs, dim=1), -1.0)
        is_out = torch.zeros_like(is_out)
        is_out.view(n, k).scatter_(1, dev.topk(min(k_out, (groups - n4) * gs), dim=1).indices, True)
    x = torch.where(is_out, group_mean, wg)
    lo, hi = x.amin(-1), x.amax(-1)

    # 4. Two-level scales: a 4-bit log2 code per group on a per-row grid that
    #    reaches a little below the smallest range, so every group can clip.
    log_rng = torch.log2((hi - lo).clamp_min(torch.finfo(torch.float32).tiny))
    log2_base = log_rng.amin(1, keepdim=True) - _CLIP_OCTAVES[-1]
    log2_step = ((log_rng.amax(1, keepdim=True) - log2_base) / _SCALE_LEVELS).clamp_min(_LOG2_STEP_MIN)
    levels = torch.where(four, 15.0, 3.0)
    err_weight = (~is_out).to(torch.float32)
    if h is not None:
        err_weight = err_weight * h.view(1, groups, gs)
    code, zero, q, deq = _search_codes(x, err_weight, lo, hi, levels, log2_base, log2_step)

    # 5. Outliers keep their exact value as a 16-bit residual on top of their code.
    resid = (wg - deq)[is_out]
    if resid.numel() and resid.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError("'w' has outliers too large for the format's float16 residuals")
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
