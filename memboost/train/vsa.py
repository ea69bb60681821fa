"""Hyperdimensional computing (VSA) and a seeded count sketch of gradients.

Everything random here comes from one integer hash, the SplitMix64 finalizer
applied to (element index, seed), computed with int64 tensor ops. Integer
arithmetic wraps the same way on every device, so the CPU and CUDA produce
bit-identical hypervectors, buckets and signs for the same seed, and nothing
random is ever stored: it is regenerated from the seed, chunk by chunk, in
O(n) time and O(chunk) extra memory.

Hypervectors::

    a = random_hypervector(10_000, seed=1)             # bipolar {-1, +1}, float32
    t = random_hypervector(10_000, seed=2, kind="ternary", sparsity=0.5)
    bind(bind(a, key), key)                            # == a for a bipolar key
    s = bundle([a, b, c], majority=True)               # similar to each of them
    similarity(permute(a, 3), a)                       # ~0; permute(., -3) undoes it

Gradient sketch (a count sketch: each coordinate is hashed to one of k
buckets with a random sign, i.e. bound to a random bipolar key and bundled
into k slots)::

    c = count_sketch(g, ratio=0.1, seed=7)             # k = ceil(0.1 * g.numel()) float32 values
    g_hat = count_unsketch(c, g.numel(), ratio=0.1, seed=7)   # unbiased over seeds
    comp = GradientCompressor(ratio=0.1, seed=0)       # with error feedback
    update = comp.decompress(comp.compress(g))         # all-reduce the sketch in between

and the seed-compatible wrappers compress_gradients_vsa / decompress_gradients_vsa,
which take and return numpy arrays or tensors.
"""

import math
import numbers
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from ..errors import MemboostError, MemboostTypeError

__all__ = [
    "random_hypervector", "bind", "bundle", "permute", "similarity", "derive_seed", "sketch_size",
    "count_sketch", "count_unsketch", "error_feedback_scale", "GradientCompressor",
    "compress_gradients_vsa", "decompress_gradients_vsa",
]

_U64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: odd, so i -> i * gamma is a bijection
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INT64_MIN = -(1 << 63)
# Domain tags keep the hypervector stream of seed s apart from the sketch stream of seed s.
_DOMAIN_HYPERVECTOR = 0x68797065
_DOMAIN_SKETCH = 0x736B6574


