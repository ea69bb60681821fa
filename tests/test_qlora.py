"""QLoRA: the layer, prepare/merge/unmerge, PEFT-format adapters checked
against peft from PyPI, the example's short run, and bad adapter files."""

import copy
import json
import logging
import os
import sys

import pytest
import torch

import memboost
import memboost.train.qlora as qlora
from memboost.nn import NF4Linear, QLoRALinear

from conftest import rel_err

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import peft  # noqa: E402  (the 'test' extra installs it: missing, the tests fail rather than skip)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import qlora_smollm2  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny():
    return qlora_smollm2.tiny_llama().eval()


def _randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora.qlora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)


def test_layer_starts_at_base_and_trains_only_adapters():
    lin = torch.nn.Linear(128, 64)
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16, dropout=0.0)
    x = torch.randn(2, 5, 128, requires_grad=True)
    assert torch.equal(layer(x), layer.base_layer(x))
    _randomize_b(torch.nn.Sequential(layer))
    layer(x).square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert x.grad is not None and not any(p.requires_grad for p in layer.base_layer.parameters())
    # the input gradient: through the dequantized base plus the adapter
    w = layer.base_layer.weight.dequantize() + layer.delta_weight()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, lin.bias).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-4


def test_backward_keeps_no_dequantized_weight():
    layer = QLoRALinear.from_linear(torch.nn.Linear(256, 512), r=4, dropout=0.0)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(torch.randn(3, 256, requires_grad=True))
    assert max(saved) < 256 * 512, saved  # the biggest saved tensor is not a weight-sized float matrix
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype(dtype):
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, compute_dtype=dtype, dropout=0.0)
    _randomize_b(torch.nn.Sequential(layer))
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    want = torch.nn.functional.linear(x, layer.base_layer.weight.dequantize() + layer.delta_weight(),
                                      layer.base_layer.bias)
    assert rel_err(y, want) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert layer(x.to(dtype)).dtype == dtype


def test_prepare_count_merge_unmerge():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        y_float = model(ids).logits
    qlora.prepare_model(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    with torch.no_grad():
        quantization_error = rel_err(model(ids).logits, y_float)  # B = 0: the NF4 base alone
    layers = qlora.qlora_layers(model)
    assert len(layers) == 2 * 7
    assert qlora.num_trainable_parameters(model) == sum(4 * (l.in_features + l.out_features) for l in layers.values())
    assert all(isinstance(l.base_layer, NF4Linear) for l in layers.values())
    assert not model.model.embed_tokens.weight.requires_grad
    _randomize_b(model)
    with torch.no_grad():
        y = model(ids).logits
        qlora.merge_adapters(model)
        y_merged = model(ids).logits
        # merging requantizes base + B @ A: an error like the first quantization's
        assert 0 < rel_err(y_merged, y) < 1.5 * quantization_error
        qlora.unmerge_adapters(model)
        assert torch.equal(model(ids).logits, y)  # the original NF4 weights are restored


def test_prepare_model_twice_is_refused_and_changes_nothing():
    model = _tiny()
    qlora.prepare_model(model, r=4, alpha=8, dropout=0.0)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(memboost.MemboostError, match=r"'model' already has 14 QLoRA layers \(e.g. "
                                                     r"'model.layers.0.self_attn.q_proj'\): prepare_model was called"):
        qlora.prepare_model(model, r=4, alpha=8, dropout=0.0)
    assert {name: type(m) for name, m in model.named_modules()} == before
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_peft_reads_our_adapter_and_we_read_peft(tmp_path):
    base = _tiny()
    ours = qlora.prepare_model(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, target_modules=TARGETS).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(ids).logits
        nf4_error = rel_err(ours(ids).logits, plain)  # B = 0: the NF4 base alone
    _randomize_b(ours, seed=3)
    qlora.save_adapter(ours, str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        y_peft, y_ours = theirs(ids).logits, ours(ids).logits
    # PEFT on the float base with our adapter = ours within the NF4 error,
    # and nearer to ours than the base without the adapter
    assert rel_err(y_ours, y_peft) < 1.5 * nf4_error
    assert rel_err(y_ours, y_peft) < 0.8 * rel_err(y_ours, plain)

    # an adapter PEFT wrote, loaded into ours
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    written = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in written.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    written.save_pretrained(str(tmp_path / "peft"))
    qlora.load_adapter(ours, str(tmp_path / "peft"))
    with torch.no_grad():
        y_written, y_loaded = written.eval()(ids).logits, ours(ids).logits
    assert rel_err(y_loaded, y_written) < 1.5 * nf4_error
    assert rel_err(y_loaded, y_written) < 0.8 * rel_err(y_loaded, plain)


def test_bad_adapter_files_change_nothing(tmp_path):
    model = qlora.prepare_model(_tiny(), r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    _randomize_b(model)
    qlora.save_adapter(model, str(tmp_path / "good"))
    other = qlora.prepare_model(_tiny(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    qlora.save_adapter(other, str(tmp_path / "qonly"))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="has no adapter for the model's QLoRA layers"):
        qlora.load_adapter(model, str(tmp_path / "qonly"))
    bigger = qlora.prepare_model(_tiny(), r=8, alpha=8, dropout=0.0, target_modules=TARGETS)
    qlora.save_adapter(bigger, str(tmp_path / "r8"))
    cfg = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    (tmp_path / "r8" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(8, \d+\), expected \(4, \d+\)"):
        qlora.load_adapter(model, str(tmp_path / "r8"))
    small = qlora.prepare_model(_tiny(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not a QLoRA layer of this model"):
        qlora.load_adapter(small, str(tmp_path / "good"))
    (tmp_path / "good" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(ValueError, match="not valid JSON"):
        qlora.load_adapter(model, str(tmp_path / "good"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_example_short_run(tmp_path):
    # Layers this small run fastest on one thread (no OpenMP hand-offs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = qlora_smollm2.run(steps=25, batch=8, seq=32, lr=3e-3, r=4, alpha=8, out=str(tmp_path / "a"),
                                   tiny=True, text_chars=60_000, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result["changed_frozen"] == []
    assert result["adapters_moved"]
    assert result["loss_after"] < result["loss_before"] - 0.1
