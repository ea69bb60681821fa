"""Saving and loading state_dicts as safetensors files, safely.

Every file memboost writes goes through atomic_write: a temporary file in the
target's folder, flushed and fsync'ed, then renamed over the target, so an
interrupted or failed save never leaves a half-written file where a good one
was. A load names the file and what is wrong with it (missing, truncated,
not safetensors at all).

Tied weights (a model whose lm_head shares the embedding's tensor) are saved
once: the other names are recorded as aliases in the file's metadata and
restored, as the same tensor, on load.
"""

import contextlib
import json
import os
import struct
import tempfile
from typing import Dict, Iterator, Optional

import torch

from .errors import MemboostError, MemboostTypeError

ALIASES_KEY = "memboost.aliases"  # safetensors metadata: JSON {alias name: stored name}


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[str]:
    """Yields a temporary path next to `path`; when the block completes, the
    file there is fsync'ed and renamed over `path` (and the folder fsync'ed).
    On any error the temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MemboostError(f"cannot write {path!r}: folder {folder!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MemboostError(f"cannot write {path!r}: {exc.strerror}") from exc
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _split_aliases(state: Dict[str, torch.Tensor]):
    """(tensors to store, {alias: stored name}): a name whose tensor is the
    very same view of the same memory as an earlier name's becomes an alias;
    a tensor sharing memory with an earlier one in another way is stored as
    a copy (safetensors refuses shared memory)."""
    views: Dict[tuple, str] = {}
    storages = set()
    stored, aliases = {}, {}
    for name, t in state.items():
        if t.numel() == 0:
            stored[name] = t
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = storage + (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        stored[name] = t.clone() if storage in storages else t
        storages.add(storage)
    return stored, aliases


def save_safetensors(state: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes `state` (a flat dict of tensors, e.g. a model's state_dict with
    quantized layers) to `path` atomically. Tied tensors are stored once."""
    from safetensors.torch import save_file

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MemboostTypeError("'state' must be a dict of str -> torch.Tensor")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise MemboostTypeError("'metadata' must be a dict of str -> str")
    stored, aliases = _split_aliases(state)
    metadata = dict(metadata or {})
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in stored.items()}, tmp, metadata=metadata or None)


def check_safetensors_header(path: str) -> int:
    """Checks that `path` starts like a safetensors file that fits its size
    (8-byte little-endian header length, then a JSON object); returns the
    file size. Names the file and what it is instead when it is not."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8 and head[8:9] == b"{":
            return size
    # Not a safetensors start: say what it is, when that is recognisable.
    if head[:4] == b"PK\x03\x04":
        raise MemboostError(f"{path!r} is not a safetensors file: it is a zip archive, as torch.save writes "
                            "(load it with torch.load(path, weights_only=True))")
    if head[:1] == b"\x80":
        raise MemboostError(f"{path!r} is not a safetensors file: it looks like a pickle")
    if len(head) < 9:
        raise MemboostError(f"{path!r} is not a safetensors file: only {size} bytes long")
    raise MemboostError(f"{path!r} is not a safetensors file (or is truncated): its first 8 bytes give a header "
                        f"of {header_len} bytes in a file of {size} bytes")


def load_safetensors(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on `device` (tied names restored)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MemboostError(f"'path' {path!r} is not a file")
    check_safetensors_header(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MemboostError(f"{path!r} is not a complete safetensors file (truncated or corrupt?): {exc}") from exc
    if ALIASES_KEY in metadata:
        try:
            aliases = json.loads(metadata[ALIASES_KEY])
            ok = isinstance(aliases, dict) and all(isinstance(v, str) and v in state for v in aliases.values())
        except ValueError:
            ok = False
        if not ok:
            raise MemboostError(f"{path!r}: metadata '{ALIASES_KEY}' must map names to stored tensors")
        for alias, name in aliases.items():
            state.setdefault(alias, state[name])
    return state
