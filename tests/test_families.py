"""Every decoder family through every path: a tiny random model of each family in conftest.FAMILIES (built from
its transformers config) quantized in every format, saved, reloaded by memboost.load_quantized and by
transformers' from_pretrained with identical logits, and generating the same tokens. The decode loop
(memboost.runtime) is checked per family in test_runtime.py, GGUF in test_gguf.py."""

import pytest
import torch

import memboost
from memboost.nn import QuantizedLinear

from conftest import FAMILIES, tiny_causal_lm

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

VOCAB = 96
# Every format, its quantizer arguments sized for 64-wide layers: (method, params, format of the replaced layers).
METHODS = [
    ("mixed", {"ratio_4bit": 0.5, "group_size": 32}),
    ("ternary", {"per_row": True}),
    ("nf4", {"block_size": 64}),
    ("lort", {"rank": 8, "iters": 2, "per_row_alpha": True}),
]
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def generate(model):
    return model.generate(IDS[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=6,
                          min_new_tokens=6, do_sample=False)


def quantized_layers(model):
    return {name: m.weight.tensor().format for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_reload_generate(family, method, params, tmp_path):
    model = tiny_causal_lm(family, vocab_size=VOCAB)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = model.config.tie_word_embeddings
    float_logits = logits(model)
    report = memboost.quantize_model(model, method, progress=False, **params)
    # every linear layer, fused ones (Phi-3's qkv_proj, gate_up_proj) included; the output layer int8 (reported apart)
    formats = quantized_layers(model)
    assert set(formats) == linears and {r.name for r in report.replaced} == linears - {"lm_head"}, report.summary()
    assert formats.pop("lm_head") == "int8" and set(formats.values()) == {method}
    if tied:  # the tied embedding stays a float embedding, untied from the int8 output layer
        assert isinstance(model.model.embed_tokens.weight, torch.nn.Parameter) and not model.config.tie_word_embeddings
    want, tokens = logits(model), generate(model)
    assert torch.isfinite(want).all() and not torch.equal(want, float_logits)

    memboost.save_quantized(model, tmp_path)
    assert torch.equal(logits(memboost.load_quantized(tmp_path)), want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf) is type(model) and quantized_layers(hf) == quantized_layers(model)
    assert torch.equal(logits(hf), want)
    assert torch.equal(generate(hf), tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_details_are_the_transformers_model(family):
    """The tiny models keep what sets each family apart (so that the paths above meet it)."""
    model = tiny_causal_lm(family)
    layer, config = model.model.layers[0], model.config
    attn = layer.self_attn
    assert hasattr(attn, "q_norm") == (family in ("qwen3", "gemma3", "olmo2"))
    assert hasattr(attn, "qkv_proj") == hasattr(layer.mlp, "gate_up_proj") == (family == "phi3")
    assert hasattr(layer, "pre_feedforward_layernorm") == (family in ("gemma2", "gemma3"))
    assert config.tie_word_embeddings == family.startswith("gemma")
    if family in ("gemma2", "gemma3"):
        assert config.layer_types == ["sliding_attention", "full_attention"] and config.sliding_window == 8
    if family == "gemma2":
        assert config.attn_logit_softcapping and config.final_logit_softcapping
