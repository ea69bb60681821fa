"""Generation: a decode loop over a causal LM's own modules with a static KV cache.

    decoder = memboost.runtime.Decoder(model, max_batch=8, max_length=512)   # the cache, allocated once
    new_tokens = decoder.generate([ids_a, ids_b], max_new_tokens=64)          # [2, 64], greedy
    text = memboost.generate(model, "The moon is", tokenizer=tokenizer, max_new_tokens=32)
"""

from .decode import SUPPORTED_FAMILIES, Decoder, generate, until_eos

__all__ = ["Decoder", "generate", "until_eos", "SUPPORTED_FAMILIES"]
