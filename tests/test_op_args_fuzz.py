"""Hypothesis fuzzing of the native ops' argument checks (torch.ops.memboost.*, CPU).

Each example builds a valid call of one op (random sizes, zero-sized ones
included, from memboost's own quantizers), then changes at most one thing:
a tensor's dtype, shape or strides (non-contiguous, same values), an int
argument, the output dtype or the bias. The op must then either raise a
clean ValueError / TypeError or return what memboost.reference computes for
the same arguments; never another exception or a crash. A mutation that
keeps every value (strides) must give the unmutated call's result.

The contents of index tensors (row pointers, columns, codes) are not the
ops' business: QuantizedTensor validation checks them before any kernel
runs (tests/fuzz/ fuzzes that). The mutations here keep contents valid.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memboost
from memboost import nf4, reference, ternary

OPS = torch.ops.memboost
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool)
OTHER_DEVICES = ("meta",) + (("cuda",) if torch.cuda.is_available() else ())
INTS = (-2**40, -1, 0, 1, 2, 3, 15, 16, 17, 31, 32, 33, 64, 127, 128, 129, 256, 2**31, 2**62)
# MEMBOOST_OP_FUZZ_EXAMPLES raises the examples per op for a long run (default: the CI pass).
SETTINGS = settings(max_examples=int(os.environ.get("MEMBOOST_OP_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# -- valid calls: (args, positions of args that are tensors, of ints, of the dtype) ------------
def _x(draw, k, dtype=None):
    batch = draw(st.sampled_from([(0,), (1,), (3,), (2, 2), (33,)]))
    dtype = dtype or draw(st.sampled_from(FLOATS))
    return torch.randn(*batch, k).to(dtype)


def _bias(draw, n, dtype):
    return torch.randn(n).to(dtype) if draw(st.booleans()) else None


def _mixed(draw):
    gs = draw(st.sampled_from([16, 32, 64]))
    n, k = draw(st.integers(0, 5)), gs * draw(st.integers(1, 4))
    w = torch.randn(max(n, 1), k) * 0.02
    q = memboost.quantize(w, ratio_4bit=draw(st.sampled_from([0.0, 0.5, 1.0])), group_size=gs,
                          outlier_fraction=draw(st.sampled_from([0.0, 0.03])))
    t = [q.tensors[name] for name in q.tensor_names]
    if n == 0:  # zero rows: every per-row tensor empty, no outliers
        t = [x[:0] if i < 5 else (torch.zeros(1, dtype=torch.int32) if i == 5 else x[:0]) for i, x in enumerate(t)]
    return t, gs, n, k


def build(draw, op):
    if op in ("pack_2bit", "pack_4bit"):
        top = 3 if op == "pack_2bit" else 15
        shape = draw(st.sampled_from([(0,), (5,), (16,), (3, 17), (2, 0), (2, 3, 40)]))
        return [torch.randint(0, top + 1, shape, dtype=torch.uint8)]
    if op in ("unpack_2bit", "unpack_4bit"):
        per = 16 if op == "unpack_2bit" else 8
        words = draw(st.integers(0, 4))
        n = draw(st.integers(max(0, (words - 1) * per + 1) if words else 0, words * per))
        batch = draw(st.sampled_from([(), (3,), (2, 2)]))
        return [torch.randint(-2**31, 2**31 - 1, (*batch, words), dtype=torch.int32), n]
    if op == "mixed_dequantize":
        t, gs, n, k = _mixed(draw)
        return [*t, gs, draw(st.sampled_from(FLOATS))]
    if op == "mixed_linear":
        t, gs, n, k = _mixed(draw)
        x = _x(draw, k)
        return [x, *t, _bias(draw, n, x.dtype), gs, draw(st.sampled_from([0, 8]))]
    if op == "ternary_pack":
        shape = draw(st.sampled_from([(0, 5), (3, 1), (2, 128), (4, 130), (2, 2, 7)]))
        return [torch.randint(-1, 2, shape, dtype=torch.int8)]
    if op == "ternary_unpack":
        n, k = draw(st.integers(0, 4)), draw(st.integers(1, 300))
        return [ternary.quantize(torch.randn(max(n, 1), k)).tensors["packed"][:n], k]
    if op in ("ternary_dequantize", "ternary_linear"):
        n, k = draw(st.integers(1, 5)), draw(st.integers(1, 300))
        gs = draw(st.sampled_from([None, 128, 256]))
        q = ternary.quantize(torch.randn(n, k), group_size=gs, per_row=gs is not None or draw(st.booleans()))
        packed, scales, gs = q.tensors["packed"], q.tensors["scales"], q.group_size
        if op == "ternary_dequantize":
            return [packed, scales, k, gs, draw(st.sampled_from(FLOATS))]
        x = _x(draw, k)
        return [x, packed, scales, _bias(draw, n, x.dtype), k, gs, draw(st.sampled_from([0, 8]))]
    if op == "lort_linear":
        n, k = draw(st.integers(1, 5)), draw(st.integers(1, 300))
        rank = draw(st.integers(0, min(n, k)))
        q = ternary.quantize(torch.randn(n, k), per_row=draw(st.booleans()))
        x = _x(draw, k)
        return [x, q.tensors["packed"], q.tensors["scales"], torch.randn(n, rank).half(),
                torch.randn(k, rank).half(), _bias(draw, n, x.dtype), k, draw(st.sampled_from([0, 8]))]
    if op == "low_rank_linear":
        n, k, rank = draw(st.integers(0, 5)), draw(st.integers(1, 300)), draw(st.integers(0, 6))
        dtype = draw(st.sampled_from([torch.float16, torch.float32]))
        x = _x(draw, k)
        base = torch.randn(*x.shape[:-1], n).to(x.dtype) if draw(st.booleans()) else None
        return [x, torch.randn(n, rank).to(dtype), torch.randn(k, rank).to(dtype), base]
    if op == "nf4_quantize":
        return [torch.randn(draw(st.integers(0, 300))).to(draw(st.sampled_from(FLOATS))),
                draw(st.sampled_from(nf4.BLOCK_SIZES[:3]))]
    if op == "nf4_quantize_absmax":
        absmax = torch.rand(draw(st.integers(1, 600)))
        return [absmax, absmax.mean().reshape(1), reference.dynamic_map(), 256]
    if op in ("nf4_dequantize", "nf4_linear"):
        n, k = draw(st.integers(1, 5)), draw(st.sampled_from([1, 7, 64, 100]))
        bs = draw(st.sampled_from(nf4.BLOCK_SIZES[:3]))
        q = nf4.quantize(torch.randn(n, k), block_size=bs, double_quant=draw(st.booleans()))
        t = [q.tensors[name] for name in q.tensor_names]
        if op == "nf4_dequantize":
            return [*t, n * k, bs, q.nested_block_size, draw(st.sampled_from(FLOATS))]
        x = _x(draw, k)
        return [x, *t, n, bs, q.nested_block_size, _bias(draw, n, x.dtype), draw(st.sampled_from([0, 8]))]
    if op == "decode_attention":
        batch, kv_heads = draw(st.integers(0, 3)), draw(st.integers(1, 2))
        heads, dim, length = kv_heads * draw(st.integers(1, 3)), draw(st.sampled_from([2, 16, 40])), draw(st.integers(1, 9))
        dtype = draw(st.sampled_from(FLOATS))
        angles = torch.rand(batch, 1, dim // 2).repeat(1, 1, 2) * 6
        start = draw(st.integers(0, length - 1))
        mask = torch.rand(batch + 1, length) < 0.8 if draw(st.booleans()) else None
        if mask is not None:
            mask[:, start] = True  # every row sees a key (else NaN, as SDPA gives: tests/test_decode_attention.py)
        return [torch.randn(batch, 1, heads * dim).to(dtype), torch.randn(batch, 1, kv_heads * dim).to(dtype),
                torch.randn(batch, 1, kv_heads * dim).to(dtype), angles.cos().to(dtype), angles.sin().to(dtype),
                torch.randn(batch + 1, kv_heads, length, dim).to(dtype),
                torch.randn(batch + 1, kv_heads, length, dim).to(dtype), start, mask,
                dim ** -0.5]
    if op == "rms_norm":
        x = _x(draw, draw(st.sampled_from([1, 7, 64, 100])))
        return [x, torch.randn(x.shape[-1]).to(x.dtype), draw(st.sampled_from([0.0, 1e-6, 1e-5])), draw(st.booleans())]
    if op in ("int8_dequantize", "int8_linear"):
        n, k = draw(st.integers(0, 5)), 32 * draw(st.integers(1, 3))
        q = memboost.int8.quantize(torch.randn(max(n, 1), k))
        values, scales = q.tensors["values"][:n], q.tensors["scales"][:n]
        if op == "int8_dequantize":
            return [values, scales, draw(st.sampled_from(FLOATS))]
        x = _x(draw, k)
        return [x, values, scales, _bias(draw, n, x.dtype), draw(st.sampled_from([0, 8]))]
    raise KeyError(op)


REFERENCES = {name: getattr(reference, name) for name in
              ("pack_2bit", "unpack_2bit", "pack_4bit", "unpack_4bit", "mixed_dequantize", "mixed_linear",
               "ternary_pack", "ternary_unpack", "ternary_dequantize", "ternary_linear", "lort_linear", "low_rank_linear",
               "nf4_quantize",
               "nf4_quantize_absmax", "nf4_dequantize", "nf4_linear", "rms_norm", "decode_attention",
               "int8_dequantize", "int8_linear")}


def test_every_op_is_fuzzed():
    assert {name for name in dir(OPS) if not name.startswith("_") and hasattr(getattr(OPS, name), "default")} \
        <= set(REFERENCES)


# -- mutations -----------------------------------------------------------------------------------
def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a bigger buffer)."""
    if t.dim() == 0:
        return t
    out = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)[..., ::2]
    out.copy_(t)
    return out


