"""transformers integration: AutoModelForCausalLM.from_pretrained reads memboost
checkpoints and quantizes while loading (quant_method "memboost"), on tiny
random Llama (tied embeddings), Qwen2 and GPT-2 models built from configs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import memboost
from memboost.io.checkpoint import quantization_config
from memboost.nn import QuantizedLinear

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
from transformers import AutoModelForCausalLM  # noqa: E402

from memboost.integrations.transformers import MemboostConfig, MemboostHfQuantizer  # noqa: E402

# Every format memboost can load through transformers: (method, quantizer params).
# A new format joins by adding a line here.
METHODS = [
    ("mixed", {"ratio_4bit": 0.5, "group_size": 32}),
    ("ternary", {"per_row": True}),
    ("nf4", {"block_size": 64}),
    ("lort", {"rank": 8, "iters": 2, "per_row_alpha": True}),
]
ARCHS = ["llama", "qwen2", "gpt2"]
VOCAB = 96


def tiny_model(arch: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":  # tied embeddings, like SmolLM2
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    if arch == "qwen2":
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def generate(model):
    return model.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)


def quantized_layers(model):
    return {name: m.weight.tensor().format for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_loads_through_from_pretrained(arch, method, params, tmp_path):
    model = tiny_model(arch)
    memboost.quantize_model(model, method, progress=False, **params)
    want, want_tokens = logits(model), generate(model)
    saved = tmp_path / "saved"
    memboost.save_quantized(model, saved, max_shard_size="20KB")  # shards and an index
    qconfig = json.load(open(saved / "config.json"))["quantization_config"]
    assert torch.equal(logits(memboost.load_quantized(saved)), want)

    hf = AutoModelForCausalLM.from_pretrained(saved)
    assert isinstance(hf.hf_quantizer, MemboostHfQuantizer) and hf.hf_quantizer.pre_quantized
    assert quantized_layers(hf) == quantized_layers(model) == qconfig["modules"]
    assert torch.equal(logits(hf), want)
    assert torch.equal(generate(hf), want_tokens)
    assert not any(t.device.type == "meta" for t in list(hf.parameters()) + list(hf.buffers()))
    assert isinstance(hf.config.quantization_config, MemboostConfig)
    assert hf.config.quantization_config.to_dict() == qconfig == quantization_config(hf)
    # the output layer is int8 (quantize_model's default), the tied embedding float and untied
    assert qconfig["modules"]["lm_head"] == "int8" and hf.config.tie_word_embeddings is False
    if arch == "llama":
        assert isinstance(hf.model.embed_tokens.weight, torch.nn.Parameter)

    # save_pretrained of the loaded model: read back by both loaders
    resaved = tmp_path / "resaved"
    hf.save_pretrained(resaved)
    assert json.load(open(resaved / "config.json"))["quantization_config"] == qconfig
    assert torch.equal(logits(memboost.load_quantized(resaved)), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(resaved)), want)


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_while_loading(arch, method, params, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path / "float")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    memboost.quantize_model(reference, method, progress=False, **params)

    config = MemboostConfig(method=method, params=params)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    assert isinstance(hf.hf_quantizer, MemboostHfQuantizer) and not hf.hf_quantizer.pre_quantized
    assert quantized_layers(hf) == quantized_layers(reference) and quantized_layers(hf)["lm_head"] == "int8"
    want = logits(reference)
    assert torch.equal(logits(hf), want)
    # the config now describes the quantized model, as save_quantized would write it
    assert hf.config.quantization_config.to_dict() == quantization_config(reference)

    hf.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(memboost.load_quantized(tmp_path / "saved")), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), want)


def test_skip_and_dtype_while_loading(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "float")
    method, params = METHODS[0]
    config = MemboostConfig(method=method, params=params, skip=["lm_head", "mlp"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config, dtype=torch.bfloat16)
    layers = quantized_layers(hf)
    assert layers and not any("mlp" in name for name in layers)
    assert type(hf.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert hf.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert logits(hf).dtype == torch.bfloat16


def test_dtype_of_a_loaded_checkpoint_leaves_the_quantized_weights(tmp_path):
    model = tiny_model("llama")
    method, params = METHODS[0]
    memboost.quantize_model(model, method, progress=False, **params)
    memboost.save_quantized(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, layer in hf.named_modules():
        if isinstance(layer, QuantizedLinear):  # float tensors inside the packed weight keep their dtype and bits
            saved = dict(model.named_modules())[name].weight.tensor().state_dict()
            for key, t in layer.weight.tensor().state_dict().items():
                assert t.dtype == saved[key].dtype and torch.equal(t, saved[key]), (name, key)
    out = logits(hf)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_base_model_loads_a_causal_lm_checkpoint(tmp_path):
    # layer names saved with the "model." prefix of LlamaForCausalLM, loaded into LlamaModel
    from transformers import AutoModel
    model = tiny_model("llama")
    method, params = METHODS[0]
    memboost.quantize_model(model, method, progress=False, **params)
    memboost.save_quantized(model, tmp_path / "m")
    base = AutoModel.from_pretrained(tmp_path / "m")
    # the int8 lm_head is the causal LM's, not the base model's: dropped with the head, as transformers drops it
    assert quantized_layers(base) == {k[len("model."):]: v for k, v in quantized_layers(model).items()
                                      if k.startswith("model.")}
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, model.model(IDS).last_hidden_state)


def test_config_round_trips_and_refuses_bad_input(tmp_path):
    model = tiny_model("gpt2")
    method, params = METHODS[0]
    memboost.quantize_model(model, method, progress=False, **params)
    saved = quantization_config(model)
    assert MemboostConfig.from_dict(saved).to_dict() == saved
    from transformers.quantizers.auto import AutoQuantizationConfig
    assert isinstance(AutoQuantizationConfig.from_dict(saved), MemboostConfig)
    assert MemboostConfig(method, params).to_dict() == {"quant_method": "memboost", "method": method,
                                                        "params": params, "skip": ["lm_head"]}

    with pytest.raises(memboost.MemboostError, match="quant_method 'gptq', not 'memboost'"):
        MemboostConfig.from_dict(dict(saved, quant_method="gptq"))
    with pytest.raises(memboost.MemboostError, match="format 'mixed' version 99 is not supported.*upgrade memboost"):
        MemboostConfig.from_dict(dict(saved, format_versions={"mixed": 99}))
    with pytest.raises(memboost.MemboostError, match="unknown method 'no-such-format'"):
        MemboostConfig(method="no-such-format")
    with pytest.raises(memboost.MemboostError, match=r"unknown key\(s\) \['ratio'\]"):
        MemboostConfig(method="mixed", ratio=0.5)
    with pytest.raises(memboost.MemboostTypeError, match="'params' must be a dict"):
        MemboostConfig(method="mixed", params=[0.5])
    with pytest.raises(memboost.MemboostTypeError, match=r"'params' \['calibration'\] must be numbers"):
        MemboostConfig(method="mixed", params={"calibration": torch.ones(64)})
    with pytest.raises(memboost.MemboostError, match="'modules' uses format\\(s\\) \\['other'\\]"):
        MemboostConfig.from_dict(dict(saved, modules={"transformer.h.0.attn.c_attn": "other"}))


def _saved(tmp_path, arch="llama"):
    model = tiny_model(arch)
    method, params = METHODS[0]
    memboost.quantize_model(model, method, progress=False, **params)
    directory = tmp_path / "m"
    memboost.save_quantized(model, directory)
    return directory


def _edit_config(directory, fn):
    path = directory / "config.json"
    config = json.load(open(path))
    fn(config)
    json.dump(config, open(path, "w"))


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    directory = _saved(tmp_path)
    _edit_config(directory, lambda c: c["quantization_config"].update(format_versions={"mixed": 99}))
    with pytest.raises(memboost.MemboostError, match="format 'mixed' version 99 is not supported.*upgrade memboost"):
        AutoModelForCausalLM.from_pretrained(directory)

    directory = _saved(tmp_path)  # tensor shapes that disagree with the config
    _edit_config(directory, lambda c: c.update(intermediate_size=96))
    with pytest.raises(memboost.MemboostError, match=r"layer 'model.layers.0.mlp.down_proj' holds a mixed weight of "
                                                     r"shape \[64, 128\], but the model built from config.json has a "
                                                     r"mixed layer of shape \[64, 96\]"):
        AutoModelForCausalLM.from_pretrained(directory)

    directory = _saved(tmp_path)  # config lists a layer the checkpoint does not quantize
    _edit_config(directory, lambda c: c["quantization_config"]["modules"].pop("model.layers.1.mlp.up_proj"))
    with pytest.raises(memboost.MemboostError, match="'model.layers.1.mlp.up_proj', which quantization_config's "
                                                     "'modules' does not list"):
        AutoModelForCausalLM.from_pretrained(directory)
    directory = _saved(tmp_path)
    _edit_config(directory, lambda c: c["quantization_config"]["modules"].update({"model.layers.0.nope": "mixed"}))
    with pytest.raises(memboost.MemboostError, match="names layer 'model.layers.0.nope'"):
        AutoModelForCausalLM.from_pretrained(directory)

    directory = _saved(tmp_path)  # a weight written by a newer memboost, under an older config
    from memboost.io.checkpoint import load_state
    from memboost.formats.tensor import decode_json, encode_json
    state = load_state(directory)
    key = "model.layers.0.self_attn.q_proj.weight.format_info"
    state[key] = encode_json(dict(decode_json(state[key], key), version=99))
    memboost.save_safetensors(state, directory / "model.safetensors")
    with pytest.raises(memboost.MemboostError, match="layer 'model.layers.0.self_attn.q_proj' holds format 'mixed' "
                                                     "version 99.*upgrade memboost"):
        AutoModelForCausalLM.from_pretrained(directory)

    state[key] = encode_json(dict(decode_json(state[key], key), version=2))  # contents that do not validate
    state["model.layers.1.mlp.gate_proj.weight.plane2"] = state["model.layers.1.mlp.gate_proj.weight.plane2"][:, :2]
    memboost.save_safetensors(state, directory / "model.safetensors")
    with pytest.raises(memboost.MemboostError, match="invalid quantized weight in the checkpoint: "
                                                     "model.layers.1.mlp.gate_proj: .*plane2"):
        AutoModelForCausalLM.from_pretrained(directory)

    # a quantized checkpoint with another method's config object: transformers refuses the mix
    directory = _saved(tmp_path)
    from transformers import BitNetQuantConfig
    with pytest.raises(ValueError, match="quantized with MemboostConfig but you are passing a BitNetQuantConfig"):
        AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitNetQuantConfig())
    # a describing config cannot quantize a float model
    float_dir = tmp_path / "float"
    tiny_model("llama").save_pretrained(float_dir)
    described = MemboostConfig.from_dict(json.load(open(directory / "config.json"))["quantization_config"])
    with pytest.raises(memboost.MemboostError, match="already quantized model"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=described)


REGISTRATION = """
import sys
import memboost
imported = "transformers" in sys.modules
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from memboost.integrations.transformers import MemboostConfig, MemboostHfQuantizer
print(imported, AUTO_QUANTIZATION_CONFIG_MAPPING["memboost"] is MemboostConfig,
      AUTO_QUANTIZER_MAPPING["memboost"] is MemboostHfQuantizer)
