import math

import numpy as np
import pytest
import torch

from memboost import vsa
from memboost.errors import MemboostError, MemboostTypeError
from memboost.train.vsa import (GradientCompressor, bind, bundle, compress_gradients_vsa, count_sketch, count_unsketch,
                          decompress_gradients_vsa, error_feedback_scale, permute, random_hypervector, similarity,
                          sketch_size)


def splitmix64_reference(index: int, seed: int, domain: int) -> int:
    """The stream the tensor code must produce, written out once more in
    plain Python from the SplitMix64 definition (state = key + (i+1)*gamma)."""
    mask = (1 << 64) - 1

    def fin(z):
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = fin(fin(seed) ^ domain)
    return fin(key + (index + 1) * 0x9E3779B97F4A7C15)


# ---------------------------------------------------------------- hypervectors

def test_hypervector_matches_scalar_hash_across_chunk_boundaries():
    chunk = 1 << 20
    d = chunk + 5
    v = random_hypervector(d, seed=12345)
    for i in [0, 1, 2, chunk - 1, chunk, chunk + 4]:
        h = splitmix64_reference(i, 12345, vsa._DOMAIN_HYPERVECTOR)
        assert v[i].item() == (-1.0 if h >> 63 else 1.0), i
    # entry i depends on (seed, i) only: a shorter vector is a prefix
    assert torch.equal(random_hypervector(1000, seed=12345), v[:1000])


def test_bipolar_and_ternary_statistics():
    d = 100_000
    b = random_hypervector(d, seed=3)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert abs(b.mean().item()) < 0.02  # 5 standard deviations of a fair +-1 mean
    t = random_hypervector(d, seed=3, kind="ternary", sparsity=0.7)
    assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert abs((t == 0).float().mean().item() - 0.7) < 0.01
    nonzero = t[t != 0]
    assert abs(nonzero.mean().item()) < 0.03
    assert not torch.equal(random_hypervector(d, seed=4), b)
    assert torch.equal(random_hypervector(d, seed=3), b)
    assert random_hypervector(16, seed=3, dtype=torch.int8).dtype == torch.int8