def _signed(u: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    u &= _U64
    return u - (1 << 64) if u >> 63 else u


def _mix64(z: int) -> int:
    """SplitMix64 finalizer on a Python int (the scalar twin of _mix64_)."""
    z &= _U64
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


def _mix64_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer in place on an int64 tensor. torch's >> is
    arithmetic on int64, so each shift is masked to make it logical;
    multiplication wraps modulo 2**64 on every device."""
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (64 - shift)) - 1
        x ^= tmp
        if mult is not None:
            x *= _signed(mult)
    return x


def _check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise MemboostTypeError(f"'{name}' must be an int, got {type(seed).__name__}")
    return int(seed) & _U64


def derive_seed(seed: int, *values: int) -> int:
    """A new 64-bit seed from `seed` and integers (e.g. a step and a bucket
    index): hashed, so neighbouring inputs give unrelated streams."""
    h = _mix64(_check_seed(seed) ^ 0x5EED)
    for i, v in enumerate(values):
        h = _mix64(h ^ _mix64(_check_seed(v, f"values[{i}]") + _GOLDEN * (i + 1)))
    return h


def _chunk_size(device: torch.device) -> int:
    # CPU: 1 Mi elements keeps the int64 temporaries (8 MiB each) in cache; CUDA: fewer launches.
    return 1 << 20 if device.type == "cpu" else 1 << 24


def _hash_chunks(n: int, seed: int, domain: int, device: torch.device) -> Iterable[Tuple[int, torch.Tensor]]:
    """Yields (start, h) with h[j] = SplitMix64((start + j + 1) * gamma + key)
    as int64, for consecutive chunks covering [0, n). key depends on (seed,
    domain) only, so element i hashes the same whatever the chunking."""
    key = _mix64(_mix64(seed) ^ domain)
    chunk = min(_chunk_size(device), n)
    ramp = torch.arange(1, chunk + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN)
    tmp = torch.empty(chunk, dtype=torch.int64, device=device)
    for start in range(0, n, chunk):
        length = min(chunk, n - start)
        h = ramp[:length] + _signed(start * _GOLDEN + key)
        yield start, _mix64_(h, tmp[:length])


def _check_device(device) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise MemboostError(f"'device' is not a torch device: {device!r}") from e


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise MemboostTypeError(f"'{name}' must be an int, got {type(v).__name__}")
    if v < 1:
        raise MemboostError(f"'{name}' must be >= 1, got {v}")
    return int(v)


# ---------------------------------------------------------------- hypervectors

def random_hypervector(d: int, seed: int, kind: str = "bipolar", *, sparsity: float = 0.5,
                       device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random hypervector of dimension d.

    kind="bipolar": entries -1 or +1, each with probability 1/2.
    kind="ternary": 0 with probability `sparsity`, else -1 or +1 equally.

    Entry i depends only on (seed, i): the same on CPU and CUDA, and a longer
    vector with the same seed extends a shorter one.
    """
    d = _check_positive_int(d, "d")
    seed = _check_seed(seed)
    if kind not in ("bipolar", "ternary"):
        raise MemboostError(f"'kind' must be 'bipolar' or 'ternary', got {kind!r}")
    if not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) < 1.0:
        raise MemboostError(f"'sparsity' must be a number in [0, 1), got {sparsity!r}")
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype in (torch.int8, torch.int32, torch.int64)):
        raise MemboostTypeError(f"'dtype' must be a floating point torch.dtype or int8/int32/int64, got {dtype!r}")
    device = _check_device(device)
    out = torch.empty(d, dtype=dtype, device=device)
    # The low 32 bits give the zero test, bit 63 the sign: independent bits of the hash.
    zero_below = int(round(float(sparsity) * (1 << 32)))
    for start, h in _hash_chunks(d, seed, _DOMAIN_HYPERVECTOR, device):
        v = (h >> 63 | 1).to(torch.int8)  # arithmetic shift: -1 or 0; | 1: -1 or +1
        if kind == "ternary":
            v[(h & _M32) < zero_below] = 0
        out[start:start + h.numel()] = v
    return out


