"""memboost.calibrate and memboost.quantize_linears_ on small models."""

import pytest
import torch
from torch import nn

import memboost
from memboost.nn import Int8Linear, MixedLinear

from conftest import llm_like_weight, rel_err, tiny_llama


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
    assert isinstance(model.lm_head, Int8Linear)  # the output layer: int8 by default, whatever `skip` says
    assert rel_err(model(x), ref) < 0.45  # two layers at about 3 bits
    kept = _model(device)
    memboost.quantize_linears_(kept, ratio_4bit=0.5, outlier_fraction=0.01, lm_head=None)
    assert isinstance(kept.mlp[2], MixedLinear) and type(kept.lm_head) is nn.Linear

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
    assert [type(m) for m in (fresh.mlp[0], fresh.mlp[2], fresh.lm_head)] == [MixedLinear, MixedLinear, Int8Linear]
    x = _inputs(device, batches=1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


def test_load_quantized_refuses_a_weight_of_another_shape(device):
    state = memboost.quantize_linears_(_model(device), ratio_4bit=0.3).state_dict()
    other = Block().to(device)
    other.mlp[2] = nn.Linear(256, 96).to(device)
    with pytest.raises(ValueError, match=r"of shape \(128, 256\) for 'mlp.2', a linear layer of weight shape \(96, 256\)"):
        memboost.load_quantized_(other, state)
    assert type(other.mlp[0]) is nn.Linear  # nothing replaced: the model is as it was


def test_quantize_model_reports_replaced_and_skipped_layers(device):
    model = _model(device)
    report = memboost.quantize_model(model, "mixed", group_size=256, ratio_4bit=0.0, progress=False)
    # mlp.0 has 128 input features: group_size 256 does not fit it
    assert [r.name for r in report.replaced] == ["mlp.2"]
    assert dict(report.skipped) == {"mlp.0": "group_size 256 does not divide in_features 128"}
    # the output layer is int8 by default, reported apart from the method's layers
    assert report.output_layer.name == "lm_head" and report.output_layer.shape == (64, 128)
    assert report.output_layer.bytes_after == model.lm_head.weight.tensor().nbytes
    r = report.replaced[0]
    assert r.shape == (128, 256) and r.bytes_before == 128 * 256 * 4
    assert r.bytes_after == model.mlp[2].weight.tensor().nbytes and r.details["ratio_4bit"] == 0.0
    assert abs(report.bits_per_weight - model.mlp[2].weight.tensor().avg_bits) < 1e-9
    text = str(report)
    assert "1 layers replaced, 1 skipped" in text and "| mlp.0 | skipped: group_size 256" in text
    assert "output layer lm_head int8" in text and "| lm_head | 64x128 | 8.5" in text
    plain = memboost.quantize_model(_model(device), "mixed", group_size=256, ratio_4bit=0.0, lm_head=None,
                                    progress=False)
    assert dict(plain.skipped)["lm_head"] == "name matches skip 'lm_head'" and plain.output_layer is None


def test_quantize_model_refuses_parameters_that_fit_no_layer():
    model = _model("cpu")
    with pytest.raises(memboost.MemboostError, match="fits none of the 2 layers .*group_size 48 does not divide "
                                                     ".*group sizes that fit every layer: 16, 32, 64, 128$"):
        memboost.quantize_model(model, "mixed", group_size=48)
    assert type(model.mlp[0]) is nn.Linear and type(model.mlp[2]) is nn.Linear
    # every layer skipped by name is not a parameter problem: a warning, the model unchanged
    with pytest.warns(UserWarning, match="replaced no layer .*name matches skip"):
        report = memboost.quantize_model(model, "mixed", skip=("mlp", "lm_head"), lm_head=None)
    assert not report.replaced and type(model.mlp[0]) is nn.Linear


def test_quantize_model_refuses_arguments_its_method_does_not_take():
    model = _model("cpu")
    with pytest.raises(memboost.MemboostError, match="method 'mixed' takes no parameter 'foo'; its parameters are "
                                                     "ratio_4bit, group_size, .*act_bits, compute_dtype"):
        memboost.quantize_model(model, "mixed", foo=1)
    with pytest.raises(memboost.MemboostError, match="method 'nf4' takes no parameter 'ratio_4bit'"):
        memboost.quantize_model(model, "nf4", ratio_4bit=0.5)
    stats = memboost.calibrate(model, _inputs("cpu"))
    with pytest.raises(memboost.MemboostError, match="method 'nf4' does not use calibration statistics "
                                                     "\\(only lort and mixed do\\)"):
        memboost.quantize_model(model, "nf4", calibration=stats)
    assert type(model.mlp[0]) is nn.Linear and type(model.mlp[2]) is nn.Linear


def test_report_warns_about_settings_that_damage_the_model():
    report = memboost.quantize_model(_model("cpu"), "mixed", ratio_4bit=0.1, progress=False)
    assert len(report.warnings) == 1 and "and no calibration usually damages a model" in report.warnings[0]
    assert "warning: mixed with 0% of the groups in 4 bits" in report.summary() and "raise ratio_4bit" in report.summary()
    # calibrated, the same bits are still below the calibrated threshold; 4-bit groups everywhere are not
    model = _model("cpu")
    report = memboost.quantize_model(model, "mixed", ratio_4bit=0.1, calibration=memboost.calibrate(model, _inputs("cpu")))
    assert len(report.warnings) == 1 and "no calibration" not in report.warnings[0]
    assert not memboost.quantize_model(_model("cpu"), "mixed", ratio_4bit=1.0, group_size=32).warnings
    assert not memboost.quantize_model(_model("cpu"), "nf4").warnings
    for method, params in (("ternary", {}), ("lort", {"rank": 4, "iters": 1})):
        report = memboost.quantize_model(_model("cpu"), method, **params)
        assert len(report.warnings) == 1 and "unless it is trained afterwards" in report.warnings[0]
        assert report.summary().splitlines()[1].startswith(f"warning: {method} weights")


def test_quantize_model_error_leaves_the_model_unchanged():
    model = _model("cpu")
    with torch.no_grad():
        model.mlp[2].weight[0, 0] = float("nan")
    with pytest.raises(memboost.MemboostError, match="^mlp.2: 'w' contains NaN"):
        memboost.quantize_model(model, "mixed")
    assert type(model.mlp[0]) is nn.Linear and type(model.mlp[2]) is nn.Linear
    with pytest.raises(memboost.MemboostError, match="unknown method 'zzz'"):
        memboost.quantize_model(model, "zzz")


def test_quantize_model_takes_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 128)  # weight [in=128, out=96]
    model = nn.Sequential(conv)
    x = torch.randn(5, 128)
    want = model(x)
    report = memboost.quantize_model(model, "mixed", ratio_4bit=1.0)
    assert isinstance(model[0], MixedLinear) and report.replaced[0].shape == (96, 128)
    assert rel_err(model(x), want) < 0.15


