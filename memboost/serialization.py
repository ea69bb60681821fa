"""Saving and loading state_dicts as safetensors files, safely.

A save writes a temporary file next to the target and renames it over the
target only once complete, so an interrupted or failed save never leaves a
half-written file where a good one was. A load names the file and what is
wrong with it (missing, truncated, not safetensors)."""

import os
import tempfile
from typing import Dict, Optional

import torch


def save_safetensors(state: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes `state` (a flat dict of tensors, e.g. a model's state_dict with
    quantized layers) to `path` atomically. Tensors sharing memory (tied
    weights) are refused by safetensors: leave the tied copy out."""
    from safetensors.torch import save_file

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TypeError("'state' must be a dict of str -> torch.Tensor")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_safetensors(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"'path' {path!r} is not a file")
    try:
        return load_file(path, device=device)
    except SafetensorError as exc:
        raise ValueError(f"{path!r} is not a complete safetensors file (truncated or corrupt?): {exc}") from exc
