"""memboost::rms_norm: the CPU kernel under each forced instruction set and
the CUDA kernel against the pure-PyTorch reference and transformers' own
RMSNorm modules (Llama's rounding and Gemma's 1 + weight), opcheck, bad
arguments, and the decode loop binding it."""

import pytest
import torch

from memboost import _native, ops, reference

from conftest import tiny_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # `target` (conftest): each forced CPU ISA, and CUDA


def _inputs(shape, dtype, device, seed=0, offset=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    w = (torch.randn(shape[-1], generator=g) * (0.2 if offset else 1.0) + (0.0 if offset else 1.0)).to(device, dtype)
    return x, w


def _assert_close_ulps(got, expected, dtype):
    """Within a few units of dtype's precision, relative to each value: the sum of squares runs in another
    order, which moves the inverse RMS by a few float32 ulps (more for long sequential rows); a 16-bit result
    moves by at most the rounding of its last bit, twice for the Llama family's double rounding."""
    ulps = 16 if dtype == torch.float32 else 2
    assert got.dtype == expected.dtype and got.shape == expected.shape
    g, e = got.double().cpu(), expected.double().cpu()
    bound = ulps * torch.finfo(dtype).eps * e.abs() + 1e-30
    bad = ((g - e).abs() > bound).sum().item()
    assert bad == 0, f"{bad} of {e.numel()} values differ by more than {ulps} ulps; max diff {(g - e).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 5, 64), (2, 77), (1, 1, 2048)])
@pytest.mark.parametrize("offset", [False, True])
def test_matches_reference(target, dtype, shape, offset):
    x, w = _inputs(shape, dtype, target, offset=offset)
    got = ops.rms_norm(x, w, 1e-6, offset)
    expected = reference.rms_norm(x, w, 1e-6, offset)
    _assert_close_ulps(got, expected, dtype)


@pytest.mark.parametrize("offset", [False, True])
def test_bound_equals_the_op(target, offset):
    """ops.rms_norm_bound (the decode loop's norm, a memboost._C.BoundOp): the op's result bit for bit."""
    x, w = _inputs((1, 1, 576), torch.float32, target, offset=offset)
    bound = ops.rms_norm_bound(w, 1e-6, offset)
    with torch.inference_mode():
        assert torch.equal(bound(x), ops.rms_norm(x, w, 1e-6, offset))


def test_non_contiguous_and_empty(target):
    x, w = _inputs((6, 128), torch.float32, target)
    xt = x.t().contiguous().t()  # same values, column-major
    torch.testing.assert_close(ops.rms_norm(xt, w, 1e-5, False), reference.rms_norm(x, w, 1e-5, False))
    empty = torch.empty(0, 128, device=target)
    assert ops.rms_norm(empty, w, 1e-5, False).shape == (0, 128)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_transformers_modules(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = _inputs((4, 1, 192), dtype, "cpu")
    llama = LlamaRMSNorm(192, eps=1e-5).to(dtype)
    gemma = GemmaRMSNorm(192, eps=1e-6).to(dtype)
    with torch.no_grad():
        llama.weight.copy_(w)
        gemma.weight.copy_(w - 1)
        _assert_close_ulps(ops.rms_norm(x, llama.weight, 1e-5, False), llama(x), dtype)
        _assert_close_ulps(ops.rms_norm(x, gemma.weight, 1e-6, True), gemma(x), dtype)


def test_opcheck(device):
    x, w = _inputs((3, 64), torch.float32, device)
    torch.library.opcheck(torch.ops.memboost.rms_norm.default, (x, w, 1e-6, False))
    torch.library.opcheck(torch.ops.memboost.rms_norm.default, (x.half(), w.half(), 1e-6, True))


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 8, dtype=torch.float64)), "'x' must be torch.float16"),
    (dict(weight=torch.randn(7)), r"'weight' must have shape \[8\]"),
    (dict(weight=torch.randn(8).half()), "'weight' must have x's dtype"),
    (dict(eps=-1.0), "'eps' must be a finite number"),
    (dict(eps=float("nan")), "'eps' must be a finite number"),
    (dict(x=torch.randn(2, 0), weight=torch.randn(0)), "non-empty last dimension"),
])
def test_bad_arguments_named(bad, match):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(8), eps=1e-6)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        torch.ops.memboost.rms_norm.default(args["x"], args["weight"], args["eps"], False)


def test_decode_loop_binds_the_fused_norm():
    from memboost.runtime import Decoder

    model = tiny_llama()
    decoder = Decoder(model, max_batch=1, max_length=16)
    norm = decoder._steps[0].attn_in
    assert isinstance(norm, _native.C.BoundOp) and norm.name == "memboost::rms_norm"
    weight, eps, offset = norm.args
    assert weight is model.model.layers[0].input_layernorm.weight and offset is False
    assert isinstance(decoder._norm, _native.C.BoundOp) and decoder._norm.name == "memboost::rms_norm"


def test_decode_loop_keeps_a_norm_it_does_not_reproduce():
    """A norm module with other arithmetic (here LayerNorm-like centring) keeps its own forward."""
    from memboost.runtime import decode

    class CentredNorm(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    module = CentredNorm(64).eval()
    assert decode._norm_callable(module, torch.float32) == module.forward
