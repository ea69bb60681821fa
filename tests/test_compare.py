"""memboost compare: the peers' bits are what they store, the peers are applied as
their own dequantized weights, the table and the plot are written."""

import struct

import pytest
import torch
from torch import nn

from memboost import cli, compare


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(256, 128, bias=False), nn.Linear(128, 256, bias=False)])
        self.lm_head = nn.Linear(256, 64, bias=False)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_bits_are_what_bitsandbytes_stores(double_quant):
    import bitsandbytes.functional as F

    model = TwoLayers()
    w = model.layers[0].weight.detach().clone()
    bits = compare.bnb_nf4(model, double_quant)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    stored = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the fp32 offset
    assert abs(bits - 8 * stored / w.numel()) < 0.01
    # applied as bitsandbytes' own dequantized weight; the head is left alone
    want = F.dequantize_4bit(q, state, quant_type="nf4")
    assert torch.equal(model.layers[0].weight.detach(), want)
    assert torch.equal(model.lm_head.weight, TwoLayers().lm_head.weight)


@pytest.mark.parametrize("axis", [0, 1])
def test_hqq_bits_and_weights(axis):
    from hqq.core.quantize import Quantizer

    model = TwoLayers()
    w = model.layers[1].weight.detach().clone()
    bits = compare.hqq(model, 3, axis)
    wq, meta = Quantizer.quantize(w, nbits=3, group_size=64, axis=axis, device="cpu", compute_dtype=torch.float32)
    groups = meta["scale"].numel()
    assert groups == w.numel() // 64 and meta["zero"].numel() == groups
    assert bits == 3 + 2 * 16 * groups / w.numel()  # fp16 scale and zero per group of 64
    err = (model.layers[1].weight.detach() - w).norm() / w.norm()
    assert 0.05 < float(err) < 0.4  # 3-bit quantization error: applied, and not garbage


def test_table_and_plot(tmp_path):
    result = {"tokens": 64, "window": 32, "rows": [
        {"method": "float32", "family": "float32", "bits": 32.0, "quantize_s": 0.0, "ppl_fortunes": 30.0,
         "ppl_gpl3": 28.0},
        {"method": "m", "family": "memboost mixed", "bits": 2.8, "quantize_s": 1.0, "ppl_fortunes": 90.0,
         "ppl_gpl3": float("nan")}]}
    text = compare.table(result)
    assert "| m | 2.800 | 90.0 | nan | 1.0 |" in text
    path = tmp_path / "plot.png"
    compare.plot(result, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 600


def test_every_family_is_in_the_plan():
    families = {m["family"] for m in compare.methods(quick=False)}
    assert {"float32", "memboost mixed", "memboost mixed (calibrated)", "memboost NF4", "memboost ternary",
            "memboost LoRT", "bitsandbytes NF4", "HQQ", "llama.cpp"} <= families
    assert "compare" in cli.build_parser().format_help()
