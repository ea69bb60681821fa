"""memboost.calibrate and memboost.quantize_linears_ on small models."""

import pytest
import torch
from torch import nn

import memboost
from memboost.nn import MixedLinear

from conftest import llm_like_weight, rel_err


class Block(nn.Module):
    """Keyword inputs, a nested linear and an 'lm_head', like a transformers model."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
        self.lm_head = nn.Linear(128, 64)

    def forward(self, input_embeds):
        return self.lm_head(self.mlp(input_embeds))


def _model(device):
    torch.manual_seed(0)
    model = Block().to(device)
    with torch.no_grad():
        for m in (model.mlp[0], model.mlp[2]):
            m.weight.copy_(llm_like_weight(*m.weight.shape, seed=m.in_features))
    return model


def _inputs(device, batches=3, seed=1):
    """Activations whose first 16 channels are 20x the rest: the channel
    imbalance of real LLM activations that calibration is for."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(128)
    scale[:16] = 20.0
    return [(torch.randn(4, 8, 128, generator=g) * scale).to(device) for _ in range(batches)]


def test_calibrate_is_the_mean_square_input_per_channel(device):
    model = _model(device)
    batches = _inputs(device)
    stats = memboost.calibrate(model, ({"input_embeds": x} for x in batches))
    assert set(stats) == {"mlp.0", "mlp.2"}  # lm_head skipped by default
    x = torch.cat([b.reshape(-1, 128) for b in batches])
    torch.testing.assert_close(stats["mlp.0"], x.square().mean(0), rtol=1e-5, atol=0)
    hidden = torch.relu(model.mlp[0](x))
    torch.testing.assert_close(stats["mlp.2"], hidden.square().mean(0), rtol=1e-4, atol=1e-6)
    assert stats["mlp.0"].dtype == torch.float32 and stats["mlp.0"].device.type == device
    # the hooks are gone afterwards
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert set(memboost.calibrate(model, batches, skip=())) == {"mlp.0", "mlp.2", "lm_head"}


def test_calibrate_rejects_no_data():
    with pytest.raises(ValueError, match="'batches' ran no input"):
        memboost.calibrate(_model("cpu"), [])


def test_quantize_linears_replaces_eligible_layers(device):
    model = _model(device)
    x = _inputs(device, batches=1)[0]
    ref = model(x)
    out = memboost.quantize_linears_(model, ratio_4bit=0.5, outlier_fraction=0.01)
    assert out is model
    assert isinstance(model.mlp[0], MixedLinear) and isinstance(model.mlp[2], MixedLinear)
    assert type(model.lm_head) is nn.Linear
    assert rel_err(model(x), ref) < 0.45  # two layers at about 3 bits

    model = _model(device)
    memboost.quantize_linears_(model, filter_fn=lambda name, m: m.out_features == 128)
    assert type(model.mlp[0]) is nn.Linear and isinstance(model.mlp[2], MixedLinear)
    model = _model(device)
    memboost.quantize_linears_(model, group_size=256)  # only mlp.2 has in_features divisible by 256
    assert type(model.mlp[0]) is nn.Linear and isinstance(model.mlp[2], MixedLinear)


def test_calibration_lowers_model_output_error(device):
    batches = _inputs(device, batches=4)
    held_out = _inputs(device, batches=1, seed=7)[0]
    errors = {}
    for calibrated in (False, True):
        model = _model(device)
        ref = model(held_out)
        stats = memboost.calibrate(model, batches) if calibrated else None
        memboost.quantize_linears_(model, ratio_4bit=0.25, group_size=32, outlier_fraction=0.01,
                                   calibration=stats)
        errors[calibrated] = rel_err(model(held_out), ref)
    assert errors[True] < 0.8 * errors[False]


def test_quantize_linears_needs_statistics_for_every_layer():
    model = _model("cpu")
    stats = memboost.calibrate(model, _inputs("cpu"))
    del stats["mlp.2"]
    with pytest.raises(ValueError, match=r"'calibration' has no statistics for 1 layer.*mlp\.2"):
        memboost.quantize_linears_(model, calibration=stats)
    assert type(model.mlp[0]) is nn.Linear  # nothing was replaced


def test_load_quantized_restores_a_quantized_model_into_a_fresh_one(device, tmp_path):
    quantized = memboost.quantize_linears_(_model(device), ratio_4bit=0.3, outlier_fraction=0.01)
    path = tmp_path / "model.safetensors"
    memboost.save_safetensors(quantized.state_dict(), path)

    torch.manual_seed(123)  # a fresh model: different random float weights
    fresh = Block().to(device)
    missing, unexpected = memboost.load_quantized_(fresh, memboost.load_safetensors(path, device=device))
    assert missing == [] and unexpected == []
    assert [type(m) for m in (fresh.mlp[0], fresh.mlp[2], fresh.lm_head)] == [MixedLinear, MixedLinear, nn.Linear]
    x = _inputs(device, batches=1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


def test_load_quantized_refuses_a_weight_of_another_shape(device):
    state = memboost.quantize_linears_(_model(device), ratio_4bit=0.3).state_dict()
    other = Block().to(device)
    other.mlp[2] = nn.Linear(256, 96).to(device)
    with pytest.raises(ValueError, match=r"of shape \(128, 256\) for 'mlp.2', an nn.Linear of weight shape \(96, 256\)"):
        memboost.load_quantized_(other, state)
    assert type(other.mlp[0]) is nn.Linear  # nothing replaced: the model is as it was
