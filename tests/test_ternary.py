import io

import numpy as np
import pytest
import torch
from torch import nn

import memboost
import memboost.formats.ternary as ternary
from memboost import ops, reference
from memboost.nn import QuantizedLinear, TernaryLinear
from memboost.formats.ternary import TernaryQuantizedTensor

from conftest import DEVICES, ISAS, llm_like_weight, rel_err  # `target`: conftest


def _trits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).to(torch.int8)


def _weight(n, k, group_size=0, per_tensor=False, seed=0, device="cpu"):
    """Random packed trits and positive scales of every granularity."""
    g = torch.Generator().manual_seed(seed + 1)
    packed = reference.ternary_pack(_trits(n, k, seed=seed))
    groups = ternary.num_groups(k, group_size)
    scales = torch.rand(1 if per_tensor else n, groups, generator=g) + 0.25
    return packed.to(device), scales.to(device)


# -- layout -------------------------------------------------------------------

@pytest.mark.parametrize("cols", [1, 127, 128, 200, 256, 576, 1000])
def test_pack_unpack_match_reference_and_round_trip(device, cols):
    t = _trits(3, 5, cols, seed=cols)
    packed = ops.ternary_pack(t.to(device))
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, reference.ternary_row_bytes(cols))
    assert torch.equal(packed.cpu(), reference.ternary_pack(t))
    assert torch.equal(ops.ternary_unpack(packed, cols).cpu(), t)
    assert torch.equal(reference.ternary_unpack(packed.cpu(), cols), t)


