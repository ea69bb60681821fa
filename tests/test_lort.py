"""LoRT: the solver (exact steps, error never rising), the stored tensor, LoRTLinear."""

import itertools

import pytest
import torch
from torch import nn

import lort
import memboost
from memboost import reference
from memboost.formats.lort import LoRTQuantizedTensor, best_ternary_fit, resolve_rank, stored_bits
from memboost.nn import LoRTLinear, QuantizedLinear

from conftest import llm_like_weight, rel_err


def _ternary_plus_low_rank(n, k, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=g).float()
    a = torch.randn(n, r, generator=g) * 0.1
    b = torch.randn(k, r, generator=g) * 0.1
    return 0.05 * t + a @ b.T + 0.001 * torch.randn(n, k, generator=g)


def test_best_ternary_fit_is_the_exhaustive_optimum():
    # every ternary vector of length 6 with its best alpha = <r, t> / <t, t> (>= 0)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(20, 6, generator=g)
    rows[3] = 0  # an all-zero row gives alpha 0
    cands = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=6)))
    nz = cands.abs().sum(1).clamp_min(1)
    t, alpha = best_ternary_fit(rows, per_row=True)
    for i, r in enumerate(rows):
        a = ((cands @ r) / nz).clamp_min(0)
        best = ((r - a[:, None] * cands) ** 2).sum(1).min()
        ours = ((r - alpha[i] * t[i].float()) ** 2).sum()
        assert float(ours) <= float(best) + 1e-6
    assert float(alpha[3]) == 0.0 and bool((t[3] == 0).all())
    # one alpha for the matrix: no worse than every per-tensor threshold
    t1, a1 = best_ternary_fit(rows, per_row=False)
    assert a1.shape == (1, 1)
    err = ((rows - a1 * t1.float()) ** 2).sum()
    for thr in torch.linspace(0, 3, 61):
        tt = torch.sign(rows) * (rows.abs() > thr)
        aa = (rows * tt).sum() / tt.abs().sum().clamp_min(1)
        assert float(err) <= float(((rows - aa * tt) ** 2).sum()) + 1e-5


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed", "integers", "sparse", "all-zero"])
def test_binned_fit_is_the_sorted_fit(monkeypatch, kind):
    """One alpha over a large matrix is found from value bins, sorting only the bins that can hold the optimum
    (an 8B model's MLP matrix took 15 s per sort): the same support and alpha as sorting every value, with
    ties (integer values), many zeros and slices of a few rows."""
    from memboost import _slices
    from memboost.formats import lort as lort_format

    g = torch.Generator().manual_seed(7)
    r = torch.randn(300, 200, generator=g)
    if kind == "heavy-tailed":
        r = r ** 3
    elif kind == "integers":
        r = torch.randint(-3, 4, r.shape, generator=g).float()
    elif kind == "sparse":
        r = r * (torch.rand(r.shape, generator=g) < 0.05)
    elif kind == "all-zero":
        r = torch.zeros_like(r)
    monkeypatch.setattr(lort_format, "_SORTED_FIT_MAX", 1000)
    monkeypatch.setattr(lort_format, "_FIT_BINS", 64)   # a few hundred values per bin
    monkeypatch.setattr(_slices, "SLICE_ELEMENTS", 7 * 200)
    t, alpha = best_ternary_fit(r, per_row=False)
    want_t, want_alpha = lort_format._sorted_ternary_fit(r, per_row=False)
    assert int(t.abs().sum()) == int(want_t.abs().sum())
    assert float(alpha) == pytest.approx(float(want_alpha), rel=1e-6, abs=0)
    if kind != "integers":   # with ties, which of the equal values join the support may differ
        assert torch.equal(t, want_t)
    err, want_err = ((r - alpha * t.float()) ** 2).sum(), ((r - want_alpha * want_t.float()) ** 2).sum()
    assert float(err) == pytest.approx(float(want_err), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("per_row_alpha", [False, True])
def test_error_never_rises_and_is_the_stored_error(device, per_row_alpha):
    w = llm_like_weight(96, 160, seed=2).to(device)
    q, errors = lort.decompose(w, rank=8, iters=6, per_row_alpha=per_row_alpha)
    assert len(errors) == 6
    assert all(b <= a + 1e-7 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]  # the alternation does improve on the first fit
    assert abs(rel_err(q.dequantize(), w) - errors[-1]) < 1e-5
    assert q.device.type == torch.device(device).type and q.rank == 8
    assert q.tensors["alpha"].shape == ((96, 1) if per_row_alpha else (1, 1))


def test_recovers_a_ternary_plus_low_rank_matrix():
    w = _ternary_plus_low_rank(128, 192, 4)
    q, errors = lort.decompose(w, rank=4, iters=10)
    ternary_only, _ = lort.decompose(w, rank=0, iters=1)
    assert errors[-1] < 0.05, errors  # the noise alone is ~0.022 of ||W||
    assert errors[-1] < 0.3 * rel_err(ternary_only.dequantize(), w)


def test_low_rank_step_is_the_truncated_svd():
    """The low-rank step's factors: the truncated SVD (exact below 1024 rows or
    columns, randomized above), sqrt of the singular values in each fp16 factor."""
    for shape, rank in (((64, 80), 3), ((1100, 1040), 8)):
        g = torch.Generator().manual_seed(4)
        m = torch.randn(shape[0], 12, generator=g) @ torch.randn(12, shape[1], generator=g)
        m = m + 0.01 * torch.randn(*shape, generator=g)
        a, b = memboost.lort._low_rank_factors(m, rank, seed=0)
        assert a.dtype == b.dtype == torch.float16 and a.shape == (shape[0], rank) and b.shape == (shape[1], rank)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        ours = a.float() @ b.float().T
        assert rel_err(m - ours, m) < rel_err(m - best, m) * 1.01 + 1e-3
        assert torch.allclose(a.float().norm(dim=0), b.float().norm(dim=0), rtol=1e-2)  # balanced
        # stored as they will be loaded: a reloaded weight multiplies bit for bit the same
        assert a.is_contiguous() and b.is_contiguous()


def test_large_matrices_use_the_randomized_svd_and_still_never_rise():
    w = llm_like_weight(1100, 1040, seed=5)
    q, errors = lort.decompose(w, rank=16, iters=3, per_row_alpha=True)
    assert all(b <= a for a, b in zip(errors, errors[1:]))
    assert abs(rel_err(q.dequantize(), w) - errors[-1]) < 1e-5


def test_rank_fraction_and_bits_budget():
    assert resolve_rank((576, 1536), 0.25) == 144
    assert resolve_rank((576, 1536), 1.0) == 576
    assert resolve_rank((576, 576), 64) == 64
    for budget in (2.3, 3.0, 4.5):
        r = resolve_rank((576, 576), 576, max_bits=budget)
        assert stored_bits((576, 576), r, False) <= budget < stored_bits((576, 576), r + 1, False)
    # stored_bits is what avg_bits reports for a real tensor
    q, _ = lort.decompose(llm_like_weight(64, 200), max_bits=3.0, iters=1)
    assert q.avg_bits <= 3.0 and abs(q.avg_bits - stored_bits((64, 200), q.rank, False)) < 0.01
    # rank 64 on 576x576 in fp16 costs ~3.6 bits on top of T: the seed's figure, honestly counted
    assert 5.5 < stored_bits((576, 576), 64, False) < 5.8


def test_bad_arguments_are_named():
    w = torch.randn(32, 48)
    with pytest.raises(memboost.MemboostError, match="'rank' 33 is larger than a \\[32, 48\\] matrix allows"):
        lort.decompose(w, rank=33)
    with pytest.raises(memboost.MemboostError, match="'rank' as a fraction"):
        lort.decompose(w, rank=1.5)
    with pytest.raises(memboost.MemboostError, match="'max_bits' 1.0 is below"):
        lort.decompose(w, max_bits=1.0)
    with pytest.raises(memboost.MemboostError, match="'iters'"):
        lort.decompose(w, iters=0)
    with pytest.raises(memboost.MemboostTypeError, match="'per_row_alpha'"):
        lort.decompose(w, per_row_alpha=1)
    with pytest.raises(memboost.MemboostError, match="NaN or Inf"):
        lort.decompose(torch.full((4, 4), float("nan")), rank=1)
    with pytest.raises(memboost.MemboostError, match="2-D"):
        lort.decompose(torch.randn(4), rank=1)
    with pytest.raises(TypeError, match="'W' must be torch.float16"):
        lort.decompose(torch.ones(4, 4, dtype=torch.int32), rank=1)


def _anisotropic_hessian(k, seed=0, rows=4 * 160):
    """X^T X / rows of correlated inputs whose channels span two decades in scale (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.2 * torch.randn(k, k, generator=g)
    x = torch.randn(rows, k, generator=g) @ mix * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return x.T @ x / rows


def _output_error(w, q, h):
    e = w - q.dequantize().float()
    return float(torch.trace(e @ h @ e.T).sqrt() / torch.trace(w @ h @ w.T).sqrt())


@pytest.mark.parametrize("per_row_alpha", [False, True])
@pytest.mark.parametrize("rank", [0, 8])
def test_with_h_the_output_error_is_lower_and_never_rises(per_row_alpha, rank):
    w = llm_like_weight(96, 160, seed=2)
    h = _anisotropic_hessian(160)
    plain, _ = lort.decompose(w, rank=rank, iters=4, per_row_alpha=per_row_alpha)
    q, errors = lort.decompose(w, rank=rank, iters=4, per_row_alpha=per_row_alpha, H=h)
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert _output_error(w, q, h) < 0.95 * _output_error(w, plain, h)
    # errors are the output error of the stored weight in H as conditioned (damped by 1% of its mean diagonal)
    hd = h + 0.01 * float(h.diagonal().mean()) * torch.eye(160)
    assert abs(_output_error(w, q, hd) - errors[-1]) < 1e-4
    assert q.tensors["alpha"].shape == ((96, 1) if per_row_alpha else (1, 1)) and q.rank == rank


def test_with_h_each_step_is_the_weighted_optimum():
    """The low-rank step is the best rank-r fit in the H norm (the whitened SVD), better than the plain
    SVD there; alpha is the weighted least-squares fit for its T; the swept T beats plain rounding."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(48, 6, generator=g) @ torch.randn(6, 64, generator=g) + 0.3 * torch.randn(48, 64, generator=g)
    h = _anisotropic_hessian(64, seed=1).double()
    chol = torch.linalg.cholesky(h)

    def h_err(e):
        return float(torch.trace(e.double() @ h @ e.double().T))

    a, b = memboost.lort._whitened_factors(m, 4, 0, chol)
    pa, pb = memboost.lort._low_rank_factors(m, 4, 0)
    whitened = h_err(m - a.float() @ b.float().T)
    assert whitened < 0.9 * h_err(m - pa.float() @ pb.float().T)
    # the exact optimum of ||(M - X) L|| over rank-4 X, from the full SVD of M L
    u, s, vh = torch.linalg.svd(m.double() @ chol)
    best = (u[:, :4] * s[:4]) @ vh[:4] @ torch.linalg.inv(chol)
    assert whitened <= h_err(m - best) * 1.01 + 1e-6
    # alpha: the weighted least-squares optimum for its T (per row)
    t, _ = best_ternary_fit(m, per_row=True)
    alpha = memboost.lort.weighted_alpha(m, t, h, per_row=True)
    for scale in (0.9, 1.1):
        assert h_err(m - alpha * t.float()) < h_err(m - scale * alpha * t.float())
    # the swept T at these levels beats rounding each entry to the nearest level
    u_factor = memboost.formats.gptq.hessian_factor(h, 0.01)
    swept = memboost.lort.compensated_ternary(m, alpha, u_factor)
    assert set(swept.unique().tolist()) <= {-1, 0, 1}
    nearest = (torch.sign(m) * (m.abs() > alpha / 2)).to(torch.int8)
    assert h_err(m - alpha * swept.float()) < h_err(m - alpha * nearest.float())


def test_h_diagonal_and_quantize_model_calibration():
    """LoRTLinear takes memboost.calibrate's statistics: a full H or per-channel E[x^2] (a diagonal H)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    batches = [torch.randn(8, 64) * torch.logspace(-1, 1, 64) for _ in range(4)]
    for hessian in (True, False):
        stats = memboost.calibrate(model, batches, hessian=hessian, progress=False)
        m = nn.Sequential(*[type(l)(*(() if isinstance(l, nn.ReLU) else (l.in_features, l.out_features)))
                            for l in model])
        m.load_state_dict(model.state_dict())
        memboost.quantize_model(m, "lort", calibration=stats, rank=4, iters=2, progress=False)
        assert isinstance(m[0], LoRTLinear)
        h = stats["0"] if hessian else torch.diag(stats["0"])
        plain, _ = lort.decompose(model[0].weight.detach(), rank=4, iters=2)
        assert _output_error(model[0].weight.detach(), m[0].weight.tensor(), h) < \
            _output_error(model[0].weight.detach(), plain, h)


def test_bad_h_is_named():
    w = torch.randn(32, 48)
    with pytest.raises(memboost.MemboostError, match="'H' must have shape \\[in_features, in_features\\] = "
                                                      "\\(48, 48\\).*got \\(32, 32\\)"):
        lort.decompose(w, rank=2, H=torch.eye(32))
    with pytest.raises(memboost.MemboostError, match="'H' must have shape"):
        lort.decompose(w, rank=2, H=torch.ones(48))
    with pytest.raises(memboost.MemboostTypeError, match="'H' must be a tensor"):
        lort.decompose(w, rank=2, H=[[1.0]])
    with pytest.raises(memboost.MemboostError, match="'H' contains NaN or Inf"):
        lort.decompose(w, rank=2, H=torch.full((48, 48), float("inf")))
    with pytest.raises(memboost.MemboostError, match="'damp'"):
        lort.decompose(w, rank=2, H=torch.eye(48), damp=0)
    with pytest.raises(memboost.MemboostError, match="'shrink'"):
        lort.decompose(w, rank=2, H=torch.eye(48), shrink=2)


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("shape", [(1, 200), (3, 7, 200)])
def test_linear_is_ternary_kernel_plus_low_rank(device, act_bits, shape):
    w = llm_like_weight(72, 200, seed=6).to(device)
    q, _ = lort.decompose(w, rank=6, iters=2, per_row_alpha=True)
    x = torch.randn(*shape, device=device)
    bias = torch.randn(72, device=device)
    t = q.tensors
    want = reference.ternary_linear(x.cpu(), t["packed"].cpu(), t["alpha"].cpu(), bias.cpu(), 200, 0, act_bits or 0)
    want = want + x.cpu() @ t["B"].float().cpu() @ t["A"].float().cpu().T
    got = q.linear(x, bias, act_bits=act_bits)
    assert got.shape == (*shape[:-1], 72)
    assert rel_err(got, want) < 1e-5
    if act_bits is None:
        assert rel_err(got, torch.nn.functional.linear(x, q.dequantize(), bias)) < 1e-5


def _lort_op_args(n, k, rank, seed=0, per_row_alpha=True, device="cpu"):
    """(packed, alpha, A, B) of a LoRT weight with the given rank (any rank, not only what decompose picks)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    alpha = torch.rand(n if per_row_alpha else 1, 1, generator=g) + 0.5
    a = (torch.randn(n, rank, generator=g) * 0.3).half()
    b = (torch.randn(k, rank, generator=g) * 0.3).half()
    return [v.to(device) for v in (memboost.ops.ternary_pack(t), alpha, a, b)]


# ranks around the kernel's vector width (8) and register chunk (64); batches
# through the float16 GEMV (< 16 rows) and the converted-factor GEMM
@pytest.mark.parametrize("rank", [0, 1, 3, 8, 13, 64, 70])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_lort_linear_op_matches_reference_on_every_path(target, rank, m, act_bits):
    n, k = 37, 200
    packed, alpha, a, b = _lort_op_args(n, k, min(rank, n), seed=rank + m, device=target)
    x = torch.randn(m, k, device=target)
    bias = torch.randn(n, device=target)
    got = torch.ops.memboost.lort_linear(x, packed, alpha, a, b, bias, k, act_bits)
    want = reference.lort_linear(x.cpu(), packed.cpu(), alpha.cpu(), a.cpu(), b.cpu(), bias.cpu(), k, act_bits)
    assert got.shape == (m, n)
    assert rel_err(got, want) < 1e-5


def test_lort_linear_op_dtypes_batch_shapes_and_autograd(device):
    packed, alpha, a, b = _lort_op_args(24, 130, 5, device=device)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, 130, device=device).to(dtype)
        got = torch.ops.memboost.lort_linear(x, packed, alpha, a, b, None, 130, 0)
        want = reference.lort_linear(x.cpu(), packed.cpu(), alpha.cpu(), a.cpu(), b.cpu(), None, 130, 0)
        assert got.dtype == dtype and got.shape == (2, 3, 24)
        assert rel_err(got, want) < 1e-2
    x = torch.randn(4, 130, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    memboost.ops.lort_linear(x, packed, alpha, a, b, bias, 130, 0).square().sum().backward()
    w = (memboost.ops.ternary_dequantize(packed, alpha, 130, 0, torch.float32) + a.float() @ b.float().T)
    x2, bias2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, bias2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5 and rel_err(bias.grad, bias2.grad) < 1e-5


def test_lort_linear_opcheck(device):
    packed, alpha, a, b = _lort_op_args(20, 300, 7, device=device)
    x = torch.randn(3, 300, device=device)
    bias = torch.randn(20, device=device)
    for act_bits in (0, 8):
        torch.library.opcheck(torch.ops.memboost.lort_linear.default, (x, packed, alpha, a, b, bias, 300, act_bits))
        torch.library.opcheck(torch.ops.memboost.lort_linear.default,
                              (x.clone().requires_grad_(), packed, alpha, a, b, None, 300, act_bits))


def test_lort_linear_op_refuses_bad_factors_by_name():
    packed, alpha, a, b = _lort_op_args(20, 300, 7)
    x = torch.randn(1, 300)
    op = torch.ops.memboost.lort_linear
    with pytest.raises(ValueError, match="'A' must have dtype torch.float16"):
        op(x, packed, alpha, a.float(), b, None, 300, 0)
    with pytest.raises(ValueError, match="'B' must have shape"):
        op(x, packed, alpha, a, b[:, :6].contiguous(), None, 300, 0)
    with pytest.raises(ValueError, match="'A' must have shape"):
        op(x, packed, alpha, a[:19], b, None, 300, 0)
    with pytest.raises(ValueError, match="contiguous"):
        op(x, packed, alpha, a, b.T.contiguous().T, None, 300, 0)
    with pytest.raises(ValueError, match="'act_bits'"):
        op(x, packed, alpha, a, b, None, 300, 4)


def test_state_dict_round_trip_safetensors_and_weights_only(tmp_path):
    q, _ = lort.decompose(llm_like_weight(40, 130, seed=7, dtype=torch.float16), rank=5, iters=2)
    memboost.save_safetensors(q.state_dict(), str(tmp_path / "q.safetensors"))
    back = memboost.QuantizedTensor.from_state_dict(memboost.load_safetensors(str(tmp_path / "q.safetensors")))
    assert isinstance(back, LoRTQuantizedTensor) and back.dtype == torch.float16
    assert torch.equal(back.dequantize(), q.dequantize())
    torch.save(q.state_dict(), tmp_path / "q.pt")
    again = memboost.QuantizedTensor.from_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert torch.equal(again.dequantize(), q.dequantize())
    assert "rank=5" in repr(q) and "alpha=tensor" in repr(q)
    assert q.to(torch.float32).dequantize().dtype == torch.float32


def test_corrupt_state_is_refused():
    q, _ = lort.decompose(llm_like_weight(40, 130, seed=8), rank=5, iters=1)
    good = q.state_dict()

    def broken(**changes):
        return {**good, **changes}

    cases = [
        (broken(A=torch.zeros(40, 5)), "'A' must have dtype torch.float16"),
        (broken(A=torch.zeros(39, 5, dtype=torch.float16)), "'A' must have shape"),
        (broken(B=torch.zeros(130, 4, dtype=torch.float16)), "'B' must have shape"),
        (broken(alpha=torch.zeros(3, 1)), "'alpha' must have shape"),
        (broken(alpha=torch.tensor([[float("inf")]])), "'alpha' contains NaN or Inf"),
        (broken(packed=torch.full_like(good["packed"], 0xFF)), "invalid 2-bit code 3"),
        (broken(packed=good["packed"][:, :-32]), "'packed' must have shape"),
    ]
    for state, message in cases:
        with pytest.raises(memboost.MemboostError, match=message):
            memboost.QuantizedTensor.from_state_dict(state, name="layer")
    big = LoRTQuantizedTensor.zeros((4, 4), rank=4).state_dict()
    big["A"] = torch.zeros(4, 5, dtype=torch.float16)
    big["B"] = torch.zeros(4, 5, dtype=torch.float16)
    with pytest.raises(memboost.MemboostError, match="rank 5 .* exceeds min"):
        memboost.QuantizedTensor.from_state_dict(big)


def test_lort_linear_drop_in_casts_and_state_dict(device, tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(160, 48).to(device)
    layer = LoRTLinear.from_linear(linear, rank=8, iters=3, per_row_alpha=True)
    assert QuantizedLinear.for_format("lort") is LoRTLinear
    x = torch.randn(2, 5, 160, device=device)
    q = layer.weight.tensor()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, q.dequantize(), linear.bias),
                               rtol=1e-5, atol=1e-5)
    assert "rank=8" in repr(layer) and "avg_bits=" in repr(layer)
    fresh = LoRTLinear(160, 48, rank=8, per_row_alpha=True, dtype=torch.float32, device=device)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    half = layer.half()  # packed buffers, alpha and the fp16 factors are never cast
    assert half.weight.tensor().tensors["alpha"].dtype == torch.float32
    assert rel_err(half(x.half()), layer.float()(x)) < 2e-3
    layer8 = LoRTLinear.from_linear(linear, rank=8, iters=1, act_bits=8)
    assert rel_err(layer8(x), torch.nn.functional.linear(x, layer8.weight.dequantize(), linear.bias)) < 0.02


