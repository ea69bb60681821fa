"""memboost::low_rank_linear (a healed layer's corrector added to its op's
output): every kernel path against the reference, dtypes, opcheck, bad input."""

import pytest
import torch

from memboost import ops, reference

from conftest import rel_err


def _factors(n, k, rank, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, rank, generator=g) * 0.3).to(dtype)
    b = (torch.randn(k, rank, generator=g) * 0.3).to(dtype)
    return a.to(device), b.to(device)


# ranks around the kernel's vector width (8) and register chunk (64); batches
# through the GEMV (< 16 rows) and the GEMM
@pytest.mark.parametrize("factor_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rank", [1, 3, 8, 13, 64, 70])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_matches_reference_on_every_path(target, factor_dtype, rank, m):
    n, k = 75, 200
    a, b = _factors(n, k, rank, factor_dtype, seed=rank + m, device=target)
    x = torch.randn(m, k, device=target)
    base = torch.randn(m, n, device=target)
    got = ops.low_rank_linear(x, a, b, base)
    want = reference.low_rank_linear(x.cpu(), a.cpu(), b.cpu(), base.cpu())
    assert got.shape == (m, n)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got - base, want - base.cpu()) < 1e-5  # the low-rank part itself, not only base
    assert torch.equal(base, base.clone())  # functional: base untouched (checked by opcheck too)


def test_without_base_dtypes_and_batch_shapes(device):
    a, b = _factors(24, 130, 5, torch.float16, device=device)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 130, device=device).to(dtype)
        for base in (None, torch.randn(2, 3, 24, device=device).to(dtype)):
            got = ops.low_rank_linear(x, a, b, base)
            want = reference.low_rank_linear(x.cpu(), a.cpu(), b.cpu(), None if base is None else base.cpu())
            assert got.dtype == dtype and got.shape == (2, 3, 24)
            assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
            if base is not None:
                assert got.data_ptr() != base.data_ptr()


def test_opcheck(device):
    for dtype in (torch.float16, torch.float32):
        a, b = _factors(20, 300, 7, dtype, device=device)
        x = torch.randn(3, 300, device=device)
        torch.library.opcheck(torch.ops.memboost.low_rank_linear.default, (x, a, b, torch.randn(3, 20, device=device)))
        torch.library.opcheck(torch.ops.memboost.low_rank_linear.default, (x, a, b, None))


def test_bad_input_is_refused_by_name():
    a, b = _factors(20, 300, 7, torch.float16)
    x = torch.randn(1, 300)
    op = torch.ops.memboost.low_rank_linear
    with pytest.raises(ValueError, match="'A' must have dtype torch.float16 or torch.float32"):
        op(x, a.to(torch.bfloat16), b, None)
    with pytest.raises(ValueError, match="'B' must have A's dtype"):
        op(x, a, b.float(), None)
    with pytest.raises(ValueError, match="'B' must have shape"):
        op(x, a, b[:, :6].contiguous(), None)
    with pytest.raises(ValueError, match="'x' must have last dimension in_features=300"):
        op(torch.randn(1, 299), a, b, None)
    with pytest.raises(ValueError, match="'base' must have shape"):
        op(x, a, b, torch.randn(1, 21))
    with pytest.raises(ValueError, match="'base' dtype"):
        op(x, a, b, torch.randn(1, 20).half())
    with pytest.raises(ValueError, match="contiguous"):
        op(x, a, b.T.contiguous().T, None)
