"""Quantized weights cut and joined the way a serving engine partitions its
linear layers (memboost.integrations.vllm uses these; they need only torch).

- `rows(q, r0, r1)`: output rows r0..r1 (a column-parallel shard, a slice of a
  fused layer, a vocabulary shard of the output layer);
- `columns(q, c0, c1)`: input columns c0..c1 (a row-parallel shard);
- `stack_rows([q1, q2, ...])`: one weight whose rows are q1's, then q2's, ...
  (q/k/v into qkv_proj, gate/up into gate_up_proj), or None where the format
  cannot hold them as one weight (the caller then runs them one by one);
- `zero_rows(q, n)`: n all-zero rows in q's format (vocabulary padding).

Every result dequantizes to exactly the matching part of the original
weights (the same stored numbers, re-laid), and is validated as its format.
What each format allows, and why (a cut the layout cannot make raises
MemboostError saying so; `where` names the layer):

- mixed: everything is per row (codes, 4-bit group mask, scale codes, row
  scales, outliers in CSR form), so rows cut and stack when the parts share
  group_size and their count of 4-bit groups per row (the kernels need one
  count for every row). Columns never: every row must keep the same number of
  4-bit groups, which a column cut does not preserve.
- nf4: blocks of block_size run over the flattened weight and double
  quantization shares one offset per tensor, so a cut or a join first
  decodes the block scales to float32 (plain NF4: +32 bits per block, the
  same numbers); rows cut where the cut falls on a block edge (row * in %
  block_size == 0), columns where in and the cut are multiples of block_size.
- ternary: per-row or grouped scales (a per-tensor scale is written out per
  row), trits packed in 128-column chunks: rows always; columns at multiples
  of 128 that are also multiples of group_size.
- lort: the ternary part as ternary (alpha per row when cut), A cut with the
  rows, B with the columns; stacked parts get A block-diagonal and B side by
  side (rank = the sum of the ranks, which must stay <= min(out, in)); a row
  cut must keep rank <= its rows.
- int8: rows always, columns at multiples of 32 (Q8_0 blocks).
"""

from typing import List, Optional

import torch

from ..errors import MemboostError
from ..formats.tensor import QuantizedTensor
from .. import reference

TERNARY_CHUNK = reference.TERNARY_CHUNK


def _where(where: str) -> str:
    return f"{where}: " if where else ""


def _rebuild(q: QuantizedTensor, tensors: dict, shape) -> QuantizedTensor:
    meta = dict(q.meta, shape=[int(s) for s in shape])
    return type(q)({k: v.contiguous() for k, v in tensors.items()}, meta)


