"""lort-compress --heal N: the .lort file's factors, alphas and norms trained
against the float model (memboost.heal), the file rewritten in place."""

import os
import time
from typing import Optional

import torch

from memboost.errors import MemboostError
from memboost.formats.lort import LoRTQuantizedTensor


def _teacher(spec: Optional[str]):
    from memboost import testbed

    if spec is None:
        return testbed.load_smollm2(torch.float32)[0]
    if not os.path.isdir(spec):
        raise MemboostError(f"--heal needs the float model as a local folder (or the embedded model), got {spec!r}")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise MemboostError(f"cannot load the float model {spec!r} for --heal: {exc}") from None


def heal_file(path: str, spec: Optional[str], steps: int, text: str = "fortunes", tokens: int = 8192,
              window: int = 128, batch: int = 4, lr: float = 5e-4, progress: bool = True) -> dict:
    """Heals the .lort file at `path` (compressed from `spec`) for `steps`
    steps on `tokens` tokens of `text` ('fortunes' or a file), in windows of
    `window` tokens, `batch` windows a step; rewrites it. Returns a summary."""
    from memboost.cli import read_text, token_windows
    from memboost.train.heal import heal
    from .fileformat import load, save
    from .model import build_model, build_tokenizer

    lort_file = load(path)
    model = build_model(lort_file, path, torch.float32)
    tokenizer = build_tokenizer(lort_file, path)
    teacher = _teacher(spec)
    windows = token_windows(tokenizer, read_text(text), tokens, window=window)
    windows = [w for w in windows if w.shape[1] == window] or windows[:1]
    batches = [torch.cat(windows[i:i + batch]) for i in range(0, len(windows), batch)]
    start = time.perf_counter()
    report = heal(model, teacher, batches, steps=steps, lr=lr, progress=progress)
    modules = dict(model.named_modules())
    layers = {}
    for name, q in lort_file.layers.items():
        healed = modules[name[:-len(".weight")]].weight.tensor().cpu()
        layers[name] = healed if isinstance(healed, LoRTQuantizedTensor) else q
    params = dict(model.named_parameters())
    tensors = {name: (params[name].detach().to(t.dtype).cpu() if name in params else t)
               for name, t in lort_file.tensors.items()}
    meta = dict(lort_file.meta)
    meta["info"] = dict(meta.get("info") or {}, heal={"steps": steps, "tokens": report.tokens, "lr": lr,
                                                      "text": os.path.basename(text)})
    save(path, layers, tensors, meta)
    return {"heal_steps": steps, "heal_tokens": report.tokens, "heal_seconds": time.perf_counter() - start,
            "heal_loss_first": report.losses[0] if report.losses else None,
            "heal_loss_last": report.losses[-1] if report.losses else None}