"""


def test_import_memboost_registers_when_transformers_loads():
    # a fresh process: import memboost does not import transformers, the
    # import hook registers as soon as transformers loads its quantizers
    out = subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"], out.stderr


def test_registration_when_transformers_is_already_loaded(monkeypatch):
    import memboost.integrations
    import memboost.integrations.transformers as integration
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "memboost")
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "memboost")
    monkeypatch.setattr(integration, "_REGISTERED", False)
    memboost.integrations.watch_transformers()  # what import memboost runs
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["memboost"] is MemboostConfig
    assert AUTO_QUANTIZER_MAPPING["memboost"] is MemboostHfQuantizer
    memboost.integrations.watch_transformers()  # idempotent

    class Other(MemboostConfig):
        pass

    monkeypatch.setattr(integration, "_REGISTERED", False)
    monkeypatch.setitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "memboost", Other)
    with pytest.raises(memboost.MemboostError, match="already has a 'memboost' quantization registered"):
        integration.register()


def test_a_config_edited_to_another_format_is_refused_by_both_loaders(tmp_path):
    """load_quantized and from_pretrained read the same folder the same way:
    a config whose 'modules' no longer describe the weights is refused by name."""
    def to_nf4(config):
        q = config["quantization_config"]
        q.update(method="nf4", format_versions={"nf4": memboost.nf4.NF4QuantizedTensor.version},
                 modules={name: "nf4" for name in q["modules"]})
    directory = _saved(tmp_path)
    _edit_config(directory, to_nf4)
    for load in (memboost.load_quantized, AutoModelForCausalLM.from_pretrained):
        # (the int8 lm_head, quantize_model's default, may be the first layer named)
        with pytest.raises(memboost.MemboostError, match=r"layer '(model\.layers\.\d\.[a-z_.]+' holds a mixed|"
                                                         r"lm_head' holds a int8) weight.*: the weights do not fit "
                                                         r"the config"):
            load(directory)
    directory = _saved(tmp_path)   # a layer dropped from 'modules'
    _edit_config(directory, lambda c: c["quantization_config"]["modules"].pop("model.layers.1.mlp.up_proj"))
    for load in (memboost.load_quantized, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(memboost.MemboostError, match="'model.layers.1.mlp.up_proj', which quantization_config's "
                                                         "'modules' does not list"):
            load(directory)
