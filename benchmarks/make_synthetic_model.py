"""A Hugging Face folder of a Llama-shaped model with random weights, for
bench_big_model.py: Llama-3-8B's shape by default (hidden 4096, intermediate
14336, 32 layers, 32 heads, 8 key/value heads, vocabulary 128256) in bf16,
safetensors shards of about --shard-size, with the tokenizer of the embedded
SmolLM2-135M (49152 tokens: every id it gives lies inside the vocabulary;
the config's bos/eos ids are the tokenizer's). 16 GB on disk for the 8B
shape; never in CI. --config tiny writes a small folder of the same kind
(4 layers of hidden 256) to check the scripts, --config small one of 8
layers of hidden 1024 (0.24 B weights, 0.5 GB), --config llama3-8b-head
Llama-3-8B's embedding and output layer around one of its blocks (1.3 B
weights, 2.5 GB: the GGUF export's peak memory is theirs).

Weights: normal with std 0.02 (norms 1), generated tensor by tensor from
--seed; one shard's tensors are held at a time (--shard-size of memory).
The folder is written in a staging folder and renamed into place at the end.

    python benchmarks/make_synthetic_model.py /data/llama3-8b-random              # about 16 GB
    python benchmarks/make_synthetic_model.py /tmp/tiny-random --config tiny
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memboost.io.checkpoint import INDEX_NAME, _parse_size, replace_directory  # noqa: E402
from memboost.io.serialization import save_safetensors  # noqa: E402
from memboost.testbed import smollm2_tokenizer  # noqa: E402

CONFIGS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # Llama-3-8B's embedding and output layer (128256 x 4096 each) around one of its blocks: 1.3 B weights,
    # 2.5 GB; what the GGUF export's memory depends on, without the 16 GB
    "llama3-8b-head": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                           max_position_embeddings=8192),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048),
}


def tensor_plan(config) -> list:
    """(name, shape) of every tensor a LlamaForCausalLM of `config` saves, in its order (lm_head untied)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    plan = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        plan += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                 (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                 (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                 (p + "mlp.down_proj.weight", (h, i))]
    return plan + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make(out: str, name: str = "llama3-8b", shard_size: str = "5GB", seed: int = 0, dtype=torch.bfloat16) -> dict:
    from transformers import GenerationConfig, LlamaConfig

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(**CONFIGS[name], tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype=str(dtype).replace("torch.", ""))
    plan = tensor_plan(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    max_bytes = _parse_size(shard_size)
    shards, current, size = [], [], 0
    for tensor_name, shape in plan:
        nbytes = itemsize * torch.Size(shape).numel()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((tensor_name, shape))
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with replace_directory(out) as staging:
        weight_map = {}
        for k, shard in enumerate(shards):
            filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            state = {}
            for tensor_name, shape in shard:
                if len(shape) == 1:
                    state[tensor_name] = torch.ones(shape, dtype=dtype)
                else:
                    state[tensor_name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            save_safetensors(state, os.path.join(staging, filename), {"format": "pt"})
            weight_map.update({n: filename for n in state})
            print(f"  {filename}: {len(state)} tensors, {sum(t.numel() * itemsize for t in state.values()) / 1e9:.2f} "
                  f"GB ({time.perf_counter() - start:.0f} s)", flush=True)
            del state
        total = sum(itemsize * torch.Size(shape).numel() for _, shape in plan)
        with open(os.path.join(staging, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config.save_pretrained(staging)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    weights = sum(torch.Size(shape).numel() for _, shape in plan)
    return {"folder": out, "config": name, "weights": weights, "bytes": total, "shards": len(shards)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder to write (replaced as a whole)")
    parser.add_argument("--config", default="llama3-8b", choices=sorted(CONFIGS))
    parser.add_argument("--shard-size", default="5GB", help="safetensors shard size (and memory held while writing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = make(args.out, args.config, args.shard_size, args.seed)
    print(f"wrote {info['folder']}: {info['weights'] / 1e9:.2f} B weights, {info['bytes'] / 1e9:.2f} GB in "
          f"{info['shards']} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
