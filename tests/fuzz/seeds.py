"""Valid inputs written by memboost itself, the starting points of every
harness: small quantized weights of each format (state_dicts), the
safetensors files save_safetensors writes, a tiny random Llama saved by
save_quantized, a QLoRA adapter saved by save_adapter. Cached per process."""

import atexit
import functools
import os
import shutil
import tempfile

import torch

import memboost
from memboost import lort, nf4, ternary
from memboost.formats.tensor import QuantizedTensor

# Under the driver, inside its per-run folder (libFuzzer's exit skips atexit).
FOLDER = tempfile.mkdtemp(prefix="memboost-fuzz-seeds-", dir=os.environ.get("MEMBOOST_FUZZ_TMP"))
atexit.register(shutil.rmtree, FOLDER, ignore_errors=True)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, 0] = 0.3  # an outlier
    return w


@functools.lru_cache(maxsize=None)
def quantized(fmt: str) -> tuple:
    """A few valid weights of format `fmt` (different shapes and options)."""
    if fmt == "mixed":
        return (memboost.quantize(_weight(4, 128, 0), ratio_4bit=0.5, group_size=64, outlier_fraction=0.02),
                memboost.quantize(_weight(3, 96, 1).half(), ratio_4bit=0.0, group_size=32, outlier_fraction=0.0),
                memboost.quantize(_weight(2, 2048, 2), ratio_4bit=0.25, group_size=16, outlier_fraction=0.01))
    if fmt == "ternary":
        return (ternary.quantize(_weight(4, 130, 3)),
                ternary.quantize(_weight(3, 256, 4).bfloat16(), group_size=128),
                ternary.quantize(_weight(5, 64, 5), per_row=False))
    if fmt == "nf4":
        return (nf4.quantize(_weight(4, 64, 6), block_size=64, double_quant=True),
                nf4.quantize(_weight(3, 33, 7).half(), block_size=32, double_quant=False),
                nf4.quantize(_weight(2, 3, 8).reshape(3, 2)[None].contiguous().reshape(1, 3, 2), block_size=64))
    if fmt == "lort":
        return (lort.decompose(_weight(6, 130, 9), rank=2, iters=2)[0],
                lort.decompose(_weight(4, 64, 10).half(), rank=1, iters=1, per_row_alpha=True)[0])
    if fmt == "int8":
        return (memboost.int8.quantize(_weight(4, 64, 11)),
                memboost.int8.quantize(_weight(3, 96, 12).half()))
    raise KeyError(fmt)


def states(fmt: str) -> list:
    return [q.state_dict() for q in quantized(fmt)]


def exercise(q: QuantizedTensor) -> None:
    """What a user does next with a loaded weight: a state that passed
    validation must be safe to hand to the kernels."""
    q.dequantize()
    shape = tuple(q.shape)
    if len(shape) == 2 and 0 < shape[1] <= 1 << 16 and shape[0] <= 1 << 16:
        q.linear(torch.randn(2, shape[1], dtype=q.dtype))


@functools.lru_cache(maxsize=None)
def safetensors_files() -> tuple:
    """Files save_safetensors writes: every format's states under layer
    prefixes, a tied (aliased) tensor, an empty tensor, metadata."""
    out = []
    for i, fmt in enumerate(sorted(QuantizedTensor._formats)):
        state = {f"layers.{j}.weight.{k}": v for j, q in enumerate(quantized(fmt)[:2])
                 for k, v in q.state_dict().items()}
        if i == 0:
            emb = torch.randn(8, 4)
            state.update({"embed.weight": emb, "lm_head.weight": emb, "empty": torch.zeros(0, 3)})
        path = os.path.join(FOLDER, f"{fmt}.safetensors")
        memboost.save_safetensors(state, path, metadata={"format": "pt"})
        with open(path, "rb") as f:
            out.append(f.read())
    return tuple(out)
