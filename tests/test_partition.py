"""memboost.integrations.partition: quantized weights cut and stacked as vLLM's
tensor-parallel and fused layers need them; every result must dequantize to
exactly the matching part of the original weight."""

import pytest
import torch

import memboost
from memboost import MemboostError
from memboost.formats import int8 as int8_format, lort as lort_format, mixed, nf4, ternary
from memboost.integrations import partition

from conftest import llm_like_weight


def _quantize(fmt: str, w: torch.Tensor, **kw):
    if fmt == "mixed":
        return mixed.quantize(w, ratio_4bit=kw.get("ratio_4bit", 0.25), group_size=64)
    if fmt == "nf4":
        return nf4.quantize(w, block_size=64)
    if fmt == "ternary":
        return ternary.quantize(w, per_row=kw.get("per_row", True), group_size=kw.get("group_size"))
    if fmt == "lort":
        return lort_format.decompose(w, rank=kw.get("rank", 8), iters=2)[0]
    return int8_format.quantize(w)


FORMATS = ["mixed", "nf4", "ternary", "lort", "int8"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_and_stack_are_exact(fmt):
    w = llm_like_weight(96, 256, seed=1)
    q = _quantize(fmt, w)
    full = q.dequantize()
    parts = [partition.rows(q, 0, 32), partition.rows(q, 32, 64), partition.rows(q, 64, 96)]
    for i, p in enumerate(parts):
        assert torch.equal(p.dequantize(), full[32 * i:32 * (i + 1)])
    stacked = partition.stack_rows(parts)
    assert stacked is not None and stacked.format == fmt
    assert torch.equal(stacked.dequantize(), full)
    x = torch.randn(3, 256)
    torch.testing.assert_close(stacked.linear(x), q.linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stack_of_different_layers(fmt):
    # q, k, v of different row counts, each quantized on its own
    qs = [_quantize(fmt, llm_like_weight(n, 256, seed=n)) for n in (64, 32, 32)]
    stacked = partition.stack_rows(qs, "qkv_proj")
    assert stacked is not None
    assert torch.equal(stacked.dequantize(), torch.cat([q.dequantize() for q in qs]))


@pytest.mark.parametrize("fmt", ["nf4", "ternary", "lort", "int8"])
def test_columns_are_exact(fmt):
    w = llm_like_weight(32, 512, seed=2)
    q = _quantize(fmt, w)
    full = q.dequantize()
    halves = [partition.columns(q, 0, 256), partition.columns(q, 256, 512)]
    for i, h in enumerate(halves):
        assert torch.equal(h.dequantize(), full[:, 256 * i:256 * (i + 1)])
    # a row-parallel layer: the partial products add up to the whole
    x = torch.randn(2, 512)
    y = halves[0].linear(x[:, :256]) + halves[1].linear(x[:, 256:])
    torch.testing.assert_close(y, q.linear(x), rtol=1e-4, atol=1e-5)


def test_refused_cuts_name_the_layer():
    w = llm_like_weight(32, 576, seed=3)
    with pytest.raises(MemboostError, match=r"o_proj: a mixed weight .* 4-bit groups"):
        partition.columns(_quantize("mixed", w), 0, 288, "o_proj")
    with pytest.raises(MemboostError, match=r"down_proj: .*multiples of 128"):
        partition.columns(_quantize("ternary", w), 0, 288, "down_proj")
    with pytest.raises(MemboostError, match=r"block_size 64"):
        partition.columns(_quantize("nf4", w), 0, 288, "o_proj")
    with pytest.raises(MemboostError, match=r"multiples of its blocks of 32"):
        partition.columns(_quantize("int8", w), 0, 48)
    # ternary groups: a cut inside a group of 256 is refused
    with pytest.raises(MemboostError, match=r"group_size 256"):
        partition.columns(_quantize("ternary", llm_like_weight(8, 512), group_size=256), 0, 128)
    # nf4 blocks of 64 across rows of 96: row 1 starts mid-block
    with pytest.raises(MemboostError, match=r"block edge"):
        partition.rows(_quantize("nf4", llm_like_weight(4, 96)), 1, 3)


def test_per_tensor_scales_and_mixed_counts():
    # a per-tensor ternary scale is written out per row when stacked with per-row parts
    a = _quantize("ternary", llm_like_weight(16, 256, seed=4), per_row=False)
    b = _quantize("ternary", llm_like_weight(16, 256, seed=5))
    stacked = partition.stack_rows([a, b])
    assert torch.equal(stacked.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    # mixed parts with different 4-bit group counts cannot be one weight: None (run apart)
    c = _quantize("mixed", llm_like_weight(16, 256, seed=6), ratio_4bit=0.5)
    d = _quantize("mixed", llm_like_weight(16, 256, seed=7), ratio_4bit=0.25)
    assert partition.stack_rows([c, d]) is None
    with pytest.raises(MemboostError, match="one format"):
        partition.stack_rows([a, c], "qkv_proj")


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_rows_pad(fmt):
    q = _quantize(fmt, llm_like_weight(64, 256, seed=8))
    padded = partition.stack_rows([q, partition.zero_rows(q, 32)])
    x = torch.randn(2, 256)
    y = padded.linear(x) if padded is not None else None
    assert y is not None and y.shape == (2, 96)
    assert torch.equal(y[:, 64:], torch.zeros(2, 32))
    torch.testing.assert_close(y[:, :64], q.linear(x), rtol=1e-5, atol=1e-5)
