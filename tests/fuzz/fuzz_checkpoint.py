"""memboost.load_quantized on folders save_quantized wrote (a tiny random
Llama: mixed in one file; NF4 and ternary layers in shards with an index),
one file replaced by the fuzz input (mutate.FolderInputs). The checksums are
not checked (verify=False; fuzz_safetensors covers that check): a hostile
folder can carry matching ones, and the mutated bytes should reach the loader."""

import functools
import os

import torch

import memboost

import mutate
import seeds as _seeds


@functools.lru_cache(maxsize=None)
def _folders() -> mutate.FolderInputs:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    templates = []
    for i, (calls, shard) in enumerate(((["mixed"], "2GB"), (["nf4", "ternary"], "24KB"))):
        torch.manual_seed(i)
        model = LlamaForCausalLM(config).eval()
        for method, skip in zip(calls, (("lm_head", "down_proj"), ("lm_head", "q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj"))[:len(calls)]):
            memboost.quantize_model(model, method=method, skip=skip if len(calls) > 1 else ("lm_head",))
        folder = os.path.join(_seeds.FOLDER, f"checkpoint{i}")
        memboost.save_quantized(model, folder, max_shard_size=shard)
        templates.append(folder)
    return mutate.FolderInputs(_seeds.FOLDER, templates)


def seeds():
    return _folders().seeds()


def target(data: bytes) -> None:
    model = memboost.load_quantized(_folders().apply(data), verify=False)
    model(torch.tensor([[1, 2, 3]]))
