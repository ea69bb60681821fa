"""memboost::decode_attention: the CPU kernel under each forced instruction
set and the CUDA kernel against the pure-PyTorch reference and against
transformers' own rotary + scaled_dot_product_attention, the cache writes,
masks, grouped heads, opcheck, bad arguments, and the decode loop using it."""
import pytest
import torch
import torch.nn.functional as F

from memboost import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # `target` (conftest): each forced CPU ISA, and CUDA


def _case(batch, heads, kv_heads, dim, length, dtype, device, seed=0, max_batch=None):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    angles = torch.rand(batch, 1, dim // 2, generator=g).repeat(1, 1, 2) * 6
    max_batch = max_batch or batch
    return dict(q=rand(batch, 1, heads * dim), k=rand(batch, 1, kv_heads * dim), v=rand(batch, 1, kv_heads * dim),
                cos=angles.cos().to(device, dtype), sin=angles.sin().to(device, dtype),
                key_cache=rand(max_batch, kv_heads, length, dim), value_cache=rand(max_batch, kv_heads, length, dim))


def _tolerance(dtype):
    return (16 if dtype == torch.float32 else 4) * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,dim,length,start", [
    (1, 9, 3, 64, 40, 17), (2, 4, 4, 16, 8, 0), (3, 8, 2, 40, 12, 11), (2, 2, 1, 128, 5, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(target, dtype, batch, heads, kv_heads, dim, length, start, masked):
    case = _case(batch, heads, kv_heads, dim, length, dtype, target, max_batch=batch + 1)
    mask = None
    if masked:  # row r does not see its first r keys (left padding); the key at start is always seen
        mask = torch.ones(batch + 1, length, dtype=torch.bool, device=target)
        for r in range(batch):
            mask[r, :min(r, start)] = False
    mine = {k: v.clone() for k, v in case.items()}
    ref = {k: v.clone() for k, v in case.items()}
    scale = dim ** -0.5
    got = ops.decode_attention(**mine, start=start, key_mask=mask, scale=scale)
    want = reference.decode_attention(**ref, start=start, key_mask=mask, scale=scale)
    tol = _tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    # the caches: rotated keys and the values written at start, every other position untouched
    torch.testing.assert_close(mine["key_cache"].float(), ref["key_cache"].float(), rtol=tol, atol=tol * 4)
    assert torch.equal(mine["value_cache"], ref["value_cache"])
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[start] = False
    assert torch.equal(mine["key_cache"][:, :, untouched], case["key_cache"][:, :, untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_transformers_rotary_and_sdpa(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, heads, kv_heads, dim, length, start = 2, 6, 2, 32, 10, 7
    case = _case(batch, heads, kv_heads, dim, length, dtype, "cpu", seed=3)
    keys, values = case["key_cache"].clone(), case["value_cache"].clone()
    got = ops.decode_attention(**case, start=start, key_mask=None, scale=0.3)
    qs, ks = apply_rotary_pos_emb(case["q"].view(batch, 1, heads, dim).transpose(1, 2),
                                  case["k"].view(batch, 1, kv_heads, dim).transpose(1, 2), case["cos"], case["sin"])
    keys[:, :, start:start + 1] = ks
    values[:, :, start:start + 1] = case["v"].view(batch, 1, kv_heads, dim).transpose(1, 2)
    want = F.scaled_dot_product_attention(qs, keys[:, :, :start + 1], values[:, :, :start + 1], scale=0.3,
                                          enable_gqa=True).transpose(1, 2).reshape(batch, 1, -1)
    tol = _tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


def test_a_row_that_sees_no_key_is_nan_as_sdpa(target):
    case = _case(2, 2, 1, 16, 4, torch.float32, target)
    mask = torch.ones(2, 4, dtype=torch.bool, device=target)
    mask[1] = False
    out = ops.decode_attention(**case, start=2, key_mask=mask, scale=0.25)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


def test_opcheck(device):
    case = _case(2, 4, 2, 16, 6, torch.float32, device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    torch.library.opcheck(torch.ops.memboost.decode_attention.default,
                          (case["q"], case["k"], case["v"], case["cos"], case["sin"], case["key_cache"],
                           case["value_cache"], 3, mask, 0.25))


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.randn(2, 2, 64)), "one query per row"),
    (dict(q=torch.randn(2, 1, 60)), "multiple of the cache's"),
    (dict(k=torch.randn(2, 1, 16)), "'k' must have shape"),
    (dict(cos=torch.randn(2, 1, 8)), "'cos' must have shape"),
    (dict(value_cache=torch.randn(2, 2, 5, 16)), "'value_cache' must have key_cache's shape"),
    (dict(start=6), r"'start' must be in \[0, 6\)"),
    (dict(start=-1), r"'start' must be in"),
    (dict(v=torch.randn(2, 1, 32).half()), "must have q's dtype"),
    (dict(key_mask=torch.ones(2, 3, dtype=torch.bool)), "'key_mask' must cover"),
    (dict(key_mask=torch.ones(2, 6)), "'key_mask' must have dtype"),
    (dict(key_cache=torch.randn(2, 2, 16, 6).transpose(2, 3)), "must be contiguous"),
    (dict(q=torch.randn(2, 1, 64, dtype=torch.float64)), "'q' must be torch.float16"),
])
def test_bad_arguments_named(change, match):
    case = _case(2, 4, 2, 16, 6, torch.float32, "cpu")
    args = dict(case, start=3, key_mask=None, scale=0.25)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        torch.ops.memboost.decode_attention.default(*args.values())


def test_decode_loop_uses_it_and_matches_the_modules_path():
    """Decode steps go through the op (a probe at construction checked it); the tokens equal the modules' path."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_runtime import eager, prompt, quantized
    from memboost.runtime import Decoder

    model = quantized("llama", "nf4")
    decoder = Decoder(model, max_batch=3, max_length=40)
    assert decoder.fused_attention
    rows = [prompt(5, 1).tolist(), prompt(9, 2).tolist(), prompt(2, 3).tolist()]
    fused = decoder.generate(rows, max_new_tokens=16)
    decoder.fused_attention = False
    modules = decoder.generate(rows, max_new_tokens=16)
    assert torch.equal(fused, modules)
    assert torch.equal(fused[1], eager(model, torch.tensor(rows[1]), 16))
