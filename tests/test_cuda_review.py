"""The CUDA defects found by reading csrc/cuda/ (issue 22), one test each.
Each would fail on the code before its fix; the CUDA ones skip where no GPU
exists (no GPU has run them yet). Where a defect's rule also holds on the
CPU, the same test checks the CPU too."""

import pytest
import torch

import memboost
import memboost.formats.nf4 as nf4
from memboost import reference

from conftest import CUDA_SKIP_REASON, llm_like_weight, rel_err

cuda = pytest.mark.skipif(bool(CUDA_SKIP_REASON), reason=CUDA_SKIP_REASON)


def _nf4_state(q):
    return [q.tensors[k] for k in nf4.NF4QuantizedTensor.tensor_names]


@cuda
@pytest.mark.cuda
def test_nf4_linear_misaligned_float32_input():
    # (1) a float32 view at a 4-byte offset was read with float4 loads: a
    # misaligned-address error, sticky for the rest of the process
    q = nf4.quantize(llm_like_weight(256, 4096).cuda(), 64)
    x = torch.randn(4097, device="cuda")[1:].view(1, 4096)
    assert x.data_ptr() % 16 != 0
    y = q.linear(x)
    torch.cuda.synchronize()
    want = reference.nf4_linear(x.cpu(), *[t.cpu() for t in _nf4_state(q)], 256, 64, 256, None, 0)
    assert rel_err(y, want) < 2e-6
    assert float(torch.ones(1, device="cuda").sum()) == 1.0  # the context still works


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_quantize_on_gpu_is_ieee(double_quant):
    # (2) --use_fast_math flushed the 1e-38 floor to 0: an all-zero block got
    # inverse +inf, NaN codes, and weights of -0.018 after double quantization;
    # rcp.approx could also move a value on a midpoint to the other code.
    w = llm_like_weight(128, 256)
    w[0, :64] = 0
    w[5, :] = w[5, :].sign() * 1e-39  # denormal weights: a block of them has a denormal absmax
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cpu = nf4.quantize(w.to(dtype), 64, double_quant)
        gpu = nf4.quantize(w.to(dtype).cuda(), 64, double_quant)
        for k in nf4.NF4QuantizedTensor.tensor_names:
            assert torch.equal(gpu.tensors[k].cpu(), cpu.tensors[k]), (dtype, k)
        assert torch.equal(gpu.dequantize()[0, :64].cpu(), torch.zeros(64, dtype=dtype))
    # many random weights: every code equal to the CPU's (a midpoint decided by one ulp included)
    for seed in range(4):
        w = llm_like_weight(512, 1024, seed=seed)
        assert torch.equal(memboost.ops.nf4_quantize(w.cuda(), 64)[0].cpu(), memboost.ops.nf4_quantize(w, 64)[0])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(16, 256), (3, 80)])  # batch > 8; K % 32 != 0
def test_nf4_linear_outside_gemv_rounds_once(dtype, m, k):
    # (3) the GEMM path dequantized to the input's 16-bit dtype and multiplied
    # there; CPU, reference, mixed and ternary compute in float32 and round once
    q = nf4.quantize(llm_like_weight(192, k).cuda(), 32)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(192, device="cuda").to(dtype)
    y = q.linear(x, bias)
    want32 = reference.nf4_linear(x.float(), *_nf4_state(q), 192, 32, 256, bias.float(), 0)
    # one rounding of a float32 result: within one unit in the last place
    # everywhere, and equal to the rounded float32 result almost everywhere
    ulp = torch.finfo(dtype).eps * want32.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((y.float() - want32).abs() <= ulp).all())
    assert float((y != want32.to(dtype)).float().mean()) < 0.01


@cuda
@pytest.mark.cuda
def test_ternary_int8_gemv_signed_dot():
    # (4) unsigned codes times int8, minus s * sum(q) in float after the
    # reduction: with non-negative activations two large sums cancelled
    # (about 1e-5 mean relative error, 1e-3 near zero outputs)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 8192, generator=g) * 0.02
    q = memboost.ternary.quantize(w, group_size=256)
    x = torch.rand(4, 8192, generator=g)  # all >= 0
    qc = q.to("cuda")
    y = qc.linear(x.cuda(), act_bits=8)
    want = reference.ternary_linear(x, q.tensors["packed"], q.tensors["scales"], None, 8192, 256, 8)
    scale = want.square().mean().sqrt()
    # (emulated in float32: the old formula is off by about 3e-5 here, the signed dot by 4e-7)
    assert float((y.cpu() - want).abs().max() / scale) < 3e-6
    # and the CPU kernel meets the same bound
    assert float((q.linear(x, act_bits=8) - want).abs().max() / scale) < 3e-6


def _mixed_with_duplicate_outliers(device):
    q = memboost.quantize(llm_like_weight(16, 256), ratio_4bit=0.25, outlier_fraction=0.05)
    t = {k: v.clone() for k, v in q.tensors.items()}
    rowptr, cols = t["outlier_rowptr"], t["outlier_cols"]
    rows = [r for r in range(16) if rowptr[r + 1] - rowptr[r] >= 3]
    assert len(rows) >= 2
    for r in rows:  # the row's last two entries repeat its first column
        b, e = int(rowptr[r]), int(rowptr[r + 1])
        cols[e - 1] = cols[b]
        cols[e - 2] = cols[b]
    return [t[k].to(device) for k in q.tensor_names], q.group_size


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
def test_mixed_dequantize_adds_duplicate_outlier_columns(device):
    # (5) duplicate columns in one row: CPU, reference and the CUDA GEMV add
    # them; the CUDA dequantize kernel let the last write win (a race)
    parts, group_size = _mixed_with_duplicate_outliers(device)
    want = reference.mixed_dequantize(*[p.cpu() for p in parts], group_size, torch.float32)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)):
        got = torch.ops.memboost.mixed_dequantize(*parts, group_size, dtype)
        # (a lost duplicate is off by a whole outlier, far beyond these bounds)
        torch.testing.assert_close(got.cpu(), want.to(dtype), rtol=rtol, atol=1e-6)
    x = torch.randn(40, 256, device=device)  # the GEMM path dequantizes too
    y = torch.ops.memboost.mixed_linear(x, *parts, None, group_size, 0)
    assert rel_err(y, x.cpu() @ want.T) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
def test_reference_nf4_linear_takes_int8_only_where_the_kernel_does(device):
    # (6) the reference applied int8 activations on any device and shape; the
    # CUDA kernel (and the CPU off its integer shapes) computes act_bits 8 exactly
    for k, block_size in ((256, 64), (200, 64), (96, 32)):
        q = nf4.quantize(llm_like_weight(48, k).to(device), block_size)
        x = torch.randn(3, k, device=device)
        y8 = q.linear(x, act_bits=8)
        ref8 = reference.nf4_linear(x, *_nf4_state(q), 48, block_size, 256, None, 8)
        exact = reference.nf4_linear(x, *_nf4_state(q), 48, block_size, 256, None, 0)
        assert rel_err(y8, ref8) < 1e-5
        if device == "cuda" or k % 64 or block_size % 64:
            assert rel_err(y8, exact) < 2e-6
        else:
            assert rel_err(y8, exact) > 1e-4  # the CPU's integer path really rounds