def test_quantize_model_lort_save_and_reload(device, tmp_path):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)

    model = build()
    x = torch.randn(4, 64, device=device)
    y = model(x)
    report = memboost.quantize_model(model, "lort", skip=(), rank=0.25, iters=3, per_row_alpha=True)
    assert len(report.replaced) == 3 and all(isinstance(m, LoRTLinear) for m in (model[0], model[2], model[4]))
    assert rel_err(model(x), y) < 0.6
    fresh = build()
    memboost.load_quantized_(fresh, model.state_dict())
    assert torch.equal(fresh(x), model(x))
    # a budget a layer cannot meet (64 inputs pad to 128 trits: 4 bits for T alone) is
    # skipped with the reason, not an error
    model2 = build()
    report2 = memboost.quantize_model(model2, "lort", skip=(), max_bits=3.0, iters=1)
    assert [name for name, _ in report2.skipped] == ["0", "4"] and [r.name for r in report2.replaced] == ["2"]
    assert "'max_bits' 3.0 is below what the ternary part alone costs" in report2.skipped[0][1]


def test_lort_beats_ternary_only_of_the_same_stored_size_on_smollm2():
    """Real SmolLM2 weights: the bits A and B cost, spent instead on a finer
    ternary scale grid (one fp16 scale per group of g weights, each group's
    best ternary fit), lose to LoRT."""
    model, _ = memboost.testbed.load_smollm2()
    for name in ("model.layers.5.mlp.down_proj", "model.layers.20.self_attn.q_proj"):
        w = model.get_submodule(name).weight.detach().float()
        n, k = w.shape
        q, errors = lort.decompose(w, rank=32, iters=10, per_row_alpha=True)
        g = next(g for g in range(1, k + 1) if k % g == 0 and 2 + 16 / g <= q.avg_bits)
        t, alpha = best_ternary_fit(w.reshape(-1, g), per_row=True)
        grid = rel_err((alpha * t.float()).reshape(n, k), w)
        assert errors[-1] < 0.97 * grid, (name, q.avg_bits, g, errors[-1], grid)