def test_calibrate_refuses_a_single_tensor():
    with pytest.raises(memboost.MemboostTypeError, match="'batches' must be an iterable of batches .*wrap it in a list"):
        memboost.calibrate(_model("cpu"), _inputs("cpu")[0])
    with pytest.raises(memboost.MemboostTypeError, match="batch 0 of 'batches' must be a tensor"):
        memboost.calibrate(_model("cpu"), [[1, 2, 3]])


def test_tied_model_saves_and_reloads_as_written_in_the_readme(tmp_path):
    # A tiny Llama with tied embeddings, like SmolLM2: the README's save/load runs as written.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    memboost.quantize_model(model, "mixed", ratio_4bit=0.25)
    path = str(tmp_path / "model.safetensors")
    memboost.save_safetensors(model.state_dict(), path)
    fresh = LlamaForCausalLM(config).eval()
    missing, unexpected = memboost.load_quantized_(fresh, memboost.load_safetensors(path))
    assert missing == [] and unexpected == []
    # the output layer is int8 (quantize_model's default); the embedding stays float, untied
    assert isinstance(fresh.lm_head, Int8Linear) and isinstance(fresh.model.embed_tokens.weight, nn.Parameter)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # a model built from the original (tied) config is untied on load, not tied back to the float embedding
    tied_config = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    again = LlamaForCausalLM(tied_config).eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert memboost.load_quantized_(again, memboost.load_safetensors(path)) == ([], [])
    assert isinstance(again.lm_head, Int8Linear) and again.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    plain = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})).eval()
    memboost.quantize_model(plain, "mixed", ratio_4bit=0.25, lm_head=None)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # opting out keeps the tie


