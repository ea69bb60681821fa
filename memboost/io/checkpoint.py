"""A quantized Hugging Face model as a directory: save_quantized / load_quantized.

The directory is what transformers writes for a model, plus the quantized
tensors: `config.json` (the model's config with a `quantization_config`
whose `quant_method` is "memboost"), `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, and
the tokenizer's files when one is given. Tied weights are stored once.

load_quantized builds the model with its parameters on the meta device
(no memory), turns every linear whose weight the files hold quantized into
that format's layer, and loads every tensor with assign=True: no
full-precision copy of a quantized weight ever exists.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Union

import torch
from torch import nn

from ..errors import MemboostError, MemboostTypeError, check_device
from ..model.quantize import load_quantized_
from ..nn import QuantizedLinear
from .serialization import (ALIASES_KEY, INDEX_NAME, _split_aliases, apply_umask, check_output_path,
                            load_safetensors, read_safetensors_index, save_safetensors)
from ..formats.tensor import QuantizedTensor

QUANT_METHOD = "memboost"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        text = size.strip().upper()
        for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                             ("KB", 10**3), ("B", 1)):
            if text.endswith(unit):
                try:
                    value = float(text[:-len(unit)])
                except ValueError:
                    break
                if value > 0:
                    return int(value * factor)
                break
    raise MemboostError(f"'max_shard_size' must be a positive number of bytes or a string like '2GB', got {size!r}")


def quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` entry of config.json for a quantized model:
    quant_method "memboost", each quantized layer's format, the format
    versions, and the arguments quantize_model was called with."""
    modules = quantized_formats(model)
    if not modules:
        raise MemboostError("'model' has no memboost layer: quantize it first (memboost.quantize_model)")
    return quantization_config_of(modules, getattr(model, "memboost_quantization", []))


def quantized_formats(model: nn.Module, prefix: str = "") -> Dict[str, str]:
    """{qualified layer name: format} of every memboost layer in `model` (names prefixed with `prefix`)."""
    return {prefix + name: module.weight.tensor().format for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear)}


def quantization_config_of(modules: Dict[str, str], calls) -> dict:
    """quantization_config for the layers `modules` ({name: format}) made by
    the quantize_model `calls` (memboost.model.quantize.quantize_call)."""
    from .._version import __version__

    versions = {fmt: QuantizedTensor._formats[fmt].version for fmt in sorted(set(modules.values()))}
    methods = sorted(set(modules.values()))
    return {"quant_method": QUANT_METHOD, "method": methods[0] if len(methods) == 1 else methods,
            "format_versions": versions, "memboost_version": __version__, "modules": modules,
            "quantize_calls": calls}