def test_random_hypervectors_are_quasi_orthogonal():
    vs = torch.stack([random_hypervector(10_000, seed=s) for s in range(12)])
    cos = similarity(vs[:, None, :], vs[None, :, :])
    off_diagonal = cos[~torch.eye(12, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 0.05
    assert torch.allclose(cos.diagonal(), torch.ones(12))


def test_bind_is_self_inverse_and_dissimilar():
    d = 10_000
    key = random_hypervector(d, seed=1)
    for a in (random_hypervector(d, seed=2), random_hypervector(d, seed=2, kind="ternary"), torch.randn(d)):
        bound = bind(a, key)
        assert torch.equal(bind(bound, key), a)
        assert abs(similarity(bound, a).item()) < 0.05
    # binding preserves similarity between two vectors bound with the same key
    a, b = random_hypervector(d, seed=5), random_hypervector(d, seed=6)
    mix = bundle([a, b], majority=True)
    assert similarity(bind(mix, key), bind(a, key)).item() == pytest.approx(similarity(mix, a).item(), abs=1e-6)


@pytest.mark.parametrize("majority", [False, True])
def test_bundle_members_stay_similar(majority):
    d = 10_000
    members = [random_hypervector(d, seed=s) for s in range(5)]
    others = [random_hypervector(d, seed=100 + s) for s in range(20)]
    bundled = bundle(members, majority=majority)
    member_sim = torch.stack([similarity(bundled, m) for m in members])
    other_sim = torch.stack([similarity(bundled, o) for o in others])
    # expected ~1/sqrt(5) = 0.45 for the sum and 3/8 * ... ~0.37 for the majority of 5
    assert member_sim.min().item() > 0.3
    assert other_sim.abs().max().item() < 0.05
    assert torch.equal(bundle(torch.stack(members), majority=majority), bundled)


def test_majority_ties_go_to_plus_one():
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    b = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert bundle([a, b], majority=True).tolist() == [1.0, 1.0, 1.0, -1.0]
    assert bundle([a, b]).tolist() == [2.0, 0.0, 0.0, -2.0]


def test_permute_inverse_and_order():
    a = random_hypervector(10_000, seed=9)
    assert torch.equal(permute(permute(a, 7), -7), a)
    assert abs(similarity(permute(a, 1), a).item()) < 0.05
    assert permute(torch.arange(5.0), 2).tolist() == [3.0, 4.0, 0.0, 1.0, 2.0]


def test_similarity_values():
    a = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(similarity(a, 2 * a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(similarity(a, -a), -torch.ones(3, dtype=torch.float64))
    assert similarity(torch.zeros(8), torch.ones(8)).item() == 0.0
    expected = torch.nn.functional.cosine_similarity(a, a.flip(0), dim=-1)
    assert torch.allclose(similarity(a, a.flip(0)), expected)


def test_hypervectors_identical_on_every_device(device):
    for kind in ("bipolar", "ternary"):
        cpu = random_hypervector(50_000, seed=77, kind=kind)
        dev = random_hypervector(50_000, seed=77, kind=kind, device=device)
        assert dev.device.type == device
        assert torch.equal(dev.cpu(), cpu)
    a = random_hypervector(1000, seed=1, device=device)
    b = random_hypervector(1000, seed=2, device=device)
    assert torch.equal(bind(a, b).cpu(), bind(a.cpu(), b.cpu()))


def test_hypervector_bad_input():
    with pytest.raises(MemboostError, match="'d'"):
        random_hypervector(0, seed=1)
    with pytest.raises(MemboostTypeError, match="'seed'"):
        random_hypervector(10, seed=1.5)
    with pytest.raises(MemboostError, match="'kind'"):
        random_hypervector(10, seed=1, kind="binary")
    with pytest.raises(MemboostError, match="'sparsity'"):
        random_hypervector(10, seed=1, kind="ternary", sparsity=1.0)
    with pytest.raises(MemboostError, match="'a' and 'b'"):
        bind(torch.ones(3), torch.ones(4))
    with pytest.raises(MemboostError, match="'vectors'"):
        bundle([])
    with pytest.raises(MemboostError, match=r"'vectors\[1\]'"):
        bundle([torch.ones(3), torch.ones(4)])
    with pytest.raises(MemboostTypeError, match="'shift'"):
        permute(torch.ones(3), 1.0)
    with pytest.raises(MemboostTypeError, match="'a'"):
        similarity([1.0], torch.ones(1))


# ---------------------------------------------------------------- count sketch

def test_sketch_size():
    assert sketch_size(1000, 0.1) == 100
    assert sketch_size(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floating point
    assert sketch_size(1001, 0.1) == 101
    assert sketch_size(5, 1e-9) == 1
    assert sketch_size(5, 1.0) == 5


def test_sketch_buckets_and_signs_follow_the_hash():
    n, k, seed = 300, 30, 4
    g = torch.zeros(n, dtype=torch.float64)
    g[123] = 2.5
    c = count_sketch(g, k / n, seed)
    h = splitmix64_reference(123, seed, vsa._DOMAIN_SKETCH)
    bucket, sign = ((h & 0xFFFFFFFF) * k) >> 32, (-1.0 if h >> 63 else 1.0)
    expected = torch.zeros(k, dtype=torch.float64)
    expected[bucket] = sign * 2.5
    assert torch.equal(c, expected)


def test_sketch_is_linear():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, generator=g, dtype=torch.float64), torch.randn(5000, generator=g, dtype=torch.float64)
    lhs = count_sketch(a, 0.1, 11) + count_sketch(b, 0.1, 11)
    rhs = count_sketch(a + b, 0.1, 11)
    assert (lhs - rhs).abs().max().item() < 1e-12 * rhs.abs().max().item()
    a32, b32 = a.float(), b.float()
    lhs32 = count_sketch(a32, 0.1, 11) + count_sketch(b32, 0.1, 11)
    assert lhs32.dtype == torch.float32
    assert torch.allclose(lhs32, count_sketch(a32 + b32, 0.1, 11), rtol=1e-6, atol=1e-6)
    assert torch.allclose(count_sketch(3 * a, 0.1, 11), 3 * count_sketch(a, 0.1, 11), rtol=1e-12, atol=1e-12)
    # the sketch of a matrix is the sketch of its flattening
    assert torch.equal(count_sketch(a.view(50, 100), 0.1, 11), count_sketch(a, 0.1, 11))


def test_unsketch_is_unbiased_with_the_stated_variance():
    n, ratio, seeds = 1000, 0.1, 1000
    k = sketch_size(n, ratio)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    sq_err = 0.0
    for s in range(seeds):
        g_hat = count_unsketch(count_sketch(g, ratio, s), n, ratio, s)
        total += g_hat
        sq_err += float((g_hat - g).square().sum() / g.square().sum())
    # E||g_hat - g||^2 / ||g||^2 = (n - 1) / k (9.99 here); the mean of 1000 draws is within 5%
    assert sq_err / seeds == pytest.approx((n - 1) / k, rel=0.05)
    # the mean over seeds tends to g at the rate sqrt((n-1) / (k * seeds)) = 0.1: a biased
    # sketch (e.g. one that shrinks by 0.32 k/n) would stay near ||g|| away
    mean_err = float((total / seeds - g).norm() / g.norm())
    assert 0.7 * math.sqrt((n - 1) / (k * seeds)) < mean_err < 1.3 * math.sqrt((n - 1) / (k * seeds))


def test_sketch_on_every_device_matches_cpu(device):
    g = torch.randn(200_003, generator=torch.Generator().manual_seed(2))
    c_cpu = count_sketch(g, 0.05, 8)
    c_dev = count_sketch(g.to(device), 0.05, 8)
    assert c_dev.device.type == device
    # CUDA adds in another order, but in float64, rounded once to float32
    assert torch.equal(c_dev.cpu(), c_cpu)
    assert torch.equal(count_unsketch(c_cpu.to(device), g.numel(), 0.05, 8).cpu(),
                       count_unsketch(c_cpu, g.numel(), 0.05, 8))


def test_sketch_accepts_half_precision():
    g = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        c = count_sketch(g.to(dtype), 0.25, 1)
        assert c.dtype == torch.float32
        assert torch.allclose(c, count_sketch(g.to(dtype).float(), 0.25, 1))


def test_sketch_bad_input():
    g = torch.randn(100)
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(MemboostError, match="'ratio'"):
            count_sketch(g, bad, 0)
    with pytest.raises(MemboostTypeError, match="'ratio'"):
        count_sketch(g, "0.1", 0)
    with pytest.raises(MemboostTypeError, match="'g'"):
        count_sketch(torch.arange(10), 0.1, 0)
    with pytest.raises(MemboostError, match="'g' is empty"):
        count_sketch(torch.empty(0), 0.1, 0)
    with pytest.raises(MemboostTypeError, match="'seed'"):
        count_sketch(g, 0.1, "42")
    c = count_sketch(g, 0.1, 0)
    with pytest.raises(MemboostError, match="'n' = 200"):
        count_unsketch(c, 200, 0.1, 0)
    with pytest.raises(MemboostError, match="'n'"):
        count_unsketch(c, 0, 0.1, 0)
    with pytest.raises(MemboostError, match="'sketch'"):
        count_unsketch(c.view(2, 5), 100, 0.1, 0)


# ---------------------------------------------------------------- error feedback

def test_error_feedback_conserves_the_gradient_sum():
    n, steps = 4000, 60
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    comp = GradientCompressor(ratio=0.1, seed=3)
    applied = torch.zeros(n, dtype=torch.float64)
    for g in grads:
        update = comp.decompress(comp.compress(g))
        assert update.shape == g.shape and update.dtype == g.dtype
        applied += update
    # what error feedback promises: nothing is lost, only delayed
    assert torch.allclose(applied + comp.residual, sum(grads), rtol=1e-10, atol=1e-10)
    assert comp.step == steps


def test_error_feedback_residual_stays_bounded_and_updates_average_to_g():
    n, steps = 5000, 300
    g = torch.randn(n, generator=torch.Generator().manual_seed(5))
    comp = GradientCompressor(ratio=0.1, seed=0)
    applied = torch.zeros(n)
    norms = []
    for _ in range(steps):
        applied += comp.decompress(comp.compress(g))
        norms.append(float(comp.residual.norm() / g.norm()))
    # contraction 1 - gamma (gamma ~ 0.1): the residual settles near 1/gamma-ish times g, never grows
    assert max(norms[steps // 2:]) < 1.5 * max(norms[:steps // 2])
    assert max(norms) < 3 / error_feedback_scale(n, 0.1)
    assert float((applied / steps - g).norm() / g.norm()) < max(norms) / steps * 1.01


def test_error_feedback_sgd_converges_on_a_quadratic():
    n = 2000
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(n, generator=gen)
    curvature = torch.rand(n, generator=gen) + 0.5  # f(w) = sum c_i (w_i - t_i)^2 / 2
    w = torch.zeros(n)
    comp = GradientCompressor(ratio=0.1, seed=1)
    # lr * max curvature = 0.075 < ratio: stable (at 0.15 it diverges; the delay error
    # feedback introduces is ~1/ratio steps)
    for _ in range(400):
        w -= 0.05 * comp.decompress(comp.compress(curvature * (w - target)))
    assert float((w - target).norm() / target.norm()) < 0.01


def test_compressor_seeds_advance_per_step():
    comp = GradientCompressor(ratio=0.5, seed=9)
    g = torch.randn(64)
    first = comp.compress(g)
    comp.decompress(first)
    comp.residual.zero_()
    assert not torch.equal(comp.compress(g), first)  # new step, new hashes
    again = GradientCompressor(ratio=0.5, seed=9)
    assert torch.equal(again.compress(g), first)


def test_compressor_bad_input():
    with pytest.raises(MemboostError, match="'ratio'"):
        GradientCompressor(ratio=0, seed=0)
    comp = GradientCompressor(ratio=0.1, seed=0)
    with pytest.raises(MemboostError, match="compress"):
        comp.decompress(torch.zeros(10))
    comp.decompress(comp.compress(torch.randn(100)))
    with pytest.raises(MemboostError, match="'g' has 50 elements"):
        comp.compress(torch.randn(50))
    c = comp.compress(torch.randn(100))
    with pytest.raises(MemboostError, match="'n'"):
        comp.decompress(c[:5])


# ---------------------------------------------------------------- seed-compatible wrappers

def test_seed_compatible_wrappers_numpy_and_tensor():
    g = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    compressed, seed = compress_gradients_vsa(g, 0.1, 42)
    assert seed == 42 and isinstance(compressed, np.ndarray) and compressed.shape == (1000,)
    assert compressed.dtype == np.float32
    restored = decompress_gradients_vsa(compressed, len(g), seed)
    assert isinstance(restored, np.ndarray) and restored.shape == g.shape
    expected = count_unsketch(count_sketch(torch.from_numpy(g), 0.1, 42), len(g), 0.1, 42)
    np.testing.assert_array_equal(restored, expected.numpy())

    t = torch.from_numpy(g)
    c_t, _ = compress_gradients_vsa(t, 0.1, 42)
    assert isinstance(c_t, torch.Tensor) and torch.equal(c_t, torch.from_numpy(compressed))
    r_t = decompress_gradients_vsa(c_t, len(g), 42)
    assert isinstance(r_t, torch.Tensor) and torch.equal(r_t, torch.from_numpy(restored))
    # float64 numpy in, float32 out as documented (count_sketch's float64 sums rounded once),
    # and a ratio whose k is not a round share of n
    g64 = g[:777].astype(np.float64)
    c64, _ = compress_gradients_vsa(g64, 0.3, 1)
    assert c64.dtype == np.float32 and c64.shape == (sketch_size(777, 0.3),)
    assert np.array_equal(c64, count_sketch(torch.from_numpy(g64), 0.3, 1).float().numpy())
    np.testing.assert_allclose(decompress_gradients_vsa(c64, 777, 1),
                               count_unsketch(torch.from_numpy(c64), 777, 0.3, 1).numpy())
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert compress_gradients_vsa(torch.from_numpy(g).to(dtype), 0.1, 42)[0].dtype == torch.float32


def test_seed_compatible_wrappers_bad_input():
    c, _ = compress_gradients_vsa(np.ones(100, dtype=np.float32), 0.1, 0)
    with pytest.raises(MemboostError, match="'dim'"):
        decompress_gradients_vsa(c, 5, 0)
    with pytest.raises(MemboostTypeError, match="'gradients'"):
        compress_gradients_vsa([1.0, 2.0], 0.1, 0)
    with pytest.raises(MemboostTypeError, match="'gradients'"):
        compress_gradients_vsa(np.arange(10), 0.1, 0)
    with pytest.raises(MemboostError, match="'ratio'"):
        compress_gradients_vsa(np.ones(10, dtype=np.float32), 2.0, 0)
    with pytest.raises(MemboostTypeError, match="'dim'"):
        decompress_gradients_vsa(c, 100.0, 0)