def test_calibrate_with_hessian_gives_second_moments_and_quantize_model_uses_them():
    model = _model("cpu")
    batches = _inputs("cpu")
    stats = memboost.calibrate(model, batches, hessian=True)
    x = torch.cat([b.reshape(-1, 128) for b in batches])
    torch.testing.assert_close(stats["mlp.0"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    assert stats["mlp.2"].shape == (256, 256)
    held_out = _inputs("cpu", batches=1, seed=7)[0]
    ref = model(held_out)
    report = memboost.quantize_model(model, "mixed", ratio_4bit=0.25, group_size=32, calibration=stats,
                                     progress=False)
    assert len(report.replaced) == 2 and report.replaced[0].details["ratio_4bit"] == 0.25
    assert rel_err(model(held_out), ref) < 0.4


def _tiny_llama():
    return tiny_llama()


def test_stages_follow_the_forward_pass_and_group_shared_inputs():
    pytest.importorskip("transformers")
    from memboost.model.quantize import _stages

    model = _tiny_llama()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    stages = _stages(model, torch.randint(0, 64, (1, 8)), layers)
    want = []
    for i in range(2):
        p = f"model.layers.{i}."
        want += [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], [p + "self_attn.o_proj"],
                 [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "mlp.down_proj"]]
    assert stages == want


@pytest.mark.parametrize("hessian", [False, True])
def test_sequential_quantization_measures_each_stage_after_the_earlier_ones(hessian):
    """The first stage sees the float model's inputs (the same statistics as
    calibrate()); later stages see what the quantized earlier stages produce."""
    pytest.importorskip("transformers")
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plain, seq = _tiny_llama(), _tiny_llama()
    stats = memboost.calibrate(plain, batches, hessian=hessian)
    memboost.quantize_model(plain, "mixed", calibration=stats, ratio_4bit=0.25, progress=False)
    report = memboost.quantize_model(seq, "mixed", calibration_batches=batches, hessian=hessian, ratio_4bit=0.25,
                                     progress=False)
    assert len(report.replaced) == 14 and seq.memboost_quantization[-1]["calibrated"]

    def codes(model, name):
        return model.get_submodule(name).weight.tensor().tensors["lowbits"]

    assert torch.equal(codes(seq, "model.layers.0.self_attn.q_proj"), codes(plain, "model.layers.0.self_attn.q_proj"))
    assert not torch.equal(codes(seq, "model.layers.1.mlp.down_proj"), codes(plain, "model.layers.1.mlp.down_proj"))
    with torch.no_grad():
        assert torch.isfinite(seq(batches[0]).logits).all()


@pytest.mark.parametrize("hessian", [False, True])
def test_sequential_quantization_by_blocks_equals_running_the_whole_model(monkeypatch, hessian):
    """Running each decoder block alone on its captured inputs measures what
    the whole model's forward passes measure (and quantizes the same)."""
    pytest.importorskip("transformers")
    from memboost.model import quantize as model_mod

    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    by_blocks, whole = _tiny_llama(), _tiny_llama()
    found = model_mod._decoder_blocks(by_blocks, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"])
    assert found is not None and found[1] == "model.layers."
    seen = []
    real = model_mod._input_moments
    monkeypatch.setattr(model_mod, "_input_moments", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    memboost.quantize_model(by_blocks, "mixed", calibration_batches=batches, hessian=hessian, ratio_4bit=0.25,
                            progress=False)
    blocks_stats, seen[:] = list(seen), []
    monkeypatch.setattr(model_mod, "_decoder_blocks", lambda *a: None)
    memboost.quantize_model(whole, "mixed", calibration_batches=batches, hessian=hessian, ratio_4bit=0.25,
                            progress=False)
    assert len(seen) == len(blocks_stats) == 8
    for a, b in zip(blocks_stats, seen):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(by_blocks(batches[0]).logits, whole(batches[0]).logits, rtol=1e-3, atol=1e-3)


def test_decoder_blocks_are_found_only_when_every_layer_is_inside():
    from memboost.model.quantize import _decoder_blocks

    model = nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.Linear(4, 4))
    assert _decoder_blocks(model, ["0.0", "0.1"])[1] == "0."
    assert _decoder_blocks(model, ["0.0", "2"]) is None


def test_sequential_quantization_failure_puts_every_layer_back(monkeypatch):
    pytest.importorskip("transformers")
    model = _tiny_llama()
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls = []
    original = MixedLinear.from_linear.__func__

    def failing(cls, linear, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise memboost.MemboostError("planted failure")
        return original(cls, linear, **kw)

    monkeypatch.setattr(MixedLinear, "from_linear", classmethod(failing))
    with pytest.raises(memboost.MemboostError, match="planted failure"):
        memboost.quantize_model(model, "mixed", calibration_batches=[torch.randint(0, 64, (1, 8))], progress=False)
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} == before
    with pytest.raises(memboost.MemboostError, match="not both"):
        memboost.quantize_model(model, "mixed", calibration={}, calibration_batches=[torch.randint(0, 64, (1, 8))])
