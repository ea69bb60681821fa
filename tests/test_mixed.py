import io
import os

import pytest
import torch

import memboost
from memboost import ops, reference
from memboost.formats.mixed import MixedQuantizedTensor

from conftest import llm_like_weight, rel_err


def _parts(q):
    return [q.tensors[k] for k in q.tensor_names]


def _quantize(device, shape=(96, 512), dtype=torch.float32, **kw):
    # quarter-step zero points by default: the kernels must decode them as well as whole ones
    kw.setdefault("exact_zero", False)
    return memboost.quantize(llm_like_weight(*shape, dtype=dtype).to(device), **kw)


def _two_bit_zero_nibbles(q) -> torch.Tensor:
    t = {k: v.cpu() for k, v in q.tensors.items()}
    four = reference.unpack_bitmask(t["mask"], t["meta"].shape[1])
    return (t["meta"] >> 4)[~four]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [16, 64, 128])
def test_dequantize_kernel_matches_reference(device, dtype, group_size):
    q = _quantize(device, dtype=dtype, ratio_4bit=0.3, group_size=group_size, outlier_fraction=0.01)
    got = memboost.dequantize(q)
    assert got.dtype == dtype and got.device.type == device and got.shape == (96, 512)
    want = reference.mixed_dequantize(*[t.cpu() for t in _parts(q)], group_size, dtype)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [(1,), (2,), (3,), (8,), (2, 5), (33,), (70,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_kernel_matches_reference(device, dtype, tol, batch, with_bias):
    q = _quantize(device, shape=(200, 384), dtype=dtype, ratio_4bit=0.25, outlier_fraction=0.005)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, 384, generator=g).to(dtype).to(device)
    bias = torch.randn(200, generator=g).to(dtype).to(device) if with_bias else None
    y = q.linear(x, bias)
    assert y.shape == (*batch, 200) and y.dtype == dtype and y.device.type == device
    want = reference.mixed_linear(x.cpu(), *[t.cpu() for t in _parts(q)], None if bias is None else bias.cpu(),
                                  q.group_size)
    assert rel_err(y, want) < tol


def test_linear_many_activation_rows_spans_weight_row_blocks(device):
    # From 32 activation rows the CPU decodes blocks of 2**19 / in_features weight
    # rows (256 here) for a GEMM: 300 rows give a full block and a partial one.
    q = _quantize(device, shape=(300, 2048), ratio_4bit=0.2, outlier_fraction=0.005)
    x = torch.randn(40, 2048).to(device)
    bias = torch.randn(300).to(device)
    want = reference.mixed_linear(x.cpu(), *[t.cpu() for t in _parts(q)], bias.cpu(), q.group_size)
    assert rel_err(q.linear(x, bias), want) < 1e-5


def test_linear_row_count_not_multiple_of_warp_rows(device):
    # 7 rows and K=48 (3 words per row: not a multiple of the 4-word vector path)
    q = _quantize(device, shape=(7, 48), ratio_4bit=0.4, group_size=16, outlier_fraction=0.05)
    x = torch.randn(5, 48).to(device)
    want = reference.mixed_linear(x.cpu(), *[t.cpu() for t in _parts(q)], None, 16)
    assert rel_err(q.linear(x), want) < 1e-5


def test_opcheck(device):
    q = _quantize(device, shape=(40, 128), ratio_4bit=0.5, outlier_fraction=0.02)
    parts = _parts(q)
    torch.library.opcheck(torch.ops.memboost.mixed_dequantize.default, (*parts, 64, torch.float16))
    x = torch.randn(3, 128, device=device)
    bias = torch.randn(40, device=device)
    torch.library.opcheck(torch.ops.memboost.mixed_linear.default, (x, *parts, bias, 64))
    torch.library.opcheck(torch.ops.memboost.mixed_linear.default, (x.requires_grad_(), *parts, None, 64))
    torch.library.opcheck(torch.ops.memboost.mixed_linear.default, (x, *parts, bias, 64, 8))


def test_ratio_acts_and_error_falls_as_ratio_rises(device):
    w = llm_like_weight(128, 1024).to(device)
    errors, bits = [], []
    for ratio in (0.0, 0.1, 0.25, 0.5, 1.0):
        q = memboost.quantize(w, ratio_4bit=ratio, outlier_fraction=0.0)
        assert abs(q.ratio_4bit - ratio) <= 0.5 / 16 + 1e-9  # 16 groups per row
        errors.append(rel_err(memboost.dequantize(q), w))
        bits.append(q.avg_bits)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a < b for a, b in zip(bits, bits[1:])), bits
    q0 = memboost.quantize(w, ratio_4bit=0.0, outlier_fraction=0.0)
    assert q0.tensors["lowbits"].shape[1] == 0 and int(q0.tensors["mask"].abs().sum()) == 0
    q1 = memboost.quantize(w, ratio_4bit=1.0, outlier_fraction=0.0)
    assert reference.unpack_bitmask(q1.tensors["mask"].cpu(), 16).all()
    assert errors[-1] < errors[0] / 3  # 4-bit is several times finer than 2-bit