def check_quantization_config(qconfig: dict, where: str) -> None:
    """Refuses a quantization_config this memboost cannot read, by name."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else qconfig
        raise MemboostError(f"{where}: quantization_config has quant_method {method!r}, not {QUANT_METHOD!r}")
    versions = qconfig.get("format_versions")
    if not isinstance(versions, dict):
        raise MemboostError(f"{where}: quantization_config has no 'format_versions'")
    known = QuantizedTensor._formats
    for fmt, version in versions.items():
        if fmt not in known:
            raise MemboostError(f"{where}: format {fmt!r} is not known to this memboost (known: {sorted(known)}); "
                                "upgrade memboost")
        if version != known[fmt].version:
            newer = isinstance(version, int) and version > known[fmt].version
            raise MemboostError(f"{where}: format {fmt!r} version {version!r} is not supported (this memboost reads "
                                f"version {known[fmt].version}{'; upgrade memboost' if newer else ''})")


class ScratchFile:
    """Tensors written at once to an unnamed scratch file (gone when closed)
    and read back through a copy-on-write memory map: their pages are the
    file's, which the kernel can drop and read again, so they take no
    process memory that cannot be given back."""

    def __init__(self, folder: Optional[str] = None):
        self.file = tempfile.TemporaryFile(dir=folder)

    def write(self, t: torch.Tensor):
        """Appends `t`; returns the entry read() takes."""
        t = t.detach().contiguous().cpu()
        end = self.file.seek(0, os.SEEK_END)
        offset = -(-end // 64) * 64   # aligned, as each dtype's view wants
        self.file.write(bytes(offset - end))
        t.reshape(-1).view(torch.uint8).numpy().tofile(self.file)
        return (offset, t.dtype, tuple(t.shape), t.numel() * t.element_size())

    def read(self, entries):
        """The tensors of `entries` (from write), in order, mapped from the file."""
        import numpy as np

        self.file.flush()
        size = self.file.seek(0, os.SEEK_END)
        # copy-on-write map: writable for torch, nothing is written back (and nothing is written at all)
        mapped = np.memmap(self.file, dtype=np.uint8, mode="c", shape=(size,)) if size else None
        return [(torch.from_numpy(mapped[offset:offset + nbytes]) if nbytes else
                 torch.empty(0, dtype=torch.uint8)).view(dtype).reshape(shape)
                for offset, dtype, shape, nbytes in entries]

    def clear(self) -> None:
        """Forgets every tensor written (the maps read() gave must be gone)."""
        self.file.seek(0)
        self.file.truncate()

    def close(self) -> None:
        self.file.close()


class ShardWriter:
    """Writes a model's tensors into `folder` (a staging folder) as they
    come, laid out as save_quantized lays them out: one model.safetensors
    when they fit in one shard of `max_shard_size`, else shards
    model-0000i-of-0000n.safetensors (each at most that size, a larger
    single tensor alone) with model.safetensors.index.json. At most one
    shard's tensors are held at a time; shards are written under temporary
    names and renamed when their count is known (close). spill=True keeps
    even those out of memory: each tensor added is written at once to an
    unnamed scratch file in `folder` and read back through a memory map
    when its shard is written (memboost.io.streaming's bounded memory)."""

    def __init__(self, folder: str, max_shard_size: Union[int, str] = "2GB", spill: bool = False):
        self.folder = folder
        self.max_bytes = _parse_size(max_shard_size)
        self.pending: Dict[str, object] = {}   # name -> tensor, or (offset, dtype, shape, nbytes) in the scratch file
        self.pending_bytes = 0
        self.total_bytes = 0
        self.written = []   # (temporary path, names) per shard written
        self.scratch = ScratchFile(folder) if spill else None

    def add(self, state: Dict[str, torch.Tensor]) -> None:
        """Adds tensors stored once each (aliases go to close)."""
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self._flush()
            if self.scratch is not None:
                t = self.scratch.write(t)
            self.pending[name] = t
            self.pending_bytes += nbytes
            self.total_bytes += nbytes

    def _pending_tensors(self) -> Dict[str, torch.Tensor]:
        if self.scratch is None:
            return self.pending
        return dict(zip(self.pending, self.scratch.read(self.pending.values())))

    def _reset(self) -> None:
        self.pending, self.pending_bytes = {}, 0
        if self.scratch is not None:   # the maps of its pages are gone with the tensors written
            self.scratch.clear()

    def _flush(self) -> None:
        path = os.path.join(self.folder, f".shard-{len(self.written) + 1:05d}.safetensors")
        save_safetensors(self._pending_tensors(), path, {"format": "pt"})
        self.written.append((path, list(self.pending)))
        self._reset()

    def close(self, aliases: Dict[str, str]) -> None:
        """Writes what is left and the index; `aliases` ({alias: stored name}) are the tied names."""
        try:
            self._close(aliases)
        finally:
            if self.scratch is not None:
                self.scratch.close()

    def _close(self, aliases: Dict[str, str]) -> None:
        if not self.written:  # one file: save_safetensors keeps the aliases in its metadata
            state = self._pending_tensors()
            state.update({alias: state[name] for alias, name in aliases.items()})
            save_safetensors(state, os.path.join(self.folder, WEIGHTS_NAME), {"format": "pt"})
            del state
            self._reset()
            return
        if self.pending:
            self._flush()
        weight_map = {}
        for i, (path, names) in enumerate(self.written):
            filename = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(path, os.path.join(self.folder, filename))
            weight_map.update({k: filename for k in names})
        index = {"metadata": {"total_size": self.total_bytes, ALIASES_KEY: aliases}, "weight_map": weight_map}
        with open(os.path.join(self.folder, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def cast_for_storage(stored: Dict[str, torch.Tensor], quantized_layers, storage_dtype: Optional[torch.dtype]):
    """`stored` with its floating-point tensors cast to `storage_dtype`
    (None: as they are), except the parts of the quantized weights of the
    layers named in `quantized_layers`, which keep their format's dtypes."""
    if storage_dtype is None:
        return stored
    quantized = tuple(f"{name}.weight." for name in quantized_layers)
    return {k: v.to(storage_dtype) if v.is_floating_point() and not k.startswith(quantized) else v
            for k, v in stored.items()}


def write_config(folder: str, config, qconfig: dict, generation_config=None,
                 plain_dtype: Optional[torch.dtype] = None) -> None:
    """config.json (the model's config with `qconfig` as its quantization_config) and generation_config.json.
    `plain_dtype`: the dtype of the stored unquantized float tensors, written as the config's dtype when it
    has none."""
    config_dict = config.to_dict()
    config_dict["quantization_config"] = qconfig
    if config_dict.get("dtype") is None and plain_dtype is not None:
        # Without it, transformers' from_pretrained takes the dtype of the first floating tensor in the file,
        # which may be a quantized weight's scales (float16 in an int8 lm_head).
        config_dict["dtype"] = str(plain_dtype).replace("torch.", "")
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        generation_config.save_pretrained(folder)


_RENAME_EXCHANGE = 2   # linux/fs.h
_AT_FDCWD = -100


def _exchange_paths(a: str, b: str) -> bool:
    """Swaps the folders at `a` and `b` in one step (Linux renameat2 with
    RENAME_EXCHANGE); False where the C library, the kernel or the file
    system cannot, and nothing was changed."""
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # no such C function (macOS), no CDLL(None) (Windows)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def replace_directory(directory: str):
    """Yields a fresh folder next to `directory`; on success it replaces
    `directory` (which keeps its old contents until then), on error it is
    removed and `directory` is untouched. The folder gets the user's umask.
    The two folders are exchanged in one atomic rename where the system
    allows it: two renames (old folder aside, new one in) leave no folder at
    `directory` if the process dies between them, which a test that kills
    the writer at random moments once hit."""
    directory = check_output_path(directory, folder=True)
    parent = os.path.dirname(directory)
    try:
        staging = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + ".", dir=parent)
    except OSError as exc:
        raise MemboostError(f"cannot write {directory!r}: {exc.strerror}") from exc
    try:
        apply_umask(staging, folder=True)
        yield staging
        if os.path.isdir(directory) and _exchange_paths(staging, directory):
            shutil.rmtree(staging, ignore_errors=True)  # the old folder, now at the staging path
        elif os.path.isdir(directory):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + ".old.", dir=parent)
            os.rmdir(old)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _own_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The model's own 16-bit dtype (its config's `dtype`, that of the
    checkpoint it came from) or None when that is not bfloat16/float16."""
    config_dtype = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    return config_dtype if config_dtype in (torch.bfloat16, torch.float16) else None


def _plain_float_dtype(model: nn.Module, stored: Dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype of the first unquantized floating tensor (embedding, norm) of `stored`."""
    quantized = tuple(f"{name}.weight." for name, module in model.named_modules() if isinstance(module, QuantizedLinear))
    return next((v.dtype for k, v in stored.items() if v.is_floating_point() and not k.startswith(quantized)), None)