def mutate(draw, args):
    kinds = ["none", "strided"]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    ints = [i for i, a in enumerate(args) if type(a) is int]
    dts = [i for i, a in enumerate(args) if isinstance(a, torch.dtype)]
    kinds += ["dtype", "shape"] * bool(tensors) + ["int"] * bool(ints) + ["out_dtype"] * bool(dts)
    kinds += ["bias"] * any(a is None for a in args)
    kinds += ["device"] * (len(tensors) > 1)
    kind = draw(st.sampled_from(kinds))
    args = list(args)
    if kind == "strided":
        for i in tensors:
            args[i] = _strided(args[i])
    elif kind == "dtype":
        i = draw(st.sampled_from(tensors))
        args[i] = args[i].to(draw(st.sampled_from([d for d in DTYPES if d != args[i].dtype])))
    elif kind == "shape":
        i = draw(st.sampled_from(tensors))
        t = args[i]
        how = draw(st.sampled_from(["drop", "append", "flatten", "unsqueeze", "empty", "scalar"]))
        flat = t.reshape(-1)
        args[i] = {"drop": lambda: flat[:-1] if flat.numel() else flat,
                   "append": lambda: torch.cat([flat, flat.new_zeros(1)]),
                   "flatten": lambda: flat,
                   "unsqueeze": lambda: t.unsqueeze(0),
                   "empty": lambda: t.new_empty((0, *t.shape[1:])) if t.dim() else t.new_empty(0),
                   "scalar": lambda: t.new_zeros(())}[how]()
    elif kind == "int":
        i = draw(st.sampled_from(ints))
        args[i] = draw(st.sampled_from(INTS))
    elif kind == "out_dtype":
        args[dts[0]] = draw(st.sampled_from(DTYPES))
    elif kind == "device":   # one tensor elsewhere: a GPU when there is one, else the meta device
        i = draw(st.sampled_from(tensors))
        args[i] = args[i].to(draw(st.sampled_from(OTHER_DEVICES)))
    elif kind == "bias":
        i = args.index(None)
        ref_dim = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
        args[i] = draw(st.sampled_from([torch.zeros(3), torch.zeros(ref_dim + 1), torch.zeros(1, 1),
                                        torch.zeros(ref_dim, dtype=torch.float64)]))
    return kind, args