def test_exact_zero_keeps_zero_a_level_and_quarter_steps_lower_weight_error(device):
    w = llm_like_weight(128, 1024).to(device)
    exact = memboost.quantize(w, ratio_4bit=0.25, outlier_fraction=0.0, exact_zero=True)
    quarter = memboost.quantize(w, ratio_4bit=0.25, outlier_fraction=0.0, exact_zero=False)
    assert bool((_two_bit_zero_nibbles(exact) % 4 == 0).all())
    assert float((_two_bit_zero_nibbles(quarter) % 4 != 0).float().mean()) > 0.3
    assert rel_err(memboost.dequantize(quarter), w) < 0.97 * rel_err(memboost.dequantize(exact), w)
    # the default follows the calibration: exact without, quarter steps with
    default = memboost.quantize(w, ratio_4bit=0.25, outlier_fraction=0.0)
    assert torch.equal(default.tensors["meta"], exact.tensors["meta"])
    ones = torch.ones(1024, device=device)
    calibrated = memboost.quantize(w, ratio_4bit=0.25, outlier_fraction=0.0, calibration=ones)
    assert torch.equal(calibrated.tensors["meta"], quarter.tensors["meta"])


@pytest.mark.parametrize("exact_zero", [True, False])
def test_constant_groups_are_kept_and_do_not_coarsen_their_row(device, exact_zero):
    w = llm_like_weight(8, 512)
    w[0, :64] = 0.0   # e.g. a pruned block
    w[1, 64:128] = 0.05  # a constant block away from zero
    normal = w.clone()
    normal[0, :64], normal[1, 64:128] = w[2, :64], w[2, 64:128]
    got, ref = (memboost.dequantize(memboost.quantize(m.to(device), ratio_4bit=0.0, outlier_fraction=0.0,
                                                      exact_zero=exact_zero)).cpu() for m in (w, normal))
    assert torch.equal(got[0, :64], torch.zeros(64))
    assert float((got[1, 64:128] - 0.05).abs().max()) < 0.1 * 0.05
    # the rest of those rows is quantized about as finely as when the block is
    # ordinary (the block may still move the row's code grid a little: up to
    # 1.14x over 100 weight draws); a coarsened grid gave 1.4-1.7x
    for row, rest in ((0, slice(64, None)), (1, slice(128, None))):
        assert rel_err(got[row, rest], w[row, rest]) < 1.25 * rel_err(ref[row, rest], w[row, rest])


def test_avg_bits_counts_everything(device):
    q = _quantize(device, shape=(256, 1024), ratio_4bit=0.25, outlier_fraction=0.005)
    n, k, g = 256, 1024, 16
    n4 = 4
    nnz = q.num_outliers
    assert 0 < nnz <= n * round(0.005 * k)
    stored_bits = (n * k * 2            # 2-bit plane
                   + n * n4 * 64 * 2    # low bits of 4-bit groups
                   + n * g * 8          # scale code + zero per group
                   + n * 32             # 4-bit mask (16 groups -> one word)
                   + n * 2 * 32         # per-row log2 base and step
                   + (n + 1) * 32       # outlier row pointers
                   + nnz * (16 + 16)    # outlier columns and values
                   + 8 * q.state_dict()["format_info"].numel())
    assert q.nbytes * 8 == stored_bits
    assert q.avg_bits == pytest.approx(stored_bits / (n * k))
    assert 2.6 < q.avg_bits < 3.0