def _check_hv(v, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise MemboostTypeError(f"'{name}' must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() == 0:
        raise MemboostError(f"'{name}' must have at least one dimension (the hypervector), got a scalar")
    return v


def bind(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Binding: the elementwise product. The result is dissimilar to both
    inputs; binding again with a bipolar key undoes it (key * key = 1)."""
    _check_hv(a, "a"), _check_hv(b, "b")
    if a.shape != b.shape:
        raise MemboostError(f"'a' and 'b' must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a * b


def bundle(vectors: Union[Sequence[torch.Tensor], torch.Tensor], majority: bool = False) -> torch.Tensor:
    """Bundling (superposition) of hypervectors given as a list or stacked
    along dim 0: their sum, similar to every member.

    majority=True returns sign(sum), a bipolar vector; ties (an even number of
    bipolar inputs, or ternary zeros) go to +1, so the result is
    deterministic and always bipolar.
    """
    if isinstance(vectors, torch.Tensor):
        stacked = _check_hv(vectors, "vectors")
        if stacked.dim() < 2 or stacked.shape[0] == 0:
            raise MemboostError(f"'vectors' as a tensor must be [count >= 1, ..., d], got shape {tuple(stacked.shape)}")
    else:
        vectors = list(vectors)
        if not vectors:
            raise MemboostError("'vectors' is empty: bundle needs at least one hypervector")
        for i, v in enumerate(vectors):
            _check_hv(v, f"vectors[{i}]")
            if v.shape != vectors[0].shape:
                raise MemboostError(f"'vectors[{i}]' has shape {tuple(v.shape)}, 'vectors[0]' has {tuple(vectors[0].shape)}: all must match")
        stacked = torch.stack(vectors)
    total = stacked.sum(0)
    if not majority:
        return total
    return torch.where(total < 0, -1, 1).to(total.dtype)


def permute(v: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Cyclic shift of the last dimension by `shift` positions; permute(v, -shift)
    is the inverse. Encodes order (sequence positions) in a bundle."""
    _check_hv(v, "v")
    if isinstance(shift, bool) or not isinstance(shift, numbers.Integral):
        raise MemboostTypeError(f"'shift' must be an int, got {type(shift).__name__}")
    return torch.roll(v, int(shift), dims=-1)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension, in [-1, 1] (0 where either
    vector is zero). Inputs broadcast against each other."""
    _check_hv(a, "a"), _check_hv(b, "b")
    if a.shape[-1] != b.shape[-1]:
        raise MemboostError(f"'a' and 'b' must have the same last dimension, got {a.shape[-1]} and {b.shape[-1]}")
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(acc), b.to(acc)
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(dot))


# ---------------------------------------------------------------- count sketch

def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise MemboostTypeError(f"'ratio' must be a number in (0, 1], got {type(ratio).__name__}")
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:  # also refuses NaN
        raise MemboostError(f"'ratio' must be in (0, 1], got {ratio}")
    return ratio


def sketch_size(n: int, ratio: float) -> int:
    """k = ceil(ratio * n), at least 1. A relative 1e-12 is forgiven first, so
    that 0.07 * 100 (= 7.000000000000001 in floating point) gives 7."""
    n = _check_positive_int(n, "n")
    ratio = _check_ratio(ratio)
    return max(1, math.ceil(ratio * n * (1.0 - 1e-12)))


def _check_gradient(g, name: str) -> torch.Tensor:
    if not isinstance(g, torch.Tensor):
        raise MemboostTypeError(f"'{name}' must be a torch.Tensor, got {type(g).__name__}")
    if not g.dtype.is_floating_point:
        raise MemboostTypeError(f"'{name}' must be a floating point tensor, got {g.dtype}")
    if g.numel() == 0:
        raise MemboostError(f"'{name}' is empty (shape {tuple(g.shape)})")
    return g


def _buckets(h: torch.Tensor, k: int) -> torch.Tensor:
    # Lemire's multiply-shift maps the hash's low 32 bits onto [0, k) (k < 2**31: no overflow).
    b = h & _M32
    b *= k
    b >>= 32
    return b


def _times_sign(vals64: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """vals64 * s with s = -1 where the hash's bit 63 is set: that bit XORed
    into the float64 sign bit (several times faster than torch.where)."""
    return (vals64.view(torch.int64) ^ (h & _INT64_MIN)).view(torch.float64)


def count_sketch(g: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Count sketch of g (any shape, flattened): k = sketch_size(g.numel(), ratio)
    values c[b] = sum over i with h(i) = b of s(i) * g[i], where the bucket
    h(i) in [0, k) and the sign s(i) in {-1, +1} are hashed from (seed, i).
    In VSA terms: bind g to a random bipolar key, then bundle into k slots.

    Linear in g (sketches of several ranks can be summed, i.e. all-reduced,
    before decompression). O(n) time, O(k + chunk) memory. float32 result
    (float64 for float64 input) on g's device. Buckets are summed in float64
    and rounded once, so the CPU and CUDA (whose atomics add in any order)
    give the same float32 sketch, barring sums within ~1e-16 of a tie.
    """
    g = _check_gradient(g, "g")
    seed = _check_seed(seed)
    n = g.numel()
    k = sketch_size(n, ratio)
    if k >= 1 << 31:
        raise MemboostError(f"sketch of {k} values is too large (at most 2**31 - 1); lower 'ratio' or split 'g'")
    flat = g.detach().reshape(-1)  # a sketch is data sent over the wire, not part of a graph
    # float64 buckets: another adding order moves a sum by ~1e-16 relative, far
    # below float32's resolution, so every device rounds to the same float32
    out = torch.zeros(k, dtype=torch.float64, device=g.device)
    for start, h in _hash_chunks(n, seed, _DOMAIN_SKETCH, g.device):
        vals = flat[start:start + h.numel()].to(torch.float64)
        out.index_add_(0, _buckets(h, k), _times_sign(vals, h))
    return out if g.dtype == torch.float64 else out.to(torch.float32)


def count_unsketch(sketch: torch.Tensor, n: int, ratio: float, seed: int) -> torch.Tensor:
    """The estimate g_hat[i] = s(i) * sketch[h(i)] of a vector of n values,
    from count_sketch(g, ratio, seed) (or a sum/average of such sketches).

    Unbiased over seeds: E[g_hat] = g, because every other coordinate j that
    shares i's bucket enters with the sign s(i) s(j), +1 or -1 equally. Its
    variance is sum_{j != i} g_j**2 / k ~ ||g||**2 / k per coordinate, so
    E||g_hat - g||**2 = (n - 1) / k * ||g||**2: at ratio 0.1 the noise has
    ten times the energy of the signal. One sketch alone is a poor gradient;
    error feedback (GradientCompressor, memboost.distributed.vsa_hook) is what
    makes training with it converge.

    'n' must give len(sketch) values at this ratio (sketch_size(n, ratio)),
    which catches most wrong n; n's that round to the same k cannot be told
    apart. Returns a flat float32 tensor (float64 for a float64 sketch).
    """
    if not isinstance(sketch, torch.Tensor):
        raise MemboostTypeError(f"'sketch' must be a torch.Tensor, got {type(sketch).__name__}")
    if sketch.dim() != 1 or not sketch.dtype.is_floating_point:
        raise MemboostError(f"'sketch' must be a 1-D floating point tensor, got shape {tuple(sketch.shape)} {sketch.dtype}")
    seed = _check_seed(seed)
    k = sketch_size(n, ratio)
    if sketch.numel() != k:
        raise MemboostError(f"'n' = {n} does not match the sketch: at ratio {ratio} it needs {k} values, "
                            f"'sketch' has {sketch.numel()} (pass the element count that was compressed)")
    sk = sketch.detach().to(torch.float64)
    out = torch.empty(n, dtype=torch.float64 if sketch.dtype == torch.float64 else torch.float32,
                      device=sketch.device)
    for start, h in _hash_chunks(n, seed, _DOMAIN_SKETCH, sketch.device):
        out[start:start + h.numel()] = _times_sign(sk.index_select(0, _buckets(h, k)), h)
    return out


def error_feedback_scale(n: int, ratio: float) -> float:
    """gamma = k / (k + n - 1): the multiple of the unbiased estimate that
    error feedback applies. The unbiased estimate's error has (n - 1)/k times
    the energy of the signal, so feeding its residual back would multiply the
    residual by about that much every step. Scaled by gamma (the
    minimum-mean-squared-error multiple) the compressor is a contraction,
    E||x - gamma * g_hat||**2 = (1 - gamma) ||x||**2, which is the condition
    under which error feedback converges; what is not applied in one step
    stays in the residual and is applied later."""
    k = sketch_size(n, ratio)
    return k / (k + n - 1)


class GradientCompressor:
    """Count-sketch gradient compression with error feedback.

        comp = GradientCompressor(ratio=0.1, seed=0)
        c = comp.compress(grad)           # sketch of grad + residual, k values
        # ... optionally all-reduce c (sum) and divide by the world size ...
        update = comp.decompress(c)       # same shape and dtype as grad

    compress(g) sketches x = g + e (e: the residual, zero at first) with the
    seed of the current step; decompress(c) returns gamma * count_unsketch(c)
    (gamma = error_feedback_scale(n, ratio)) and keeps e = x - update for the
    next step. The step's seed is derive_seed(seed, step): it changes every
    step (a fixed hash would make the same coordinates collide forever) and
    is the same on every process that starts from the same seed.

    What to expect: a k-value sketch carries about k/n of the gradient's
    energy per step; the rest reaches the model later through the residual,
    which settles near n/k times the gradient. That delay limits the step
    size: on a quadratic, SGD with it is stable for lr * curvature up to
    about `ratio` (uncompressed: 2), so use a smaller learning rate (and
    momentum) than without compression.
    """

    def __init__(self, ratio: float = 0.1, seed: int = 0):
        self.ratio = _check_ratio(ratio)
        self.seed = _check_seed(seed)
        self.step = 0
        self.residual: Optional[torch.Tensor] = None
        self._pending: Optional[torch.Tensor] = None
        self._like: Optional[torch.Tensor] = None

    def step_seed(self) -> int:
        return derive_seed(self.seed, self.step)

    def compress(self, g: torch.Tensor) -> torch.Tensor:
        g = _check_gradient(g, "g")
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        x = g.detach().reshape(-1).to(acc, copy=True)
        if self.residual is not None:
            if self.residual.numel() != x.numel():
                raise MemboostError(f"'g' has {x.numel()} elements, earlier gradients had {self.residual.numel()}: "
                                    "use one GradientCompressor per gradient tensor")
            x += self.residual.to(device=x.device, dtype=acc)
        self._pending, self._like = x, g
        return count_sketch(x, self.ratio, self.step_seed())

    def decompress(self, sketch: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            raise MemboostError("decompress() needs a compress() first: there is no pending gradient")
        if not isinstance(sketch, torch.Tensor):
            raise MemboostTypeError(f"'sketch' must be a torch.Tensor, got {type(sketch).__name__}")
        x = self._pending
        n = x.numel()
        update = count_unsketch(sketch.to(x.device), n, self.ratio, self.step_seed())
        update *= error_feedback_scale(n, self.ratio)
        self.residual = x - update.to(x.dtype)
        self._pending = None
        self.step += 1
        return update.reshape(self._like.shape).to(self._like.dtype)


# ---------------------------------------------------------------- seed-compatible wrappers

def _as_tensor(a, name: str):
    """(tensor, to_caller): numpy arrays go in and come back as numpy arrays."""
    if isinstance(a, torch.Tensor):
        return a, lambda t: t
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np = None
    if np is not None and isinstance(a, np.ndarray):
        if not np.issubdtype(a.dtype, np.floating):
            raise MemboostTypeError(f"'{name}' must hold floating point values, got numpy {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a)), lambda t: t.cpu().numpy()
    raise MemboostTypeError(f"'{name}' must be a numpy array or a torch.Tensor, got {type(a).__name__}")


def compress_gradients_vsa(gradients, ratio: float, seed: int):
    """Seed-system call shape: `compressed, seed = compress_gradients_vsa(g, 0.1, 42)`.
    A count sketch (see count_sketch) of the flattened gradients:
    ceil(ratio * n) float32 values whatever the input's float dtype (the
    sketch is what goes over the wire), a numpy array or a tensor as given."""
    t, back = _as_tensor(gradients, "gradients")
    _check_seed(seed)
    return back(count_sketch(t, ratio, seed).to(torch.float32)), seed


def decompress_gradients_vsa(compressed, dim: int, seed: int):
    """Seed-system call shape: `g_hat = decompress_gradients_vsa(compressed, dim, seed)`.
    The unbiased estimate (see count_unsketch) of the `dim` flattened
    gradients. The ratio is not passed here, so it is taken as
    len(compressed) / dim; `dim` must be at least len(compressed), the only
    check this call shape allows on it."""
    t, back = _as_tensor(compressed, "compressed")
    dim = _check_positive_int(dim, "dim")
    if t.dim() != 1:
        raise MemboostError(f"'compressed' must be 1-D, got shape {tuple(t.shape)}")
    k = t.numel()
    if k > dim:
        raise MemboostError(f"'dim' = {dim} is smaller than the sketch ({k} values): pass the number of "
                            "gradient elements that were compressed")
    # Any ratio in ((k-1)/dim, k/dim] gives k; k/dim reproduces it exactly.
    return back(count_unsketch(t, dim, k / dim, seed))
