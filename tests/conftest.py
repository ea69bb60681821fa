import importlib.util
import pytest
import torch

import memboost

if not torch.cuda.is_available():
    CUDA_SKIP_REASON = "no CUDA device on this machine"
elif not memboost.build_info()["cuda_kernels"]:
    CUDA_SKIP_REASON = "memboost was built without CUDA kernels (MEMBOOST_CUDA=OFF or no nvcc)"
else:
    CUDA_SKIP_REASON = ""

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(bool(CUDA_SKIP_REASON), reason=CUDA_SKIP_REASON)]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


ISAS = ["portable", "avx2", "avx512"]  # MEMBOOST_CPU_ISA caps; a CPU without the ISA runs the best it has
# Every kernel path: the CPU under each forced instruction set, and CUDA.
TARGETS = [pytest.param(("cpu", name), id=f"cpu-{name}") for name in ISAS] + [
    pytest.param(("cuda", None), id="cuda", marks=DEVICES[1].marks)]


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    """The device of one kernel path, with MEMBOOST_CPU_ISA set for the CPU ones."""
    device, name = request.param
    if name:
        monkeypatch.setenv("MEMBOOST_CPU_ISA", name)
    return device


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def llm_like_weight(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Heavy-tailed weights with per-row scale spread and rare large values, like LLM layers."""
    g = torch.Generator().manual_seed(seed)
    # Student's t with 5 degrees of freedom, z / sqrt(chi2_5 / 5), drawn from g so
    # that every test sees the same weights whatever ran before it.
    z = torch.randn(out_features, in_features, generator=g)
    chi2 = torch.randn(5, out_features, in_features, generator=g).square().sum(0)
    w = z / (chi2 / 5).sqrt() * 0.02
    w *= torch.exp(0.3 * torch.randn(out_features, 1, generator=g))
    w *= torch.exp(0.3 * torch.randn(1, in_features, generator=g))
    return w.to(dtype)


TINY_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
             "foolishness. ") * 40


def tiny_llama(hidden_size: int = 64, intermediate_size: int = 128):
    """A tiny random Llama (seeded), two layers, without a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def tiny_llama_with_tokenizer(tie_word_embeddings: bool = True):
    """(model, tokenizer): a tiny random Llama (seeded) and a word-level tokenizer of TINY_TEXT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TINY_TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1,
                         tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval(), tokenizer


# Every decoder family memboost takes through each path (quantize, reload, generate, the decode loop, GGUF), by
# transformers' model_type name for it. Gemma 3 is its text-only model (Gemma3ForCausalLM, "gemma3_text").
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2"]


def tiny_causal_lm(family: str, vocab_size: int = 64, seed: int = 0, hidden_size: int = 64,
                   intermediate_size: int = 128, **overrides):
    """A tiny random causal LM of `family` (one of FAMILIES; seeded), built from its transformers config class:
    two layers, 4 query heads on 2 key/value heads of 16 dimensions, each family's own details kept (Qwen 3's,
    Gemma 3's and OLMo 2's q/k norms, Gemma's 1 + weight norms and scaled embedding, Gemma 2's soft-capping and
    Gemma 2/3's sliding-window layers, Phi-3's fused qkv_proj and gate_up_proj). `overrides` go to the config."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config_cls, model_cls, extra = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 16}),
        # one sliding-window layer, one global one, as Gemma 2 alternates them
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                   {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]}),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                 {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM,
                  {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    }[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**common, **extra, **overrides})).eval()

# tests/vllm_serving/ needs vLLM (its own virtualenv: `make test-vllm`); collected only where vllm is installed.
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["vllm_serving"]
