"""A whole model to and from a .lort file: which tensors become LoRT layers,
the metadata a file needs to rebuild the model, and the rebuild itself."""

import json
import os
import tempfile
from typing import Dict, Iterable, Optional, Tuple

import torch

from memboost.errors import MemboostError
from memboost.model.quantize import load_quantized_

from .fileformat import LortFile

DEFAULT_SKIP = ("embed", "lm_head", "wte", "wpe", "norm")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compress_reason(name: str, shape: tuple, dtype: torch.dtype, min_dim: int, skip: Iterable[str]
                    ) -> Optional[str]:
    """None when tensor `name` is a linear weight lort-compress decomposes,
    else why it is stored as it is. Raises for a linear weight it cannot take."""
    if not name.endswith(".weight") or len(shape) != 2:
        return "not a 2-D weight"
    hit = next((s for s in skip if s and s in name), None)
    if hit:
        return f"skipped ({hit!r})"
    if min(shape) < min_dim:
        return f"smaller than --min-dim {min_dim}"
    if dtype not in FLOAT_DTYPES:
        raise MemboostError(f"tensor {name!r} is a {dtype} linear weight: LoRT decomposes float16, bfloat16 or "
                            "float32 weights (skip it with --skip or --min-dim)")
    return None


def tokenizer_files(tokenizer) -> Dict[str, str]:
    """The text files tokenizer.save_pretrained writes, by name."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                files[name] = f.read()
    return files


def config_dict(config) -> dict:
    return json.loads(config.to_json_string(use_diff=False))


def build_model(lort_file: LortFile, path: str = "", dtype: Optional[torch.dtype] = None):
    """The model a .lort file describes: built from its config on the meta
    device, LoRT layers as memboost.nn.LoRTLinear, every other tensor taken
    from the file (assign=True: no float copy of the decomposed layers is ever
    made). Tied weights are tied again."""
    from memboost.io.checkpoint import _is_tied_alias, _parameters_on_meta
    from transformers import AutoConfig, AutoModelForCausalLM

    where = path or "the .lort file"
    cfg = lort_file.config
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise MemboostError(f"{where!r} holds no model config (compressed from a single .safetensors file "
                            "without config.json?): it cannot be rebuilt into a model")
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise MemboostError(f"{where!r}: transformers cannot build model_type {cfg['model_type']!r}: {exc}") from None
    with _parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            raise MemboostError(f"{where!r}: unsupported architecture: {exc}") from None
    state = dict(lort_file.tensors)
    for name, q in lort_file.layers.items():
        prefix = name + "."
        for key, value in q.state_dict().items():
            state[prefix + key] = value
    try:
        missing, unexpected = load_quantized_(model, state, strict=False, assign=True)
    except (RuntimeError, MemboostError) as exc:
        raise MemboostError(f"{where!r} does not fit its config: {exc}") from None
    missing = [k for k in missing if not _is_tied_alias(model, k)]
    if missing or unexpected:
        raise MemboostError(f"{where!r} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_tokenizer(lort_file: LortFile, path: str = ""):
    files = lort_file.tokenizer_files
    if not files:
        raise MemboostError(f"{path or 'the .lort file'!r} holds no tokenizer")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            if not isinstance(name, str) or os.path.basename(name) != name or not isinstance(text, str):
                raise MemboostError(f"{path!r}: tokenizer file name {name!r} is not a plain file name")
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MemboostError(f"{path!r}: the stored tokenizer cannot be loaded: {exc}") from None


def load_model(path: str, dtype: Optional[torch.dtype] = torch.float32,
               verify: bool = True) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer or None) rebuilt from a .lort file alone; `dtype` is
    the compute dtype (the stored embeddings and norms are cast to it; the
    LoRT layers never are). None keeps the stored dtypes. `verify` checks the
    file's checksums (lort.fileformat.load)."""
    from .fileformat import load

    lort_file = load(path, verify=verify)
    model = build_model(lort_file, path, dtype)
    tokenizer = build_tokenizer(lort_file, path) if lort_file.tokenizer_files else None
    return model, tokenizer