def save_quantized(model: nn.Module, directory: str, max_shard_size: Union[int, str] = "2GB",
                   tokenizer=None, dtype: Union[str, torch.dtype, None] = "auto") -> None:
    """Saves a model that quantize_model changed to `directory` (created or
    replaced as a whole: an error leaves the previous one as it was).

    `dtype` is the dtype the unquantized floating-point tensors (embeddings,
    norms, biases) are stored in: "auto" (default) the model's own dtype when
    it is 16-bit (model.config.dtype: bfloat16 or float16, the dtype of the
    checkpoint it was loaded from), else as they are; None keeps them as they
    are (e.g. float32); or torch.float32 / bfloat16 / float16. The quantized
    weights are stored as their format defines, whatever this says."""
    if not isinstance(model, nn.Module):
        raise MemboostTypeError(f"'model' must be an nn.Module, got {type(model).__name__}")
    if not (dtype is None or dtype == "auto" or dtype in _STORAGE_DTYPES):
        raise MemboostError(f"'dtype' must be 'auto', None or one of {[str(d) for d in _STORAGE_DTYPES]}, "
                            f"got {dtype!r}")
    _parse_size(max_shard_size)
    qconfig = quantization_config(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise MemboostError("'model' has no Hugging Face config (model.config): save its state_dict with "
                            "memboost.save_safetensors instead")
    state = {k: v for k, v in model.state_dict().items()}
    stored, aliases = _split_aliases(state)
    stored = cast_for_storage(stored, quantized_formats(model), _own_dtype(model) if dtype == "auto" else dtype)
    with replace_directory(directory) as staging:
        write_config(staging, config, qconfig, getattr(model, "generation_config", None),
                     plain_dtype=_plain_float_dtype(model, stored))
        writer = ShardWriter(staging, max_shard_size)
        writer.add(stored)
        writer.close(aliases)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)