# -- rows ----------------------------------------------------------------------
def rows(q: QuantizedTensor, r0: int, r1: int, where: str = "") -> QuantizedTensor:
    n, k = q.shape
    if not 0 <= r0 <= r1 <= n:
        raise MemboostError(f"{_where(where)}rows {r0}..{r1} lie outside a weight of {n} rows")
    if (r0, r1) == (0, n):
        return q
    t = q.tensors
    fmt = q.format
    if fmt == "mixed":
        ptr = t["outlier_rowptr"].to(torch.int64)
        a, b = int(ptr[r0]), int(ptr[r1])
        out = {name: t[name][r0:r1] for name in ("plane2", "lowbits", "meta", "mask", "row_scale")}
        out.update(outlier_rowptr=(t["outlier_rowptr"][r0:r1 + 1] - a).to(torch.int32),
                   outlier_cols=t["outlier_cols"][a:b], outlier_vals=t["outlier_vals"][a:b])
        return _rebuild(q, out, (r1 - r0, k))
    if fmt == "int8":
        return _rebuild(q, {"values": t["values"][r0:r1], "scales": t["scales"][r0:r1]}, (r1 - r0, k))
    if fmt == "ternary":
        return _rebuild(q, {"packed": t["packed"][r0:r1], "scales": _per_row(t["scales"], n)[r0:r1]}, (r1 - r0, k))
    if fmt == "lort":
        r = t["A"].shape[1]
        if r > min(r1 - r0, k):
            raise MemboostError(f"{_where(where)}a LoRT weight of rank {r} cannot be cut to {r1 - r0} rows "
                                f"(its rank must stay <= its rows)")
        return _rebuild(q, {"packed": t["packed"][r0:r1], "alpha": _per_row(t["alpha"], n)[r0:r1],
                            "A": t["A"][r0:r1], "B": t["B"]}, (r1 - r0, k))
    if fmt == "nf4":
        bs = q.block_size
        e0, e1 = r0 * k, r1 * k
        if e0 % bs or (r1 < n and e1 % bs):
            raise MemboostError(f"{_where(where)}nf4 blocks of {bs} run across rows of {k}: rows {r0}..{r1} do not "
                                f"start and end on a block edge")
        return _nf4_plain(q, q.tensors["codes"][e0 // 2:(e1 + 1) // 2], q.block_scales()[e0 // bs:-(-e1 // bs)],
                          (r1 - r0, k))
    raise MemboostError(f"{_where(where)}format {fmt!r} cannot be partitioned")


def _per_row(scales: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor scale [1, g] written out for every row [n, g] (the same numbers)."""
    return scales.expand(n, scales.shape[1]) if scales.shape[0] == 1 and n != 1 else scales


def _nf4_plain(q: QuantizedTensor, codes: torch.Tensor, absmax: torch.Tensor, shape) -> QuantizedTensor:
    empty = absmax.new_empty(0)
    return _rebuild(q, {"codes": codes, "absmax": absmax.to(torch.float32), "nested_absmax": empty,
                        "nested_map": empty, "nested_offset": empty}, shape)


# -- columns -------------------------------------------------------------------
def columns(q: QuantizedTensor, c0: int, c1: int, where: str = "") -> QuantizedTensor:
    n, k = q.shape
    if not 0 <= c0 <= c1 <= k:
        raise MemboostError(f"{_where(where)}columns {c0}..{c1} lie outside a weight of {k} columns")
    if (c0, c1) == (0, k):
        return q
    t = q.tensors
    fmt = q.format
    refuse = f"{_where(where)}a {fmt} weight [{n}, {k}] cannot be split at input columns {c0}..{c1}"
    if fmt == "mixed":
        raise MemboostError(f"{refuse}: every row of the mixed format keeps the same number of 4-bit groups, "
                            "which a column split does not preserve (serve it without tensor parallelism, or "
                            "quantize the row-parallel layers (o_proj, down_proj) in another format)")
    if fmt == "int8":
        if c0 % 32 or c1 % 32:
            raise MemboostError(f"{refuse}: int8 splits only at multiples of its blocks of 32")
        return _rebuild(q, {"values": t["values"][:, c0:c1], "scales": t["scales"][:, c0 // 32:c1 // 32]},
                        (n, c1 - c0))
    if fmt in ("ternary", "lort"):
        gs = q.meta.get("group_size", 0) if fmt == "ternary" else 0
        step = TERNARY_CHUNK if not gs else max(gs, TERNARY_CHUNK)
        if c0 % step or (c1 < k and c1 % step):
            what = f"multiples of {TERNARY_CHUNK} (trits are packed in chunks of {TERNARY_CHUNK} columns)"
            if gs:
                what += f" and of group_size {gs}"
            raise MemboostError(f"{refuse}: {fmt} splits only at {what}")
        packed = t["packed"][:, c0 // 4:-(-c1 // TERNARY_CHUNK) * (TERNARY_CHUNK // 4)]
        if fmt == "ternary":
            scales = t["scales"] if not gs else t["scales"][:, c0 // gs:-(-c1 // gs)]
            return _rebuild(q, {"packed": packed, "scales": scales}, (n, c1 - c0))
        r = t["A"].shape[1]
        if r > min(n, c1 - c0):
            raise MemboostError(f"{refuse}: its rank {r} must stay <= the {c1 - c0} columns of a part")
        return _rebuild(q, {"packed": packed, "alpha": t["alpha"], "A": t["A"], "B": t["B"][c0:c1]}, (n, c1 - c0))
    if fmt == "nf4":
        bs = q.block_size
        if k % bs or c0 % bs or c1 % bs:
            raise MemboostError(f"{refuse}: nf4 splits only where in_features and the split are multiples of its "
                                f"block_size {bs}")
        codes = t["codes"].view(n, k // 2)[:, c0 // 2:c1 // 2]
        absmax = q.block_scales().view(n, k // bs)[:, c0 // bs:c1 // bs]
        return _nf4_plain(q, codes.reshape(-1), absmax.reshape(-1), (n, c1 - c0))
    raise MemboostError(f"{_where(where)}format {fmt!r} cannot be partitioned")


# -- stacking ------------------------------------------------------------------
def stack_rows(parts: List[QuantizedTensor], where: str = "") -> Optional[QuantizedTensor]:
    """One weight holding `parts`' rows one after another, or None where the
    format cannot hold them as one (the mixed format with differing group
    sizes or 4-bit group counts, LoRT whose summed rank is too large, NF4
    parts that do not end on block edges)."""
    if len(parts) == 1:
        return parts[0]
    fmts = {p.format for p in parts}
    if len(fmts) != 1:
        raise MemboostError(f"{_where(where)}a fused layer needs one format for all its parts, got "
                            f"{[p.format for p in parts]}")
    ks = {p.shape[1] for p in parts}
    if len(ks) != 1:
        raise MemboostError(f"{_where(where)}fused parts must share in_features, got {sorted(ks)}")
    (fmt,), (k,) = fmts, ks
    n = sum(p.shape[0] for p in parts)
    ts = [p.tensors for p in parts]
    cat = lambda name: torch.cat([t[name] for t in ts])  # noqa: E731
    if fmt == "mixed":
        if len({p.group_size for p in parts}) != 1 or len({t["lowbits"].shape[1] for t in ts}) != 1:
            return None
        offsets, ptrs = 0, []
        for i, t in enumerate(ts):
            ptr = t["outlier_rowptr"].to(torch.int64)
            ptrs.append((ptr if i == 0 else ptr[1:]) + offsets)
            offsets += int(ptr[-1])
        out = {name: cat(name) for name in ("plane2", "lowbits", "meta", "mask", "row_scale", "outlier_cols",
                                             "outlier_vals")}
        out["outlier_rowptr"] = torch.cat(ptrs).to(torch.int32)
        return _rebuild(parts[0], out, (n, k))
    if fmt == "int8":
        return _rebuild(parts[0], {"values": cat("values"), "scales": cat("scales")}, (n, k))
    if fmt == "ternary":
        if len({p.group_size for p in parts}) != 1:
            return None
        scales = torch.cat([_per_row(t["scales"], p.shape[0]) for p, t in zip(parts, ts)])
        return _rebuild(parts[0], {"packed": cat("packed"), "scales": scales}, (n, k))
    if fmt == "lort":
        ranks = [t["A"].shape[1] for t in ts]
        if sum(ranks) > min(n, k):
            return None
        a = torch.zeros(n, sum(ranks), dtype=torch.float16, device=ts[0]["A"].device)
        r0 = c0 = 0
        for p, t, r in zip(parts, ts, ranks):
            a[r0:r0 + p.shape[0], c0:c0 + r] = t["A"]
            r0, c0 = r0 + p.shape[0], c0 + r
        alpha = torch.cat([_per_row(t["alpha"], p.shape[0]) for p, t in zip(parts, ts)])
        return _rebuild(parts[0], {"packed": cat("packed"), "alpha": alpha, "A": a,
                                   "B": torch.cat([t["B"] for t in ts], dim=1)}, (n, k))
    if fmt == "nf4":
        bs = {p.block_size for p in parts}
        if len(bs) != 1 or any(p.numel() % next(iter(bs)) or p.numel() % 2 for p in parts[:-1]):
            return None
        return _nf4_plain(parts[0], cat("codes"), torch.cat([p.block_scales() for p in parts]), (n, k))
    raise MemboostError(f"{_where(where)}format {fmt!r} cannot be partitioned")


def zero_rows(q: QuantizedTensor, count: int) -> QuantizedTensor:
    """`count` all-zero rows [count, in] in q's format (and its options), e.g. vocabulary padding."""
    k = q.shape[1]
    cls = type(q)
    if q.format == "mixed":
        g = k // q.group_size
        return cls.zeros((count, k), q.dtype, q.group_size, q.groups_4bit_per_row / g if g else 0.0,
                         device=q.device)
    if q.format == "ternary":
        return cls.zeros((count, k), q.dtype, q.group_size or None, True, device=q.device)
    if q.format == "lort":
        return cls.zeros((count, k), 0, True, q.dtype, device=q.device)
    if q.format == "nf4":
        return cls.zeros((count, k), q.dtype, q.block_size, False, device=q.device)
    return cls.zeros((count, k), q.dtype, device=q.device)
