import pytest
import torch

import memboost

if not torch.cuda.is_available():
    CUDA_SKIP_REASON = "no CUDA device on this machine"
elif not memboost.build_info()["cuda_kernels"]:
    CUDA_SKIP_REASON = "memboost was built without CUDA kernels (MEMBOOST_CUDA=OFF or no nvcc)"
else:
    CUDA_SKIP_REASON = ""

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(bool(CUDA_SKIP_REASON), reason=CUDA_SKIP_REASON)]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def llm_like_weight(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Heavy-tailed weights with per-row scale spread and rare large values, like LLM layers."""
    g = torch.Generator().manual_seed(seed)
    # Student's t with 5 degrees of freedom, z / sqrt(chi2_5 / 5), drawn from g so
    # that every test sees the same weights whatever ran before it.
    z = torch.randn(out_features, in_features, generator=g)
    chi2 = torch.randn(5, out_features, in_features, generator=g).square().sum(0)
    w = z / (chi2 / 5).sqrt() * 0.02
    w *= torch.exp(0.3 * torch.randn(out_features, 1, generator=g))
    w *= torch.exp(0.3 * torch.randn(1, in_features, generator=g))
    return w.to(dtype)