def test_layout_is_the_documented_index_math():
    # trits.h: col -> byte (col / 128) * 32 + col % 32, shift 2 * ((col % 128) / 32); code t + 1; pad code 1
    cols = 300
    t = _trits(1, cols, seed=3)[0]
    packed = reference.ternary_pack(t.unsqueeze(0))[0]
    for col in range(cols):
        byte, shift = (col // 128) * 32 + col % 32, 2 * ((col % 128) // 32)
        assert (int(packed[byte]) >> shift) & 3 == int(t[col]) + 1
    assert packed.numel() == 96
    for col in range(cols, 384):  # padding
        assert (int(packed[(col // 128) * 32 + col % 32]) >> (2 * ((col % 128) // 32))) & 3 == 1


def test_packed_bytes_are_gguf_tq2_0_qs():
    import gguf.quants as gguf_quants  # installed by `make test` (the hf extra)
    from gguf import GGMLQuantizationType
    # A row of 512 trits scaled by 1: TQ2_0 quantizes it back to the same trits (d = absmax = 1).
    t = _trits(4, 512, seed=5)
    t[:, 0] = 1  # every block's absmax is 1
    t[:, 256] = -1
    blocks = gguf_quants.quantize(t.numpy().astype(np.float32), GGMLQuantizationType.TQ2_0)
    blocks = blocks.reshape(4, 2, 66)  # per 256-trit block: 64 bytes qs + fp16 d
    qs = torch.from_numpy(blocks[..., :64].copy()).reshape(4, 128)
    assert torch.equal(reference.ternary_pack(t), qs)
    assert torch.equal(ops.ternary_pack(t), qs)
    back = gguf_quants.dequantize(blocks.reshape(4, -1), GGMLQuantizationType.TQ2_0)
    assert np.array_equal(back, t.numpy().astype(np.float32))


def test_pack_refuses_values_outside_minus_one_to_one(device):
    t = _trits(2, 130).to(device)
    t[1, 129] = 2
    with pytest.raises(ValueError, match="'trits' must hold only -1, 0 and"):
        ops.ternary_pack(t)


def test_pack_and_unpack_name_bad_arguments():
    with pytest.raises(ValueError, match="'trits' must have dtype torch.int8"):
        ops.ternary_pack(torch.zeros(4, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'packed' must have last dimension 32"):
        ops.ternary_unpack(torch.zeros(4, 33, dtype=torch.uint8), 100)


# -- kernels vs reference -----------------------------------------------------

GRANULARITIES = [pytest.param(0, True, id="tensor"), pytest.param(0, False, id="row"),
                 pytest.param(128, False, id="g128"), pytest.param(256, False, id="g256")]


@pytest.mark.parametrize("group_size,per_tensor", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_kernel_matches_reference(device, group_size, per_tensor, dtype):
    packed, scales = _weight(37, 600, group_size, per_tensor, device=device)
    got = ops.ternary_dequantize(packed, scales, 600, group_size, dtype)
    assert got.dtype == dtype and got.shape == (37, 600) and got.device.type == device
    want = reference.ternary_dequantize(packed.cpu(), scales.cpu(), 600, group_size, dtype)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("group_size,per_tensor", GRANULARITIES)
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 5), (33,)])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_linear_kernel_matches_reference_on_every_path(target, group_size, per_tensor, batch, act_bits):
    device = target
    n, k = 70, 600  # 600: a partial last chunk and, for groups, a partial last group
    packed, scales = _weight(n, k, group_size, per_tensor, seed=len(batch), device=device)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*batch, k, generator=g).to(device)
    bias = torch.randn(n, generator=g).to(device)
    y = ops.ternary_linear(x, packed, scales, bias, k, group_size, act_bits)
    assert y.shape == (*batch, n) and y.dtype == torch.float32
    want = reference.ternary_linear(x.cpu(), packed.cpu(), scales.cpu(), bias.cpu(), k, group_size, act_bits)
    # int8: exact integer dots, only the float sum over groups may differ in order
    assert rel_err(y, want) < 2e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_linear_half_precision_inputs(device, dtype, tol, act_bits):
    packed, scales = _weight(40, 256, device=device)
    x = torch.randn(4, 256).to(dtype).to(device)
    y = ops.ternary_linear(x, packed, scales, None, 256, 0, act_bits)
    assert y.dtype == dtype
    want = reference.ternary_linear(x.cpu(), packed.cpu(), scales.cpu(), None, 256, 0, act_bits)
    assert rel_err(y, want) < tol


def test_exact_path_equals_dequantize_then_linear(target):
    device = target
    q = ternary.quantize(llm_like_weight(96, 1000).to(device), group_size=256)
    x = torch.randn(5, 1000).to(device)
    want = torch.nn.functional.linear(x, q.dequantize())
    assert rel_err(q.linear(x), want) < 1e-6
    x40 = torch.randn(40, 1000).to(device)
    assert rel_err(q.linear(x40), torch.nn.functional.linear(x40, q.dequantize())) < 1e-6


def test_int8_path_is_close_to_exact(target):
    device = target
    # The stated tolerance of W1.58A8 against the exact product: per-row int8 activations
    # (step amax/127) on Gaussian inputs give about 0.5% relative output error; 2% bound.
    q = ternary.quantize(llm_like_weight(256, 2048).to(device))
    x = torch.randn(8, 2048).to(device)
    err = rel_err(q.linear(x, act_bits=8), q.linear(x))
    assert 1e-4 < err < 0.02


def test_isa_paths_agree_bitwise_for_per_row_scales(monkeypatch):
    q = ternary.quantize(llm_like_weight(64, 4096))
    x = torch.randn(3, 4096)
    outs = []
    for name in ISAS:
        monkeypatch.setenv("MEMBOOST_CPU_ISA", name)
        outs.append(q.linear(x, act_bits=8))
    # one group per row: integer dot, then the same two float multiplications
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_opcheck(device):
    t = _trits(6, 300).to(device)
    torch.library.opcheck(torch.ops.memboost.ternary_pack.default, (t,))
    packed, scales = _weight(20, 300, 128, device=device)
    torch.library.opcheck(torch.ops.memboost.ternary_unpack.default, (packed, 300))
    torch.library.opcheck(torch.ops.memboost.ternary_dequantize.default, (packed, scales, 300, 128, torch.float16))
    x = torch.randn(3, 300, device=device)
    bias = torch.randn(20, device=device)
    for act_bits in (0, 8):
        torch.library.opcheck(torch.ops.memboost.ternary_linear.default, (x, packed, scales, bias, 300, 128, act_bits))
        torch.library.opcheck(torch.ops.memboost.ternary_linear.default,
                              (x.clone().requires_grad_(), packed, scales, None, 300, 128, act_bits))


@pytest.mark.parametrize("act_bits", [0, 8])
def test_gradients_flow_to_input_and_bias(device, act_bits):
    packed, scales = _weight(24, 256, device=device)
    x = torch.randn(2, 3, 256, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    ops.ternary_linear(x, packed, scales, bias, 256, 0, act_bits).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    w = reference.ternary_dequantize(packed, scales, 256, 0, torch.float32)
    y2 = torch.nn.functional.linear(x2, w, b2)
    if act_bits == 8:  # straight-through: the gradient of the exact product at the int8 output
        y2 = y2 + (ops.ternary_linear(x2.detach(), packed, scales, bias.detach(), 256, 0, 8) - y2).detach()
    y2.square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5 and rel_err(bias.grad, b2.grad) < 1e-5


def test_native_ops_name_bad_arguments():
    packed, scales = _weight(8, 256)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="'packed' must have 64 bytes per row"):
        ops.ternary_linear(x, packed[:, :60].contiguous(), scales, None, 256, 0, 0)
    with pytest.raises(ValueError, match="'scales' must have shape"):
        ops.ternary_linear(x, packed, scales[:3].contiguous(), None, 256, 0, 0)
    with pytest.raises(ValueError, match="'group_size'"):
        ops.ternary_dequantize(packed, scales, 256, 64, torch.float32)
    with pytest.raises(ValueError, match="'act_bits'"):
        ops.ternary_linear(x, packed, scales, None, 256, 0, 4)
    with pytest.raises(ValueError, match="'x' must have last dimension"):
        ops.ternary_linear(torch.randn(2, 255), packed, scales, None, 256, 0, 0)
    with pytest.raises(ValueError, match="'scales' must have dtype torch.float32"):
        ops.ternary_dequantize(packed, scales.half(), 256, 0, torch.float32)
    with pytest.raises(ValueError, match="'x' must be torch.float16"):
        ops.ternary_linear(x.double(), packed, scales, None, 256, 0, 0)


# -- quantize -------------------------------------------------------------------

def test_absmean_is_the_bitnet_formula_per_tensor_row_and_group(device):
    w = llm_like_weight(16, 512).to(device)
    eps = ternary.EPS
    q = ternary.quantize(w, per_row=False)
    gamma = w.abs().mean()
    assert torch.equal(q.trits().cpu(), torch.clamp(torch.round(w / (gamma + eps)), -1, 1).to(torch.int8).cpu())
    assert q.tensors["scales"].shape == (1, 1) and torch.allclose(q.tensors["scales"], gamma.reshape(1, 1))
    assert q.granularity == "tensor"
    q = ternary.quantize(w)
    gamma = w.abs().mean(1, keepdim=True)
    assert torch.equal(q.trits(), torch.clamp(torch.round(w / (gamma + eps)), -1, 1).to(torch.int8))
    assert q.granularity == "row"
    q = ternary.quantize(w, group_size=128)
    gamma = w.abs().reshape(16, 4, 128).mean(-1)
    torch.testing.assert_close(q.tensors["scales"], gamma)
    t = torch.clamp(torch.round(w / (gamma.repeat_interleave(128, 1) + eps)), -1, 1).to(torch.int8)
    assert torch.equal(q.trits(), t)
    torch.testing.assert_close(q.dequantize(), t.float() * gamma.repeat_interleave(128, 1))


def test_absmax_and_partial_last_group(device):
    w = llm_like_weight(8, 300).to(device)
    q = ternary.quantize(w, method="absmax", group_size=256)
    assert q.tensors["scales"].shape == (8, 2)
    torch.testing.assert_close(q.tensors["scales"][:, 1], w[:, 256:].abs().amax(1))
    q = ternary.quantize(w, group_size=256)  # the last group's mean is over its 44 columns
    torch.testing.assert_close(q.tensors["scales"][:, 1], w[:, 256:].abs().mean(1))


def test_finer_scales_lower_the_error_and_zero_rows_stay_zero(device):
    w = llm_like_weight(64, 1024).to(device)
    errs = [rel_err(ternary.quantize(w, **kw).dequantize(), w)
            for kw in ({"per_row": False}, {}, {"group_size": 128})]
    assert errs[0] > errs[1] > errs[2]
    w[3] = 0
    q = ternary.quantize(w)
    assert bool((q.dequantize()[3] == 0).all()) and float(q.tensors["scales"][3, 0]) == 0.0


def test_avg_bits_counts_every_stored_byte():
    q = ternary.quantize(llm_like_weight(64, 576))
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert q.avg_bits == pytest.approx(8 * stored / (64 * 576))
    # 576 columns pad to 640 trits (160 bytes a row) plus a float32 scale per row
    assert q.avg_bits > 8 * (64 * 160 + 64 * 4) / (64 * 576)
    assert ternary.quantize(llm_like_weight(256, 4096)).avg_bits < 2.05


def test_state_dict_round_trip_to_and_repr(device):
    q = ternary.quantize(llm_like_weight(40, 300, dtype=torch.float16).to(device), group_size=128)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = memboost.QuantizedTensor.from_state_dict(torch.load(buf, weights_only=True))
    assert isinstance(q2, TernaryQuantizedTensor) and q2.group_size == 128
    assert torch.equal(q2.dequantize(), q.dequantize()) and q2.dtype == torch.float16
    q3 = q.to("cpu").to(torch.float32)
    assert q3.dequantize().dtype == torch.float32 and q3.device.type == "cpu"
    assert "TernaryQuantizedTensor(shape=(40, 300)" in repr(q) and "scales=group128" in repr(q)


def test_quantize_names_bad_input():
    w = llm_like_weight(8, 256)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(memboost.MemboostError, match="'w' contains NaN"):
        ternary.quantize(bad)
    with pytest.raises(TypeError, match="'w' must be torch.float16"):
        ternary.quantize(w.to(torch.int32))
    with pytest.raises(memboost.MemboostError, match="'method'"):
        ternary.quantize(w, method="median")
    with pytest.raises(memboost.MemboostError, match="'group_size'"):
        ternary.quantize(w, group_size=64)
    with pytest.raises(memboost.MemboostError, match="per_row=False"):
        ternary.quantize(w, group_size=128, per_row=False)
    with pytest.raises(memboost.MemboostError, match="'eps'"):
        ternary.quantize(w, eps=-1.0)
    with pytest.raises(memboost.MemboostError, match="'w' must be 2-D"):
        ternary.quantize(w[0])
    with pytest.raises(memboost.MemboostError, match="'act_bits'"):
        ternary.quantize(w).linear(torch.randn(1, 256), act_bits=4)


def test_code_check_in_row_slices_finds_a_late_code_3(monkeypatch):
    """The code check on load works a slice of rows at a time (whole-weight temporaries left 1.6 GiB of heap
    resident after loading an 8B-shaped model): a code 3 in the last slice's last row is still found."""
    from memboost.formats import ternary as ternary_format

    state = ternary.quantize(llm_like_weight(9, 256)).state_dict()
    monkeypatch.setattr(ternary_format, "_CHECK_SLICE_BYTES", 2 * 64)   # two of the 64-byte rows per slice
    memboost.QuantizedTensor.from_state_dict(state)
    for row in (0, 8):
        code3 = state["packed"].clone()
        code3[row, -1] |= 0xC0   # the row's last trit becomes code 3
        with pytest.raises(memboost.MemboostError, match="invalid 2-bit code 3"):
            memboost.QuantizedTensor.from_state_dict({**state, "packed": code3})


def test_corrupt_state_is_refused(device):
    state = {k: v.to(device) for k, v in ternary.quantize(llm_like_weight(8, 200)).state_dict().items()}

    def load(**changes):
        return memboost.QuantizedTensor.from_state_dict({**state, **changes})

    load()
    code3 = state["packed"].clone()
    code3[2, 5] |= 0x0C  # trit 32 + 5 of the row becomes code 3
    with pytest.raises(memboost.MemboostError, match="invalid 2-bit code 3"):
        load(packed=code3)
    pad = state["packed"].clone()
    pad[0, 32 + 31] = 0x00  # byte 31 of the second chunk: trits 159, 191, 223, 255 > 200 -> code 0
    with pytest.raises(memboost.MemboostError, match="padding"):
        load(packed=pad)
    with pytest.raises(memboost.MemboostError, match="'packed' must have shape"):
        load(packed=state["packed"][:, :32].contiguous())
    with pytest.raises(memboost.MemboostError, match="'scales' must have shape"):
        load(scales=state["scales"][:4])
    nan = state["scales"].clone()
    nan[1] = float("inf")
    with pytest.raises(memboost.MemboostError, match="'scales' contains NaN"):
        load(scales=nan)
    with pytest.raises(memboost.MemboostError, match="'scales' must have dtype"):
        load(scales=state["scales"].half())


# -- layers ---------------------------------------------------------------------

def test_ternary_linear_drop_in(device, tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(300, 50).to(device)
    layer = TernaryLinear.from_linear(linear, group_size=128)
    x = torch.randn(2, 3, 300, device=device)
    q = layer.weight.tensor()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, q.dequantize(), linear.bias))
    assert "act_bits" not in repr(layer) and "scales=group128" in repr(layer) and "avg_bits=" in repr(layer)
    torch.save(layer.state_dict(), tmp_path / "t.pt")
    fresh = TernaryLinear(300, 50, group_size=128, dtype=torch.float32, device=device)
    fresh.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    assert torch.equal(fresh(x), layer(x))
    layer8 = TernaryLinear.from_linear(linear, act_bits=8)
    assert "act_bits=8" in repr(layer8)
    ref = reference.ternary_linear(x.cpu(), *[t.cpu() for t in layer8.weight.tensor().tensors.values()],
                                   linear.bias.detach().cpu(), 300, 0, 8)
    assert rel_err(layer8(x), ref) < 2e-6
    half = layer8.half()
    assert half(x.half()).dtype == torch.float16
    with pytest.raises(memboost.MemboostError, match="'act_bits'"):
        TernaryLinear.from_linear(linear, act_bits=4)


def test_quantize_model_ternary_on_a_small_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    x = torch.randn(4, 64, device=device)
    y = model(x)
    report = memboost.quantize_model(model, "ternary", skip=(), group_size=128)
    assert len(report.replaced) == 3 and all(isinstance(m, TernaryLinear) for m in (model[0], model[2], model[4]))
    assert QuantizedLinear.for_format("ternary") is TernaryLinear
    assert rel_err(model(x), y) < 0.8  # ternary is coarse; a broken kernel is ~1 or worse
    state = model.state_dict()
    fresh = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    memboost.load_quantized_(fresh, state)
    assert torch.equal(fresh(x), model(x))