def test_outliers_are_restored_and_live_in_2bit_groups(device):
    w = llm_like_weight(64, 256)
    w[5, 17], w[40, 200], w[63, 0] = 3.0, -2.5, 4.0  # planted, 100x the typical magnitude
    w = w.to(device)
    q = memboost.quantize(w, ratio_4bit=0.1, outlier_fraction=0.01)
    w_hat = memboost.dequantize(q)
    for r, c in ((5, 17), (40, 200), (63, 0)):
        assert abs(float(w_hat[r, c] - w[r, c])) < 2e-3 * abs(float(w[r, c]))
    without = memboost.dequantize(memboost.quantize(w, ratio_4bit=0.1, outlier_fraction=0.0))
    assert rel_err(w_hat, w) < rel_err(without, w)
    # every outlier sits in a 2-bit group
    t = {k: v.cpu() for k, v in q.tensors.items()}
    four = reference.unpack_bitmask(t["mask"], 4)
    rows = torch.repeat_interleave(torch.arange(64), (t["outlier_rowptr"][1:] - t["outlier_rowptr"][:-1]).long())
    cols = t["outlier_cols"].long() & 0xFFFF
    assert not four[rows, cols // 64].any()


def test_outlier_budget_is_spent_in_2bit_groups(device):
    w = llm_like_weight(64, 256).to(device)
    q = memboost.quantize(w, ratio_4bit=0.5, outlier_fraction=0.02)  # 5 per row, 2 of 4 groups are 4-bit
    assert torch.equal(q.tensors["outlier_rowptr"].diff().cpu(), torch.full((64,), 5, dtype=torch.int32))


def test_calibration_steers_outliers_to_important_channels(device):
    w = llm_like_weight(64, 256)
    h = torch.ones(256)
    h[100:104] = 1e4  # four input channels carry most of the output
    q = memboost.quantize(w.to(device), ratio_4bit=0.0, outlier_fraction=0.02, calibration=h.to(device))
    cols = q.tensors["outlier_cols"].long().cpu() & 0xFFFF
    assert ((cols >= 100) & (cols < 104)).float().mean() > 0.7
    plain = memboost.quantize(w.to(device), ratio_4bit=0.0, outlier_fraction=0.02)
    plain_cols = plain.tensors["outlier_cols"].long().cpu() & 0xFFFF
    assert ((plain_cols >= 100) & (plain_cols < 104)).float().mean() < 0.2


def test_calibration_lowers_weighted_error(device):
    w = llm_like_weight(128, 512).to(device)
    h = torch.ones(512)
    h[:64] = 100.0  # the first 64 input channels matter most
    h = h.to(device)
    plain = memboost.dequantize(memboost.quantize(w, ratio_4bit=0.1))
    calib = memboost.dequantize(memboost.quantize(w, ratio_4bit=0.1, calibration=h))

    def weighted(w_hat):
        return float((((w_hat - w) ** 2) * h).sum())

    assert weighted(calib) < 0.8 * weighted(plain)


def test_state_dict_round_trips_exactly(device, tmp_path):
    q = _quantize(device, dtype=torch.bfloat16, ratio_4bit=0.2, outlier_fraction=0.01)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = memboost.QuantizedTensor.from_state_dict(torch.load(buf, weights_only=True))
    assert isinstance(q2, MixedQuantizedTensor) and q2.dtype == torch.bfloat16 and q2.shape == q.shape
    assert torch.equal(memboost.dequantize(q2), memboost.dequantize(q))
    assert q2.avg_bits == q.avg_bits

    from safetensors.torch import load_file, save_file
    path = os.path.join(tmp_path, "w.safetensors")
    save_file(q.state_dict(), path)
    q3 = memboost.QuantizedTensor.from_state_dict(load_file(path, device=device))
    assert torch.equal(memboost.dequantize(q3), memboost.dequantize(q))


def test_to_device_shape_dtype_repr(device):
    q = _quantize("cpu", dtype=torch.float16)
    moved = q.to(device)
    assert moved.device.type == device and moved.shape == (96, 512) and moved.dtype == torch.float16
    assert all(torch.equal(moved.tensors[k].cpu(), v) for k, v in q.tensors.items())
    # within an fp16 ulp: CUDA's exp2 and fused multiply-adds round differently from the CPU's
    torch.testing.assert_close(memboost.dequantize(moved).cpu(), memboost.dequantize(q), rtol=1e-3, atol=1e-6)
    text = repr(moved)
    assert "MixedQuantizedTensor" in text and "avg_bits=" in text and "(96, 512)" in text


def test_huge_rows_count_and_wide_rows(device):
    # Many rows (grid-size limits) and a long row, without [out, in]-sized masks.
    w = llm_like_weight(70000, 64, dtype=torch.float16).to(device)
    q = memboost.quantize(w, ratio_4bit=0.1)
    assert rel_err(memboost.dequantize(q), w) < 0.5  # 2-bit on heavy-tailed weights
    x = torch.randn(2, 64, dtype=torch.float16, device=device)
    assert rel_err(q.linear(x), x.float() @ memboost.dequantize(q).float().T) < 2e-3


@pytest.mark.slow
def test_embedding_sized_layer(device):
    w = (torch.randn(151936, 576) * 0.02).to(torch.float16).to(device)
    q = memboost.quantize(w, ratio_4bit=0.1)
    assert q.shape == (151936, 576)
    assert rel_err(memboost.dequantize(q), w) < 0.45
    x = torch.randn(1, 576, dtype=torch.float16, device=device)
    y = q.linear(x)
    assert y.shape == (1, 151936) and torch.isfinite(y).all()


def test_bad_input_is_named():
    w = torch.randn(32, 128)
    cases = [
        (lambda: memboost.quantize(torch.randn(4, 8, 16)), ValueError, "'w' must be a 2-D weight"),
        (lambda: memboost.quantize(torch.ones(32, 128, dtype=torch.int32)), TypeError, "'w' must be torch.float16"),
        (lambda: memboost.quantize(torch.empty(0, 128)), ValueError, "'w' is empty"),
        (lambda: memboost.quantize(w.clone().index_fill_(1, torch.tensor([3]), float("nan"))), ValueError, "NaN or Inf"),
        (lambda: memboost.quantize(w.clone().index_fill_(1, torch.tensor([3]), float("inf"))), ValueError, "NaN or Inf"),
        (lambda: memboost.quantize(w, ratio_4bit=1.5), ValueError, "'ratio_4bit' must be a number in \\[0, 1\\]"),
        (lambda: memboost.quantize(w, ratio_4bit=-0.1), ValueError, "'ratio_4bit'"),
        (lambda: memboost.quantize(w, group_size=48), ValueError, "'group_size' 48 does not divide in_features 128"),
        (lambda: memboost.quantize(w, group_size=40), ValueError, "multiple of 16"),
        (lambda: memboost.quantize(w, outlier_fraction=1.0), ValueError, "'outlier_fraction'"),
        (lambda: memboost.quantize(w, outlier_fraction=0.5), ValueError, r"'outlier_fraction' must be in \[0, 0.05\]"),
        (lambda: memboost.quantize(w, calibration=torch.ones(64)), ValueError, "'calibration' must be a tensor of shape"),
        (lambda: memboost.quantize(w, calibration=-torch.ones(128)), ValueError, "non-negative"),
        (lambda: memboost.quantize(w, exact_zero="yes"), TypeError, "'exact_zero' must be True, False or None"),
        (lambda: memboost.dequantize(w), TypeError, "'q' must be a QuantizedTensor"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg) as info:
            fn()
        assert isinstance(info.value, memboost.MemboostError)  # one family, a ValueError subclass


def test_corrupt_state_dict_is_named():
    q = memboost.quantize(torch.randn(32, 128), ratio_4bit=0.25, outlier_fraction=0.02)
    good = q.state_dict()
    from memboost.formats.tensor import encode_json, decode_json

    missing = {k: v for k, v in good.items() if k != "meta"}
    with pytest.raises(ValueError, match=r"missing \['meta'\]"):
        memboost.QuantizedTensor.from_state_dict(missing)
    with pytest.raises(ValueError, match="'format_info'"):
        memboost.QuantizedTensor.from_state_dict({k: v for k, v in good.items() if k != "format_info"})
    bad_shape = dict(good, plane2=good["plane2"][:, :4])
    with pytest.raises(ValueError, match="'plane2' must have shape"):
        memboost.QuantizedTensor.from_state_dict(bad_shape)
    bad_dtype = dict(good, meta=good["meta"].to(torch.int32))
    with pytest.raises(ValueError, match="'meta' must have dtype"):
        memboost.QuantizedTensor.from_state_dict(bad_dtype)
    info = decode_json(good["format_info"], "format_info")
    with pytest.raises(ValueError, match="version 99"):
        memboost.QuantizedTensor.from_state_dict(dict(good, format_info=encode_json(dict(info, version=99))))
    with pytest.raises(ValueError, match="unknown quantized format"):
        memboost.QuantizedTensor.from_state_dict(dict(good, format_info=encode_json(dict(info, format="zzz"))))
    with pytest.raises(ValueError, match="valid JSON"):
        memboost.QuantizedTensor.from_state_dict(dict(good, format_info=good["format_info"][:-3]))
    bad_ptr = dict(good, outlier_rowptr=good["outlier_rowptr"] + 1)
    with pytest.raises(ValueError, match="'outlier_rowptr' must rise"):
        memboost.QuantizedTensor.from_state_dict(bad_ptr)
    # contents the kernels index with: a column past the row, a mask that disagrees with 'lowbits'
    assert good["outlier_cols"].numel() > 0
    bad_cols = dict(good, outlier_cols=torch.full_like(good["outlier_cols"], 128))
    with pytest.raises(ValueError, match="'outlier_cols' must be column indices below in_features 128"):
        memboost.QuantizedTensor.from_state_dict(bad_cols)
    bad_mask = dict(good, mask=good["mask"] | 1 | 2)
    with pytest.raises(ValueError, match="'mask' must mark exactly n4=1"):
        memboost.QuantizedTensor.from_state_dict(bad_mask)
    # two outliers at one position (the CUDA dequantize would race on them)
    cols = good["outlier_cols"].clone()
    rowptr = good["outlier_rowptr"]
    row = int(torch.nonzero(rowptr[1:] - rowptr[:-1] >= 2)[0])
    cols[int(rowptr[row]) + 1] = cols[int(rowptr[row])]
    with pytest.raises(ValueError, match="'outlier_cols' repeats a column within a row"):
        memboost.QuantizedTensor.from_state_dict(dict(good, outlier_cols=cols))
    # errors name the layer when given one
    with pytest.raises(memboost.MemboostError, match=r"^model.layers.0.mlp: state_dict for format 'mixed' is missing"):
        memboost.QuantizedTensor.from_state_dict(missing, name="model.layers.0.mlp")


def test_corrupt_state_is_refused_on_every_device(device):
    # A checkpoint loaded straight onto the device is validated there too.
    q = memboost.quantize(torch.randn(32, 128), ratio_4bit=0.25, outlier_fraction=0.02)
    good = {k: v.to(device) for k, v in q.state_dict().items()}
    bad_cols = dict(good, outlier_cols=torch.full_like(good["outlier_cols"], 200))
    with pytest.raises(memboost.MemboostError, match="'outlier_cols' must be column indices below in_features 128"):
        memboost.QuantizedTensor.from_state_dict(bad_cols)
    with pytest.raises(memboost.MemboostError, match="'outlier_rowptr' must rise"):
        memboost.QuantizedTensor.from_state_dict(dict(good, outlier_rowptr=good["outlier_rowptr"] * 2))
    assert memboost.QuantizedTensor.from_state_dict(good).device.type == device


def test_native_ops_accept_one_dtype_set(device):
    # float64 is refused by the CPU and CUDA kernels and by the fake kernel alike
    # (q.linear computes a float64 input in float32: test_formats_compute_float64_in_float32).
    q = _quantize(device, shape=(16, 128), ratio_4bit=0.25)
    with pytest.raises(ValueError, match="'dtype' must be torch.float16, torch.bfloat16 or torch.float32, got torch.float64"):
        ops.mixed_dequantize(q.tensors, q.group_size, torch.float64)
    with pytest.raises(ValueError, match="'x' must be torch.float16"):
        ops.mixed_linear(torch.randn(2, 128, dtype=torch.float64, device=device), q.tensors, None, q.group_size, 0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in q.tensors.items()}
        with pytest.raises(ValueError, match="'dtype' must be float16, bfloat16 or float32"):
            ops.mixed_dequantize(fake, q.group_size, torch.float64)


def test_quantized_tensor_to_moves_devices_and_sets_only_the_output_dtype(device):
    q = _quantize("cpu", shape=(16, 128), ratio_4bit=0.25)
    half = q.to(device, torch.float16)
    assert half.device.type == device and half.dtype == torch.float16 and half.avg_bits == q.avg_bits
    for name in q.tensor_names:  # the packed tensors keep their dtypes
        assert half.tensors[name].dtype == q.tensors[name].dtype
    torch.testing.assert_close(half.dequantize().cpu(), q.dequantize().to(torch.float16))
    assert q.to(torch.bfloat16).dequantize().dtype == torch.bfloat16 and q.dtype == torch.float32
    with pytest.raises(TypeError, match="'dtype' must be torch.float16, torch.bfloat16 or torch.float32"):
        q.to(torch.int32)


def test_realised_ratio_is_warned_about_when_rows_are_short():
    with pytest.warns(UserWarning, match=r"ratio_4bit=0.25 becomes 1/2 = 0.500"):
        memboost.quantize(torch.randn(8, 128), ratio_4bit=0.25, group_size=64)


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_cpu_portable_path_matches_reference(monkeypatch, batch):
    # The AVX2 path runs by default on x86-64; the portable one serves other CPUs.
    q = _quantize("cpu", shape=(50, 256), ratio_4bit=0.3, outlier_fraction=0.01)
    x = torch.randn(batch, 256)
    want = reference.mixed_linear(x, *_parts(q), None, q.group_size)
    fast = q.linear(x)
    monkeypatch.setenv("MEMBOOST_CPU_ISA", "generic")
    portable = q.linear(x)
    assert rel_err(fast, want) < 1e-5 and rel_err(portable, want) < 1e-5


def test_quantize_in_worker_threads_equals_one_thread():
    # Chunks of rows are quantized by worker threads (memboost/_threads.py):
    # the result must not depend on the thread count.
    w = llm_like_weight(300, 256, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = memboost.quantize(w, ratio_4bit=0.25, outlier_fraction=0.01).state_dict()
        torch.set_num_threads(max(2, threads))
        many = memboost.quantize(w, ratio_4bit=0.25, outlier_fraction=0.01).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for key in one:
        assert torch.equal(one[key], many[key]), key


@pytest.mark.parametrize("ratio_4bit", [0.1, 1.0])
def test_planted_outliers_stay_outliers_and_spare_their_neighbours(device, ratio_4bit):
    # 50 values of 8.0 in a layer of weights around 0.02: each must come back
    # within fp16 rounding, as a 16-bit outlier, and the other weights of its
    # group must keep the error they have without it (not a 4-bit group spent
    # on one value, nor a row grid stretched by it).
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g) * 0.02
    idx = torch.randperm(w.numel(), generator=g)[:50]
    planted = w.clone()
    planted.view(-1)[idx] = 8.0
    rows, cols = idx // 1024, idx % 1024
    neighbours = torch.zeros(1024, 16, dtype=torch.bool)
    neighbours[rows, cols // 64] = True
    neighbours = neighbours.repeat_interleave(64, 1)
    neighbours.view(-1)[idx] = False

    def neighbour_error(weight):
        q = memboost.quantize(weight.to(device), ratio_4bit=ratio_4bit)
        back = q.dequantize().cpu()
        return back, float((back - weight)[neighbours].norm() / weight[neighbours].norm())

    back, err_planted = neighbour_error(planted)
    _, err_plain = neighbour_error(w)
    torch.testing.assert_close(back.view(-1)[idx], torch.full((50,), 8.0), rtol=2**-10, atol=0)
    assert err_planted < 1.1 * err_plain, (err_planted, err_plain)


def _spiky_activations(batch, k, seed=0):
    """Activations with a few channels 50x the rest, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 50.0
    return x


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("batch", [1, 3, 6])
# groups of 3, 4 and 32 words of 16 codes
@pytest.mark.parametrize("group_size", [48, 64, 512])
def test_exact_path_matches_its_reference_on_every_isa(monkeypatch, isa, batch, group_size):
    shape = (37, 1536)
    q = _quantize("cpu", shape=shape, ratio_4bit=0.5, outlier_fraction=0.01, group_size=group_size)
    x = _spiky_activations(batch, shape[1])
    bias = torch.randn(shape[0])
    monkeypatch.setenv("MEMBOOST_CPU_ISA", isa)
    y = q.linear(x, bias)
    want = reference.mixed_linear(x, *_parts(q), bias, group_size)
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("group_size", [64, 128])
# (37, 4352): a last tile of one row, and 68 or 34 groups per row, whose mask
# words (3 or 2 per row) the AVX2 tables read by gather or by permute;
# (13, 8320): 130 groups of 64, 5 mask words per row, which the AVX-512 tables
# gather (a tile's 20 words do not fit one register).
@pytest.mark.parametrize("shape", [(72, 512), (37, 4352), (13, 8320)])
def test_int8_path_matches_its_reference_on_every_isa(monkeypatch, isa, batch, group_size, shape):
    q = _quantize("cpu", shape=shape, ratio_4bit=0.3, outlier_fraction=0.01, group_size=group_size)
    x = _spiky_activations(batch, shape[1])
    bias = torch.randn(shape[0])
    monkeypatch.setenv("MEMBOOST_CPU_ISA", isa)
    y = q.linear(x, bias, act_bits=8)
    want = reference.mixed_linear(x, *_parts(q), bias, group_size, act_bits=8)
    assert rel_err(y, want) < 1e-5
    # the int8 activations cost a small, stated error against the exact product
    exact = q.linear(x, bias)
    assert 0 < rel_err(y, exact) < 1e-2


# The int8 path switches from the GEMV kernel to the packed-panel int8 GEMM at
# 12 activation rows (kInt8GemmMinRows in csrc/cpu/mixed.cpp; portable keeps the GEMV).
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("batch", [11, 12, 41])
@pytest.mark.parametrize("shape,group_size", [((37, 576), 64), ((72, 1152), 128), ((16, 128), 64)])
def test_int8_gemm_matches_its_reference_on_both_sides_of_the_switch(monkeypatch, isa, batch, shape, group_size):
    # rows not a multiple of the 16-row panel, 9 chunks of 64 (odd), groups of 128, outliers, spiky activations
    q = _quantize("cpu", shape=shape, ratio_4bit=0.3, outlier_fraction=0.01, group_size=group_size)
    assert q.num_outliers > 0
    x = _spiky_activations(batch, shape[1], seed=batch)
    bias = torch.randn(shape[0])
    monkeypatch.setenv("MEMBOOST_CPU_ISA", isa)
    y = q.linear(x, bias, act_bits=8)
    want = reference.mixed_linear(x, *_parts(q), bias, group_size, act_bits=8)
    assert rel_err(y, want) < 1e-5
    assert 0 < rel_err(y, q.linear(x, bias)) < 2e-2
    # each activation row gets the same result alone (GEMV) as in the batch (GEMM)
    torch.testing.assert_close(q.linear(x[-1:], bias, act_bits=8), y[-1:], rtol=1e-5, atol=1e-5)


def test_int8_path_falls_back_to_exact_where_it_does_not_apply():
    q = _quantize("cpu", shape=(40, 256), ratio_4bit=0.25, group_size=32)  # groups of 32: no int8 chunk
    x = torch.randn(2, 256)
    assert torch.equal(q.linear(x, act_bits=8), q.linear(x))
    q = _quantize("cpu", shape=(40, 256), ratio_4bit=0.25)
    x = torch.randn(40, 256)
    with pytest.raises(ValueError, match="'act_bits' must be 0 \\(exact float\\) or 8, got 4"):
        q.linear(x, act_bits=4)


def _correlated_inputs(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return lambda count, s: torch.randn(count, k, generator=torch.Generator().manual_seed(s)) @ mixing


@pytest.mark.parametrize("shrink", [0.0, 0.5])
@pytest.mark.parametrize("ratio_4bit", [0.0, 0.25])
def test_hessian_sweep_lowers_held_out_output_error(ratio_4bit, shrink):
    # GPTQ-style error compensation against independent rounding with the same
    # diagonal weighting, measured on held-out inputs of the same distribution.
    k = 256
    inputs = _correlated_inputs(4096, k, seed=0)
    x_calib, x_test = inputs(4096, 1), inputs(2048, 2)
    w = llm_like_weight(128, k, seed=3)
    hessian = x_calib.T @ x_calib / x_calib.shape[0]
    rounded = memboost.quantize(w, ratio_4bit=ratio_4bit, calibration=hessian.diagonal())
    swept = memboost.quantize(w, ratio_4bit=ratio_4bit, hessian=hessian, shrink=shrink)
    assert swept.avg_bits == rounded.avg_bits  # the same stored format and size
    err = {name: float((x_test @ (q.dequantize() - w).T).norm() / (x_test @ w.T).norm())
           for name, q in (("rounded", rounded), ("swept", swept))}
    # Shrinking gives up some of the fit to the calibration inputs' correlations (see the next test).
    assert err["swept"] < (0.92 if shrink == 0 else 1.0) * err["rounded"], err
    # a 2-D calibration is the Hessian
    assert torch.equal(memboost.quantize(w, ratio_4bit=ratio_4bit, calibration=hessian, shrink=shrink).dequantize(),
                       swept.dequantize())
    # shrinking is the sweep on (1 - shrink) H + shrink diag(H)
    shrunk = (1 - shrink) * hessian + shrink * torch.diag(hessian.diagonal())
    assert torch.equal(memboost.quantize(w, ratio_4bit=ratio_4bit, hessian=shrunk, shrink=0.0).dequantize(),
                       swept.dequantize())


def test_shrinking_the_hessian_holds_up_on_inputs_correlated_otherwise():
    """Calibration inputs whose cross-channel correlations differ from the
    test inputs' (the channel magnitudes, a few large ones included, are the
    same): the plain sweep fits correlations that are not there and does far
    worse than rounding; shrunk halfway it loses little, while keeping most
    of the sweep's gain on inputs like the calibration ones."""
    k = 256
    scale = torch.ones(k)
    scale[:8] = 8.0

    def inputs(mixing_seed, count, seed):
        mixing = torch.randn(k, k, generator=torch.Generator().manual_seed(mixing_seed)) / k**0.5 + torch.eye(k)
        return torch.randn(count, k, generator=torch.Generator().manual_seed(seed)) @ mixing * scale

    x_calib, x_same, x_other = inputs(0, 4096, 1), inputs(0, 2048, 2), inputs(5, 2048, 3)
    w = llm_like_weight(128, k, seed=3)
    hessian = x_calib.T @ x_calib / x_calib.shape[0]
    q = {"rounded": memboost.quantize(w, ratio_4bit=0.0, calibration=hessian.diagonal()),
         "plain": memboost.quantize(w, ratio_4bit=0.0, hessian=hessian, shrink=0.0),
         "shrunk": memboost.quantize(w, ratio_4bit=0.0, hessian=hessian, shrink=0.5)}
    same, other = ({name: float((x @ (t.dequantize() - w).T).norm() / (x @ w.T).norm()) for name, t in q.items()}
                   for x in (x_same, x_other))
    assert same["plain"] < same["shrunk"] < 0.9 * same["rounded"], same
    assert other["shrunk"] < 0.75 * other["plain"] and other["plain"] > 1.3 * other["rounded"], other


def test_hessian_bad_input_is_named():
    w = torch.randn(16, 64)
    with pytest.raises(memboost.MemboostError, match=r"'hessian' must be a tensor of shape \[in_features, in_features\]"):
        memboost.quantize(w, hessian=torch.eye(32))
    with pytest.raises(memboost.MemboostError, match="'hessian' contains NaN"):
        memboost.quantize(w, hessian=torch.full((64, 64), float("nan")))
    with pytest.raises(memboost.MemboostError, match="'damp' must be in"):
        memboost.quantize(w, hessian=torch.eye(64), damp=0)
    with pytest.raises(memboost.MemboostError, match="'shrink' must be in"):
        memboost.quantize(w, hessian=torch.eye(64), shrink=1.5)
    # an input that never fired (a zero row/column of H) leaves its column free
    h = torch.eye(64)
    h[5, 5] = 0
    assert torch.isfinite(memboost.quantize(w, hessian=h).dequantize()).all()
