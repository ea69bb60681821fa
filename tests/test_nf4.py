"""NF4: byte-exactness with bitsandbytes (installed from PyPI; its default
backend runs on this CPU), kernels vs reference on every device and forced
CPU instruction set, the bitsandbytes state_dict both ways, NF4Linear, and
bad input."""

import json
import logging

import pytest
import torch

import memboost
import memboost.formats.nf4 as nf4
from memboost import reference
from memboost.nn import NF4Linear

from conftest import llm_like_weight, rel_err

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402  (the 'test' extra installs it: a missing oracle fails, never skips)
import bitsandbytes.functional as bnbF  # noqa: E402

STATE = nf4.NF4QuantizedTensor.tensor_names
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["portable", "avx2", "avx512"]


def _state(q):
    return [q.tensors[k] for k in STATE]


def _bnb_default_blockwise(x, code, block_size):
    """bitsandbytes' pure-PyTorch quantize_blockwise (its reference backend)."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, x, code, block_size)


def test_codebook_and_dynamic_map_equal_bitsandbytes():
    assert torch.equal(reference.nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(reference.dynamic_map(), bnbF.create_dynamic_map())
    assert reference.nf4_codebook_int8().tolist() == [-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56,
                                                       71, 92, 127]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 128), (37, 51), (7,)])  # 37*51 and 7: not multiples of the block
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_equal_bitsandbytes(dtype, shape, double_quant):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    q = nf4.quantize(w, 64, double_quant)
    packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(q.tensors["codes"], packed.reshape(-1))
    if not double_quant:
        assert torch.equal(q.tensors["absmax"], st.absmax)
    else:
        assert float(q.tensors["nested_offset"]) == float(st.offset)
        assert torch.equal(q.tensors["nested_absmax"], st.state2.absmax)
        assert torch.equal(q.tensors["nested_map"], st.state2.code)
        # byte for byte with bitsandbytes' native CPU kernel (what quantize_4bit
        # runs on CPU tensors), which snaps to a 65,536-point grid before it
        # picks the map entry ...
        assert torch.equal(q.tensors["absmax"], st.absmax)
        # ... where its pure-PyTorch backend takes the nearest entry instead
        # (the two differ on a few codes; ours follows the kernel).
        plain = nf4.quantize(w, 64, False).tensors["absmax"]
        ref_codes, ref_nested = _bnb_default_blockwise(plain - st.offset, bnbF.create_dynamic_map(), 256)
        assert int((q.tensors["absmax"] != ref_codes).sum()) <= max(1, plain.numel() // 100)
    # each side dequantizes the other's data to the same values
    ours_from_bnb = nf4.from_bitsandbytes(_bnb_state_dict(packed, st))
    assert torch.equal(ours_from_bnb.dequantize(), bnbF.dequantize_4bit(packed, st))
    sd = nf4.to_bitsandbytes(q)
    st2 = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(sd["weight"], st2), q.dequantize())


def _bnb_default_dequantize_4bit(packed, st, block_size):
    """bitsandbytes' pure-PyTorch dequantize_4bit (its reference backend)."""
    absmax = st.absmax if st.state2 is None else bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    return op._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, packed, absmax, block_size, "nf4", st.shape,
                     st.dtype)