def _close(out, ref):
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape, f"shape {tuple(o.shape)} but the reference gives {tuple(r.shape)}"
        if o.is_floating_point():
            scale = float(r.float().abs().max()) if r.numel() else 1.0
            torch.testing.assert_close(o.float(), r.float(), rtol=0.03, atol=0.03 * max(scale, 1e-3))
        else:
            assert o.dtype == r.dtype and torch.equal(o, r)


@pytest.mark.filterwarnings("ignore:ratio_4bit")
@pytest.mark.parametrize("op", sorted(REFERENCES))
@SETTINGS
@given(data=st.data())
def test_op_arguments(op, data):
    torch.manual_seed(0)
    valid = build(data.draw, op)
    kind, args = mutate(data.draw, valid)
    try:
        out = getattr(OPS, op)(*args)
    except (ValueError, TypeError) as exc:  # a clean refusal, with a message
        assert kind != "none" and str(exc)
        return
    if kind in ("none", "strided"):
        _close(out, REFERENCES[op](*valid))
        return
    try:
        ref = REFERENCES[op](*args)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{op} accepted a {kind} mutation that the reference refuses ({type(exc).__name__}: {exc})")
    _close(out, ref)


# -- what this fuzzing found (kept as plain regressions) ------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: OPS.nf4_quantize(torch.randn(10), 2**62),  # was std::bad_alloc (a per-block buffer of 2**62 bytes)
    lambda: OPS.nf4_quantize_absmax(torch.rand(10), torch.zeros(1), reference.dynamic_map(), 2**62),
    lambda: OPS.nf4_dequantize(*[nf4.quantize(torch.randn(64)).tensors[k] for k in nf4.NF4QuantizedTensor.tensor_names],
                               64, 64, 2**62, torch.float32),
], ids=["nf4_quantize", "nf4_quantize_absmax", "nf4_dequantize"])
def test_huge_nf4_block_sizes_are_refused(call):
    with pytest.raises(ValueError, match="block_size"):
        call()


def test_references_take_zero_rows():
    # The references reshaped with -1, which is ambiguous for zero elements.
    assert reference.unpack_2bit(torch.zeros(0, 2, dtype=torch.int32), 20).shape == (0, 20)
    assert reference.ternary_unpack(torch.zeros(0, 32, dtype=torch.uint8), 100).shape == (0, 100)
    assert reference.unpack_bitmask(torch.zeros(0, 1, dtype=torch.int32), 3).shape == (0, 3)
    assert reference.dequantize_activations_int8(torch.zeros(0, 64), 32).shape == (0, 64)
    assert reference.int8_dequantize(torch.zeros(0, 64, dtype=torch.int8), torch.zeros(0, 2, dtype=torch.float16),
                                     torch.float32).shape == (0, 64)
