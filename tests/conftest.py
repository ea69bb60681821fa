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


# tests/vllm_serving/ needs vLLM (its own virtualenv: `make test-vllm`); collected only where vllm is installed.
if importlib.util.find_spec("vllm") is None:
    collect_ignore = ["vllm_serving"]
