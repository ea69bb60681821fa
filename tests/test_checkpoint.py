"""save_quantized / load_quantized on tiny Hugging Face models built from configs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import memboost
from memboost.nn import MixedLinear

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def tiny_model(arch: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":  # tied embeddings, like SmolLM2
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    if arch == "qwen2":
        config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


# Every format: (method, quantizer parameters). A new format joins here.
FORMATS = [("mixed", {"ratio_4bit": 0.25}), ("ternary", {"group_size": 128}), ("nf4", {"block_size": 64}),
           ("lort", {"rank": 0.25, "iters": 2})]


@pytest.mark.parametrize("method,params", FORMATS, ids=[m for m, _ in FORMATS])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_save_and_reload_give_the_same_logits(arch, method, params, tmp_path):
    model = tiny_model(arch)
    report = memboost.quantize_model(model, method, progress=False, **params)
    layer_cls = memboost.nn.QuantizedLinear.for_format(method)
    assert report.replaced and all(isinstance(m, layer_cls) for m in
                                   (dict(model.named_modules())[r.name] for r in report.replaced))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    directory = tmp_path / "saved"
    # a small shard size forces several shards and an index
    memboost.save_quantized(model, directory, max_shard_size="20KB")
    files = sorted(os.listdir(directory))
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    qconfig = json.load(open(directory / "config.json"))["quantization_config"]
    # the output layer is int8 (quantize_model's default), so two formats are listed
    assert qconfig["quant_method"] == "memboost" and qconfig["method"] == sorted({method, "int8"})
    assert qconfig["modules"]["lm_head"] == "int8" and qconfig["quantize_calls"][0]["lm_head"] == "int8"
    assert set(qconfig["format_versions"]) == {method, "int8"} and qconfig["quantize_calls"][0]["params"] == params
    reloaded = memboost.load_quantized(directory)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)
    assert not any(p.device.type == "meta" for p in reloaded.parameters())
    assert not any(b.device.type == "meta" for b in reloaded.buffers())
    out = reloaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    # one file when it fits
    single = tmp_path / "single"
    memboost.save_quantized(model, single)
    assert "model.safetensors" in os.listdir(single) and "model.safetensors.index.json" not in os.listdir(single)
    with torch.no_grad():
        assert torch.equal(memboost.load_quantized(single)(ids).logits, want)


def test_layer_options_come_back(tmp_path):
    model = tiny_model("llama")
    memboost.quantize_model(model, "mixed", ratio_4bit=0.5, act_bits=8, progress=False)
    memboost.save_quantized(model, tmp_path / "m")
    reloaded = memboost.load_quantized(tmp_path / "m")
    layers = [m for m in reloaded.modules() if isinstance(m, memboost.nn.QuantizedLinear)]
    assert layers and all(m.act_bits == 8 for m in layers)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_tied_embedding_is_stored_once_and_tied_again(tmp_path):
    model = tiny_model("llama")
    memboost.quantize_model(model, "mixed", lm_head=None, progress=False)  # a float output layer, tied
    memboost.save_quantized(model, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = memboost.load_quantized(tmp_path / "m")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_int8_output_layer_keeps_the_float_embedding_once_and_untied(tmp_path):
    model = tiny_model("llama")
    memboost.quantize_model(model, "mixed", progress=False)  # lm_head="int8" by default
    memboost.save_quantized(model, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "lm_head.weight.values" in keys and "model.embed_tokens.weight" in keys
    assert json.load(open(tmp_path / "m" / "config.json"))["tie_word_embeddings"] is False
    reloaded = memboost.load_quantized(tmp_path / "m")
    assert isinstance(reloaded.lm_head, memboost.nn.Int8Linear)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_load_never_materialises_float_weights(tmp_path):
    # Peak memory of load_quantized, measured in a fresh process: far below
    # the float32 size of the quantized weights (no dequantized copy).
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(config).eval()
    report = memboost.quantize_model(model, "mixed", ratio_4bit=0.1, progress=False)
    memboost.save_quantized(model, tmp_path / "m")
    script = textwrap.dedent(f"""
        import resource, torch, transformers, memboost
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = memboost.load_quantized({str(tmp_path / "m")!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_growth = int(out.stdout.strip().splitlines()[-1])
    assert report.bytes_before > 60e6
    assert peak_growth < 0.3 * report.bytes_before, (peak_growth, report.bytes_before, report.bytes_after)


def _saved(tmp_path):
    model = tiny_model("llama")
    memboost.quantize_model(model, "mixed", progress=False)
    directory = tmp_path / "m"
    memboost.save_quantized(model, directory)
    return model, directory


def _edit_config(directory, fn):
    path = directory / "config.json"
    config = json.load(open(path))
    fn(config)
    json.dump(config, open(path, "w"))


def test_bad_directories_are_named(tmp_path):
    model, directory = _saved(tmp_path)
    with pytest.raises(memboost.MemboostError, match="is not a folder"):
        memboost.load_quantized(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(memboost.MemboostError, match="has no config.json"):
        memboost.load_quantized(empty)
    os.remove(directory / "model.safetensors")
    with pytest.raises(memboost.MemboostError, match="holds no model.safetensors"):
        memboost.load_quantized(directory)

    model, directory = _saved(tmp_path)
    _edit_config(directory, lambda c: c["quantization_config"].update(quant_method="bitsandbytes"))
    with pytest.raises(memboost.MemboostError, match="quant_method 'bitsandbytes', not 'memboost'"):
        memboost.load_quantized(directory)
    _edit_config(directory, lambda c: c["quantization_config"].update(quant_method="memboost",
                                                                        format_versions={"mixed": 99}))
    with pytest.raises(memboost.MemboostError, match="format 'mixed' version 99 is not supported.*upgrade memboost"):
        memboost.load_quantized(directory)
    _edit_config(directory, lambda c: c.pop("quantization_config"))
    with pytest.raises(memboost.MemboostError, match="has no quantization_config"):
        memboost.load_quantized(directory)

    model, directory = _saved(tmp_path)
    _edit_config(directory, lambda c: c.update(model_type="no-such-architecture"))
    with pytest.raises(memboost.MemboostError, match="transformers cannot build this architecture"):
        memboost.load_quantized(directory)

    model, directory = _saved(tmp_path)  # tensor shapes that disagree with the config
    _edit_config(directory, lambda c: c.update(intermediate_size=96))
    with pytest.raises(memboost.MemboostError, match="does not fit"):
        memboost.load_quantized(directory)


def test_failed_save_keeps_the_previous_directory(tmp_path, monkeypatch):
    model, directory = _saved(tmp_path)
    before = {f: open(directory / f, "rb").read() for f in os.listdir(directory)}
    import memboost.io.checkpoint as checkpoint

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        memboost.save_quantized(model, directory)
    assert {f: open(directory / f, "rb").read() for f in os.listdir(directory)} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging folder left behind
    with pytest.raises(memboost.MemboostError, match="has no memboost layer"):
        memboost.save_quantized(tiny_model("llama"), tmp_path / "plain")
    with pytest.raises(memboost.MemboostError, match="'max_shard_size'"):
        memboost.save_quantized(model, tmp_path / "x", max_shard_size="lots")


def test_load_onto_a_gpu_this_machine_lacks_says_so(tmp_path, monkeypatch):
    model = tiny_model("llama")
    memboost.quantize_model(model, "nf4", progress=False)
    memboost.save_quantized(model, tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(memboost.MemboostError, match=r"^'device' is 'cuda', but this machine has no usable CUDA GPU"):
        memboost.load_quantized(tmp_path / "m", device="cuda")
    with pytest.raises(memboost.MemboostError, match=r"^'device' must be a device such as 'cpu'"):
        memboost.load_quantized(tmp_path / "m", device="gpu0")