def _heavy_tailed(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.randn(*shape, generator=g).abs().pow(3).clamp(max=50)
    return w.to(dtype)


# Many seeds, shapes, dtypes and block sizes: the double-quantized absmax
# codes (and everything else) equal what bitsandbytes' native CPU kernel
# writes. 512x1024 heavy-tailed with blocks of 64 is the case where the
# nearest-entry rule differed on 31 of 8,192 codes.
@pytest.mark.slow
@pytest.mark.parametrize("block_size", [32, 64, 128, 256, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_equals_bitsandbytes_kernel(block_size, dtype):
    shapes = [(512, 1024), (300, 700), (257, 1031), (64, 64), (3, 5)]
    differs_from_nearest = 0
    for seed in range(3):
        for shape in shapes:
            w = _heavy_tailed(shape, seed, dtype) if seed % 2 else \
                (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
            q = nf4.quantize(w, block_size, True)
            packed, st = bnbF.quantize_4bit(w, blocksize=block_size, compress_statistics=True, quant_type="nf4")
            t = q.tensors
            assert torch.equal(t["codes"], packed.reshape(-1)), (seed, shape)
            assert torch.equal(t["absmax"], st.absmax), (seed, shape)
            assert torch.equal(t["nested_absmax"], st.state2.absmax), (seed, shape)
            assert float(t["nested_offset"]) == float(st.offset)
            # dequantized: equal to bitsandbytes' own reference decoder. (Its
            # 0.50.2 CPU dequantize kernel disagrees with that reference for
            # blocks of 128 and more in several shapes, a 1-D weight among
            # them, on the same stored data: a bitsandbytes bug, not a code.)
            assert torch.equal(q.dequantize(), _bnb_default_dequantize_4bit(packed, st, block_size)), (seed, shape)
            plain = nf4.quantize(w, block_size, False).tensors["absmax"]
            nearest = _bnb_default_blockwise(plain - st.offset, bnbF.create_dynamic_map(), 256)[0]
            differs_from_nearest += int((nearest != st.absmax).sum())
    assert differs_from_nearest > 0  # the grid rule was exercised where it matters


def test_nested_codes_at_map_entries_and_midpoints_equal_bitsandbytes_kernel():
    """Values placed on every map entry, every float32 midpoint and one ulp
    either side: the cases a search gets wrong first."""
    m = bnbF.create_dynamic_map()
    mids = 0.5 * (m[:-1] + m[1:])
    vals = torch.cat([m, mids, torch.nextafter(mids, torch.ones_like(mids)),
                      torch.nextafter(mids, -torch.ones_like(mids)), torch.linspace(-1, 1, 20001)])
    offset = torch.zeros(1)
    x = torch.cat([torch.ones(1), vals])  # the leading 1.0 makes the block's absmax 1: values stay as they are
    got = memboost.ops.nf4_quantize_absmax(x, offset, m, x.numel())
    want = torch.ops.bitsandbytes.quantize_blockwise(x, m, x.numel())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(reference.nf4_quantize_absmax(x, offset, m, x.numel())[0], want[0])
    zeros = torch.zeros(300)  # an all-zero nested block: bitsandbytes writes code 0
    assert torch.equal(memboost.ops.nf4_quantize_absmax(zeros, offset, m, 256)[0],
                       torch.ops.bitsandbytes.quantize_blockwise(zeros, m, 256)[0])


def _bnb_state_dict(packed, st, prefix="weight"):
    return {prefix: packed, **{f"{prefix}.{k}": v for k, v in st.as_dict(packed=True).items()}}


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_loads_ours_and_back(double_quant):
    lin = torch.nn.Linear(128, 48)
    q = nf4.quantize(lin.weight.detach(), 64, double_quant)
    layer = bnb.nn.Linear4bit(128, 48, compress_statistics=double_quant, quant_type="nf4")
    sd = nf4.to_bitsandbytes(q)
    # how transformers loads a pre-quantized checkpoint into a Linear4bit
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], {k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, device="cpu", module=layer)
    layer.bias = torch.nn.Parameter(lin.bias.detach().clone())
    x = torch.randn(5, 128)
    assert rel_err(layer(x), q.linear(x, lin.bias)) < 1e-6
    back = nf4.from_bitsandbytes(layer.state_dict())
    for k in STATE:
        assert torch.equal(back.tensors[k], q.tensors[k]), k
    # a checkpoint bitsandbytes wrote itself
    packed, st = bnbF.quantize_4bit(lin.weight.detach(), blocksize=64, compress_statistics=double_quant,
                                    quant_type="nf4")
    layer2 = bnb.nn.Linear4bit(128, 48, compress_statistics=double_quant, quant_type="nf4")
    layer2.weight = bnb.nn.Params4bit.from_prequantized(packed, st.as_dict(packed=True), device="cpu",
                                                        module=layer2)
    layer2.bias = torch.nn.Parameter(lin.bias.detach().clone())
    mine = NF4Linear.from_quantized(nf4.from_bitsandbytes(layer2.state_dict()), lin.bias)
    assert rel_err(mine(x), layer2(x)) < 1e-6


@pytest.mark.parametrize("double_quant", [False, True])
def test_kernels_match_reference(device, double_quant):
    for dtype in DTYPES:
        w = llm_like_weight(40, 200, dtype=dtype).to(device)  # blocks straddle rows
        codes, absmax = memboost.ops.nf4_quantize(w, 64)
        rc, ra = reference.nf4_quantize(w, 64)
        assert torch.equal(codes, rc) and torch.equal(absmax, ra)
        q = nf4.quantize(w, 64, double_quant)
        want = reference.nf4_dequantize(*_state(q), q.numel(), 64, 256, dtype).view(q.shape)
        assert torch.equal(q.dequantize(), want)
    if double_quant:
        t = q.tensors
        plain = memboost.ops.nf4_quantize(w, 64)[1]
        got = memboost.ops.nf4_quantize_absmax(plain, t["nested_offset"], t["nested_map"], 256)
        want = reference.nf4_quantize_absmax(plain, t["nested_offset"], t["nested_map"], 256)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,block_size", [((64, 256), 64), ((30, 200), 64), ((48, 512), 128), ((16, 96), 32)])
def test_linear_every_isa(monkeypatch, isa, shape, block_size):
    monkeypatch.setenv("MEMBOOST_CPU_ISA", isa)
    n, k = shape
    q = nf4.quantize(llm_like_weight(n, k), block_size)
    bias = torch.randn(n)
    for m in (1, 3, 6, 40):
        x = torch.randn(m, k)
        exact = reference.nf4_linear(x, *_state(q), n, block_size, 256, bias, 0)
        assert rel_err(q.linear(x, bias), exact) < 2e-6
        assert rel_err(q.linear(x, bias), torch.nn.functional.linear(x, q.dequantize(), bias)) < 2e-6
        # int8 path: equal to its reference up to float summation order; the
        # int8 rounding of x and of the codebook costs about 1% vs exact.
        y8 = q.linear(x, bias, act_bits=8)
        # (the reference takes the int8 path exactly where the kernel does: k = 200 stays exact)
        assert rel_err(y8, reference.nf4_linear(x, *_state(q), n, block_size, 256, bias, 8)) < 1e-5
        assert rel_err(y8, exact) < 0.03


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_block_scales_every_isa(monkeypatch, isa, double_quant):
    # 300 x 576: 2700 blocks, so the kernels' runs of decoded block scales
    # (2048 at most) start mid-row and an 8-scale step crosses a nested block
    # (256 blocks) edge; plain absmax is read in place
    monkeypatch.setenv("MEMBOOST_CPU_ISA", isa)
    n, k = 300, 576
    q = nf4.quantize(llm_like_weight(n, k), 64, double_quant)
    for m in (1, 5):
        x = torch.randn(m, k)
        for act_bits, tol in ((0, 2e-6), (8, 1e-5)):
            want = reference.nf4_linear(x, *_state(q), n, 64, 256, None, act_bits)
            assert rel_err(q.linear(x, act_bits=act_bits), want) < tol, (m, act_bits)


def test_linear_batch_shapes_dtypes_and_autograd(device):
    q = nf4.quantize(llm_like_weight(32, 128).to(device))
    for dtype in DTYPES:
        x = torch.randn(2, 3, 128, device=device, dtype=dtype)
        y = q.linear(x)
        assert y.shape == (2, 3, 32) and y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(y, x.float() @ q.dequantize().float().T) < tol
    x = torch.randn(4, 128, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    q.linear(x, bias).square().sum().backward()
    w = q.dequantize()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5 and rel_err(bias.grad, b2.grad) < 1e-5


def test_opcheck(device):
    for dq in (False, True):
        q = nf4.quantize(llm_like_weight(24, 128).to(device), 64, dq)
        st = _state(q)
        w = llm_like_weight(24, 128).to(device)
        torch.library.opcheck(torch.ops.memboost.nf4_quantize.default, (w, 64))
        torch.library.opcheck(torch.ops.memboost.nf4_dequantize.default, (*st, q.numel(), 64, 256, torch.float16))
        x = torch.randn(3, 128, device=device)
        torch.library.opcheck(torch.ops.memboost.nf4_linear.default, (x, *st, 24, 64, 256, torch.randn(24), 0))
        torch.library.opcheck(torch.ops.memboost.nf4_linear.default,
                              (x.requires_grad_(), *st, 24, 64, 256, None, 0))
    plain = memboost.ops.nf4_quantize(w, 64)[1]
    torch.library.opcheck(torch.ops.memboost.nf4_quantize_absmax.default,
                          (plain, plain.mean().reshape(1), reference.dynamic_map(device), 256))


def test_bits_state_dict_and_to(tmp_path):
    q = nf4.quantize(torch.randn(4096, 4096))
    assert abs(q.avg_bits - 4.127) < 0.001, q.avg_bits  # 4 + 8/64 + 32/(64*256) + the 1 KiB map
    w = llm_like_weight(4096, 256)
    q = nf4.quantize(w)
    assert abs(nf4.quantize(w, double_quant=False).avg_bits - 4.5) < 0.01
    path = tmp_path / "w.safetensors"
    memboost.save_safetensors(q.state_dict(), str(path))
    q2 = memboost.QuantizedTensor.from_state_dict(memboost.load_safetensors(str(path)))
    assert torch.equal(q2.dequantize(), q.dequantize())
    assert q.to(torch.float16).dequantize().dtype == torch.float16
    assert torch.equal(nf4.dequantize_nf4(nf4.quantize_nf4(w, 64)), q.dequantize())
    assert "NF4QuantizedTensor" in repr(q) and "double_quant=True" in repr(q)


def test_nf4linear_drop_in_and_state_dict():
    lin = torch.nn.Linear(256, 64)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(5, 256)
    assert rel_err(layer(x), lin(x)) < 0.15
    fresh = NF4Linear(256, 64)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    layer.half()
    assert layer(x.half()).dtype == torch.float16
    report = memboost.quantize_model(torch.nn.Sequential(torch.nn.Linear(128, 128)), "nf4")
    assert report is not None
    fast = NF4Linear.from_linear(lin, act_bits=8)
    assert rel_err(fast(x), layer.float()(x)) < 0.03


# ------------------------------------------------------------------ bad input
def test_bad_weights():
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="float16, torch.bfloat16 or torch.float32"):
        nf4.quantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_size"):
        nf4.quantize(torch.ones(64), block_size=48)


def test_bad_bitsandbytes_state():
    q = nf4.quantize(llm_like_weight(16, 64))
    sd = nf4.to_bitsandbytes(q)
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="'fp4' is not supported"):
        nf4.from_bitsandbytes(fp4)
    key = "weight.quant_state.bitsandbytes__nf4"
    for raw in (sd[key][:-5], torch.tensor(list(b"\xff\xfe{"), dtype=torch.uint8)):
        with pytest.raises(ValueError, match="valid JSON"):
            nf4.from_bitsandbytes({**sd, key: raw})
    info = json.loads(bytes(sd[key].tolist()))
    with pytest.raises(ValueError, match="quant_type 'fp4'"):
        nf4.from_bitsandbytes({**sd, key: torch.tensor(list(json.dumps({**info, "quant_type": "fp4"}).encode()),
                                                       dtype=torch.uint8)})
    with pytest.raises(ValueError, match="'absmax' must have 16 entries"):
        nf4.from_bitsandbytes({**sd, "weight.absmax": sd["weight.absmax"][:-1]})
    with pytest.raises(ValueError, match="missing 'weight.nested_absmax'"):
        nf4.from_bitsandbytes({k: v for k, v in sd.items() if k != "weight.nested_absmax"})
    with pytest.raises(ValueError, match="not the NF4 codebook"):
        nf4.from_bitsandbytes({**sd, "weight.quant_map": torch.linspace(-1, 1, 16)})


def test_bad_state_refused_before_kernels():
    q = nf4.quantize(llm_like_weight(16, 64), double_quant=False)
    st = q.state_dict()
    bad = dict(st, absmax=st["absmax"].clone())
    bad["absmax"][0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        memboost.QuantizedTensor.from_state_dict(bad)
    with pytest.raises(ValueError, match="'codes' must have 512 entries"):
        memboost.QuantizedTensor.from_state_dict(dict(st, codes=st["codes"][:-1]))
    with pytest.raises(ValueError, match="'absmax' must have"):
        torch.ops.memboost.nf4_dequantize.default(*_state(q)[:1], st["absmax"][:3], *_state(q)[2:], 1024, 64, 256,
                                                  torch.float32)