def load_state(directory: str, device="cpu", verify: bool = True) -> Dict[str, torch.Tensor]:
    """Every tensor of a saved directory (one file or shards), tied names
    restored; `verify` checks the CRC-32s saved with them (load_safetensors)."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, WEIGHTS_NAME)
    index = read_safetensors_index(directory)
    if index is not None:
        paths, weight_map, aliases = index
        state: Dict[str, torch.Tensor] = {}
        for path in paths:
            state.update(load_safetensors(path, device=device, verify=verify))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise MemboostError(f"{index_path!r} lists tensors its shards do not hold, e.g. {missing[:3]}")
        for alias, name in aliases.items():
            if name not in state:
                raise MemboostError(f"{index_path!r}: alias {alias!r} names a tensor that is not stored: {name!r}")
            state.setdefault(alias, state[name])
        return state
    if os.path.isfile(single):
        return load_safetensors(single, device=device, verify=verify)
    raise MemboostError(f"{directory!r} holds no {WEIGHTS_NAME} or {INDEX_NAME}")


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside create their parameters on the meta device (no
    memory); buffers (e.g. rotary frequencies, not saved) stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_quantized(directory: str, device="cpu", dtype: Optional[torch.dtype] = None, verify: bool = True):
    """The model saved by save_quantized, rebuilt from its config with
    transformers' AutoModelForCausalLM and loaded with assign=True, in eval
    mode, on `device`. `dtype` casts the unquantized tensors (norms,
    embeddings) and sets the compute dtype; quantized weights never change.
    `verify` checks every tensor against the CRC-32 saved with it and names a
    damaged one (folders saved before checksums load unchecked); False skips
    that extra read of the files."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise MemboostError(f"'directory' {directory!r} is not a folder")
    check_device(device)   # no GPU: said so, not a file error from the loader
    if not os.path.isfile(config_path):
        raise MemboostError(f"{directory!r} has no {CONFIG_NAME}: not a saved model")
    try:
        with open(config_path) as f:
            config_dict = json.load(f)
    except ValueError as exc:
        raise MemboostError(f"{config_path!r} is not valid JSON: {exc}") from None
    if not isinstance(config_dict, dict) or "quantization_config" not in config_dict:
        raise MemboostError(f"{config_path!r} has no quantization_config: not a memboost checkpoint")
    check_quantization_config(config_dict["quantization_config"], config_path)

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise MemboostError(f"{config_path!r}: transformers cannot build this architecture: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours: transformers must not try to apply it while building
    state = load_state(directory, device=device, verify=verify)
    with _parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            raise MemboostError(f"{config_path!r}: unsupported architecture: {exc}") from None
    try:
        missing, unexpected = load_quantized_(model, state, strict=False, assign=True)
    except (RuntimeError, MemboostError) as exc:  # a tensor whose shape disagrees with the config
        raise MemboostError(f"{directory!r} does not fit its config: {exc}") from None
    missing = [k for k in missing if not _is_tied_alias(model, k)]  # tied parameters the file holds once
    if missing or unexpected:
        raise MemboostError(f"{directory!r} does not fit its config: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}")
    qconfig = config_dict["quantization_config"]
    _check_modules(model, qconfig.get("modules"), directory)
    model.config.quantization_config = qconfig
    _restore_layer_options(model, qconfig)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)  # quantized weights are never cast (memboost.nn)
    return model.eval()


def _check_modules(model: nn.Module, modules, directory: str) -> None:
    """The layers the files made must be the ones quantization_config's
    'modules' lists, in its formats, as transformers' from_pretrained
    (memboost.integrations) requires: an edited config is refused by name."""
    if modules is None:
        return
    if not isinstance(modules, dict):
        raise MemboostError(f"{directory!r}: quantization_config 'modules' must map layer names to formats, "
                            f"got {modules!r}")
    loaded = {name: m.format for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, fmt in loaded.items():
        if name not in modules:
            raise MemboostError(f"{directory!r}: the checkpoint holds a quantized weight for layer {name!r}, "
                                "which quantization_config's 'modules' does not list")
        if modules[name] != fmt:
            raise MemboostError(f"{directory!r}: layer {name!r} holds a {fmt} weight, but quantization_config's "
                                f"'modules' makes it {modules[name]!r}: the weights do not fit the config")
    missing = sorted(set(modules) - set(loaded))
    if missing:
        raise MemboostError(f"{directory!r}: quantization_config lists {len(missing)} quantized layer(s) the "
                            f"checkpoint has no weight for, e.g. {missing[:3]}")


def _is_tied_alias(model: nn.Module, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    try:
        t = getattr(model.get_submodule(module_name), attr)
    except AttributeError:
        return False
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


def _restore_layer_options(model: nn.Module, qconfig: dict) -> None:
    """Layer options that are not tensors (act_bits) come back from the
    quantize_model calls recorded in the config."""
    for call in qconfig.get("quantize_calls") or []:
        params = call.get("params") if isinstance(call, dict) else None
        act_bits = params.get("act_bits") if isinstance(params, dict) else None
        if act_bits is None:
            continue
        for module in model.modules():
            # the int8 output layer (quantize_model's lm_head) takes the call's act_bits too
            if isinstance(module, QuantizedLinear) and module.format in (call.get("method"), call.get("lm_head")):
                if act_bits not in (8,):
                    raise MemboostError(f"quantization_config: act_bits {act_bits!r} is not supported (expected 8)")
                module.act_bits = act_bits
