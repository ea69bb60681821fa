"""transformers' AutoModelForCausalLM.from_pretrained on folders memboost's
save_quantized wrote (its quantization_config routes the loading through
memboost's HfQuantizer), one file replaced by the fuzz input
(mutate.FolderInputs). transformers reads config.json and the safetensors
headers itself: an input it refuses before any memboost code runs (its own
OSError, JSON or safetensors error, raised from frames outside memboost) is
Skip; whatever reaches memboost must load or raise MemboostError. The
checksums are not checked (MEMBOOST_VERIFY=0; fuzz_safetensors covers that
check): a hostile folder can carry matching ones, and the mutated bytes should
reach the loader."""

import functools
import os
import sys

import torch

import memboost

import mutate
import seeds as _seeds
from driver import Skip

_MEMBOOST_DIR = os.path.dirname(os.path.abspath(memboost.__file__)) + os.sep


@functools.lru_cache(maxsize=None)
def _folders() -> mutate.FolderInputs:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    templates = []
    for i, (method, shard) in enumerate((("mixed", "2GB"), ("nf4", "24KB"), ("ternary", "2GB"))):
        torch.manual_seed(i)
        model = LlamaForCausalLM(config).eval()
        memboost.quantize_model(model, method=method)
        folder = os.path.join(_seeds.FOLDER, f"from_pretrained{i}")
        memboost.save_quantized(model, folder, max_shard_size=shard)
        templates.append(folder)
    return mutate.FolderInputs(os.path.join(_seeds.FOLDER, "from_pretrained-scratch"), templates)


def seeds():
    return _folders().seeds()


def _reached_memboost(tb) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_MEMBOOST_DIR):
            return True
        tb = tb.tb_next
    return False


def target(data: bytes) -> None:
    from transformers import AutoModelForCausalLM

    folder = _folders().apply(data)
    verify = os.environ.get("MEMBOOST_VERIFY")
    os.environ["MEMBOOST_VERIFY"] = "0"  # set only while loading: the test process imports this module too
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except memboost.MemboostError:
        raise
    except Exception:
        if not _reached_memboost(sys.exc_info()[2]):
            raise Skip("refused by transformers before memboost's loader ran") from None
        raise
    finally:
        if verify is None:
            del os.environ["MEMBOOST_VERIFY"]
        else:
            os.environ["MEMBOOST_VERIFY"] = verify
    model(torch.tensor([[1, 2, 3]]))
