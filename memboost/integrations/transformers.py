"""memboost as a transformers quantization method (quant_method "memboost").

After `import memboost` (see memboost.integrations for how registration is
deferred until transformers loads its quantizer registry):

    AutoModelForCausalLM.from_pretrained(saved_dir)       # a folder from save_quantized / save_pretrained
    AutoModelForCausalLM.from_pretrained(float_dir,
        quantization_config=MemboostConfig(method="mixed", params={"ratio_4bit": 0.25}))

Pre-quantized loading: before the weights load, every layer named in the
config's `modules` becomes its format's QuantizedLinear around a placeholder
on the meta device, so each checkpoint key `<layer>.weight.<tensor>` has a
home. One WeightConverter per layer gathers the layer's tensors (their shapes
vary from layer to layer, e.g. the mixed format's outlier count, and float
tensors must keep their dtype), validates them as a QuantizedTensor and
installs it, as QuantizedWeight.load_state_dict would. The checkpoint's
headers are checked against the model first, so a layer whose shape or
format disagrees with the config is refused by name before anything loads.

Integrity: before anything loads, every tensor of the checkpoint's files is
checked against the CRC-32 save_quantized recorded with it (a damaged one is
named, file and tensor); transformers then reads the same bytes. The
environment variable MEMBOOST_VERIFY=0 skips this extra read (from_pretrained
has no argument that reaches a quantizer).

On-the-fly quantization loads the float weights as usual, then runs
memboost.quantize_model with the config's method, params and skip.
"""

from typing import Dict, Iterable, List, Optional

import torch
import transformers
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..io.checkpoint import QUANT_METHOD, check_quantization_config, quantization_config
from ..errors import MemboostError, MemboostTypeError
from ..model.quantize import _as_linear, _linears, quantize_model
from ..nn import QuantizedLinear, QuantizedWeight
from ..formats.tensor import FORMAT_INFO_KEY, QuantizedTensor

__all__ = ["MemboostConfig", "MemboostHfQuantizer", "register"]

# The transformers releases this integration is tested with (pyproject's `hf` extra pins the same).
TESTED_TRANSFORMERS = ">=5.23,<5.24"

_SAVED_KEYS = ("format_versions", "memboost_version", "modules", "quantize_calls")


class MemboostConfig(QuantizationConfigMixin):
    """quantization_config for memboost.

    To quantize while loading: `method` (a memboost format, i.e. a
    quantize_model method: "mixed", ...), `params` (that format's quantizer
    arguments, e.g. {"ratio_4bit": 0.25}) and `skip` (names of layers kept in
    float, default ["lm_head"]).

    A quantized model's config (what save_quantized writes into config.json)
    also has `format_versions`, `memboost_version`, `modules` ({layer name:
    format}) and `quantize_calls` (quantize_model's arguments); to_dict() then
    returns exactly that dictionary, and a config read from a checkpoint
    round-trips. A format version this memboost cannot read is refused.
    """

    def __init__(self, method="mixed", params: Optional[dict] = None, skip: Iterable[str] = ("lm_head",),
                 format_versions: Optional[Dict[str, int]] = None, memboost_version: Optional[str] = None,
                 modules: Optional[Dict[str, str]] = None, quantize_calls: Optional[List[dict]] = None,
                 quant_method: str = QUANT_METHOD, **unknown):
        if quant_method != QUANT_METHOD:
            raise MemboostError(f"quantization_config has quant_method {quant_method!r}, not {QUANT_METHOD!r}: "
                                "MemboostConfig reads only memboost checkpoints")
        if unknown:
            raise MemboostError(f"quantization_config (memboost) has unknown key(s) {sorted(unknown)}; known: "
                                f"method, params, skip, {', '.join(_SAVED_KEYS)} (written by a newer memboost? "
                                "upgrade memboost)")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.params = {} if params is None else params
        self.skip = [skip] if isinstance(skip, str) else list(skip)
        self.format_versions = format_versions
        self.memboost_version = memboost_version
        self.modules = modules
        self.quantize_calls = quantize_calls
        self.post_init()

    @property
    def is_quantized(self) -> bool:
        """True for the config of a quantized model (it lists the quantized layers)."""
        return self.modules is not None

    def post_init(self) -> None:
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise MemboostTypeError(f"quantization_config 'params' must be a dict of the format's quantizer "
                                    f"arguments (e.g. {{'ratio_4bit': 0.25}}), got {self.params!r}")
        plain = (type(None), bool, int, float, str)
        odd = sorted(k for k, v in self.params.items() if not isinstance(v, plain))
        if odd:
            raise MemboostTypeError(f"quantization_config 'params' {odd} must be numbers, strings, booleans or None "
                                    "(it is saved in config.json); to calibrate, run memboost.calibrate and "
                                    "memboost.quantize_model on the loaded model")
        if not all(isinstance(s, str) for s in self.skip):
            raise MemboostTypeError(f"quantization_config 'skip' must be a list of layer names, got {self.skip!r}")
        if not self.is_quantized:
            if any(getattr(self, k) is not None for k in _SAVED_KEYS):
                raise MemboostError("quantization_config (memboost) has "
                                    f"{[k for k in _SAVED_KEYS if getattr(self, k) is not None]} but no 'modules'")
            if not isinstance(self.method, str):
                raise MemboostTypeError(f"quantization_config 'method' must be a format name, got {self.method!r}")
            QuantizedLinear.for_format(self.method)  # unknown method: MemboostError listing the known ones
            return
        check_quantization_config(self.to_dict(), "quantization_config")
        modules = self.modules
        if not isinstance(modules, dict) or not modules or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in modules.items()):
            raise MemboostError(f"quantization_config 'modules' must map layer names to formats, got {modules!r}")
        unversioned = sorted(set(modules.values()) - set(self.format_versions))
        if unversioned:
            raise MemboostError(f"quantization_config 'modules' uses format(s) {unversioned} that "
                                "'format_versions' does not list")
        if self.quantize_calls is not None and not isinstance(self.quantize_calls, list):
            raise MemboostError(f"quantization_config 'quantize_calls' must be a list, got {self.quantize_calls!r}")

    def to_dict(self) -> dict:
        if self.is_quantized:  # exactly memboost.io.checkpoint.quantization_config(model)
            return {"quant_method": QUANT_METHOD, "method": self.method, "format_versions": dict(self.format_versions),
                    "memboost_version": self.memboost_version, "modules": dict(self.modules),
                    "quantize_calls": [dict(c) for c in (self.quantize_calls or [])]}
        return {"quant_method": QUANT_METHOD, "method": self.method, "params": dict(self.params),
                "skip": list(self.skip)}

    def _record(self, saved: dict) -> None:
        """Takes over quantization_config(model) after quantizing on the fly."""
        self.method = saved["method"]
        for key in _SAVED_KEYS:
            setattr(self, key, saved[key])
        self.post_init()


def _resolve_module(model: nn.Module, name: str):
    """(name in `model`, module) for a layer name saved from a model that had
    or lacked the base-model prefix (e.g. "model." of a *ForCausalLM)."""
    candidates = [name]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    raise MemboostError(f"quantization_config names layer {name!r}, which {type(model).__name__} built from this "
                        "config does not have")


def _head_of_another_model(model: nn.Module, name: str) -> bool:
    """A layer outside the base model (the int8 lm_head of a *ForCausalLM
    checkpoint) while `model` is that base model (AutoModel): transformers
    drops the head's weights, and so does memboost."""
    prefix = getattr(model, "base_model_prefix", "")
    is_base = bool(prefix) and not isinstance(getattr(model, prefix, None), nn.Module)
    return is_base and not name.startswith(prefix + ".") and not _has_module(model, name)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _placeholder(fmt: str, linear: nn.Linear) -> QuantizedLinear:
    """A `fmt` layer of `linear`'s shape whose tensors are empty on the meta
    device: the loader replaces them with the checkpoint's."""
    layer_cls = QuantizedLinear.for_format(fmt)
    format_cls = QuantizedTensor._formats[fmt]
    empty = {n: torch.empty(0, dtype=torch.uint8, device="meta") for n in format_cls.tensor_names}
    qtensor = format_cls._wrap(empty, {"shape": list(linear.weight.shape), "dtype": "float32"})
    bias = None if linear.bias is None else torch.empty_like(linear.bias, device="meta")
    return layer_cls.from_quantized(qtensor, bias)


def _read_format_infos(checkpoint_files: List[str]) -> Dict[str, dict]:
    """{key: decoded format_info} for the quantized weights the safetensors files hold."""
    from ..io.serialization import open_safetensors
    from ..formats.tensor import decode_json

    infos: Dict[str, dict] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            continue
        with open_safetensors(str(path)) as f:
            for key in f.keys():
                if key.endswith("." + FORMAT_INFO_KEY):
                    infos[key] = decode_json(f.get_tensor(key), f"{path}: {key}")
    return infos


_DESERIALIZE_CLS = None


def _deserialize_op_class():
    # transformers.core_model_loading is imported here, not at module level:
    # registration runs while transformers is still importing modeling_utils.
    global _DESERIALIZE_CLS
    if _DESERIALIZE_CLS is not None:
        return _DESERIALIZE_CLS
    from transformers.core_model_loading import ConversionOps

    class MemboostDeserialize(ConversionOps):
        """Gathers one layer's `weight.<tensor>` entries, validates them as a
        QuantizedTensor and installs it in the layer's QuantizedWeight; returns
        the installed buffers so the loader marks them loaded."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer  # its presence tells the loader not to cast these tensors

        def __deepcopy__(self, memo):  # one per layer is copied; nothing in it is per layer
            return self

        def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                    **kwargs):
            weight_name = full_layer_name[:-len("." + FORMAT_INFO_KEY)]  # "<layer>.weight"
            layer_name = weight_name[:-len(".weight")]
            module = model.get_submodule(weight_name)
            try:
                if not isinstance(module, QuantizedWeight):
                    raise MemboostError(f"{layer_name}: the checkpoint holds a quantized weight for a layer that "
                                        "quantization_config's 'modules' does not list")
                state = {}
                for pattern, tensors in input_dict.items():
                    if len(tensors) != 1:
                        raise MemboostError(f"{layer_name}: {len(tensors)} tensors for '{pattern}'")
                    state[pattern[len("weight."):]] = tensors[0]
                qtensor = QuantizedTensor.from_state_dict(state, name=layer_name)
                if qtensor.format != module._format_cls.format or tuple(qtensor.shape) != tuple(module.shape):
                    raise MemboostError(f"{layer_name}: the checkpoint holds a {qtensor.format} weight of shape "
                                        f"{list(qtensor.shape)}; the config makes it a {module._format_cls.format} "
                                        f"layer of shape {list(module.shape)}")
            except MemboostError as exc:
                # transformers would turn an exception here into a generic RuntimeError; the layer
                # stays unloaded and _process_model_after_weight_loading raises this, by name
                self.hf_quantizer._errors.append(str(exc))
                return {}
            module._set(qtensor)
            # the metadata tensor is made on the CPU; keep it with the loaded tensors (device_map)
            device = state[FORMAT_INFO_KEY].device
            module._buffers[FORMAT_INFO_KEY] = module._buffers[FORMAT_INFO_KEY].to(device)
            self.hf_quantizer._installed.add(layer_name)
            return {f"{weight_name}.{n}": t for n, t in module._buffers.items()}

    _DESERIALIZE_CLS = MemboostDeserialize
    return _DESERIALIZE_CLS


class MemboostHfQuantizer(HfQuantizer):
    """transformers' side of memboost: pre-quantized loading and quantization while loading."""

    requires_calibration = False

    def __init__(self, quantization_config: MemboostConfig, **kwargs):
        if not isinstance(quantization_config, MemboostConfig):
            raise MemboostTypeError(f"MemboostHfQuantizer needs a MemboostConfig, got "
                                    f"{type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self._installed = set()
        self._errors: List[str] = []
        self._placeholders: Dict[str, str] = {}  # layer name in the model -> format

    def validate_environment(self, device_map=None, **kwargs) -> None:
        config = self.quantization_config
        if self.pre_quantized and not config.is_quantized:
            raise MemboostError("the checkpoint's quantization_config (memboost) lists no quantized layers "
                                "('modules'): not a model saved by memboost")
        if not self.pre_quantized and config.is_quantized:
            raise MemboostError("quantization_config describes an already quantized model ('modules'); to quantize "
                                "while loading pass MemboostConfig(method=..., params=...)")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise MemboostError("memboost layers cannot be offloaded to disk: remove 'disk' from the device_map")

    # -- pre-quantized checkpoints --------------------------------------------
    @property
    def serialized_names(self):
        if not self.pre_quantized or not self.quantization_config.is_quantized:
            return {}
        names = set()
        for fmt in set(self.quantization_config.modules.values()):
            names.update(QuantizedTensor._formats[fmt].tensor_names)
            names.update(QuantizedTensor._formats[fmt].optional_tensor_names)  # a corrector (memboost.heal)
        sources = [f"weight.{n}" for n in sorted(names)] + [f"weight.{FORMAT_INFO_KEY}"]
        return {f"weight.{FORMAT_INFO_KEY}": sources}

    def get_load_operations(self) -> dict:
        return {"deserialize": _deserialize_op_class()}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        linears = {full: (parent, child_name, child) for full, parent, child_name, child in _linears(model)}
        replacements = []
        for saved_name, fmt in self.quantization_config.modules.items():
            if _head_of_another_model(model, saved_name):
                continue
            name, _ = _resolve_module(model, saved_name)
            if name not in linears:
                raise MemboostError(f"quantization_config names layer {saved_name!r}, which is not a linear layer of "
                                    f"{type(model).__name__} built from this config")
            parent, child_name, child = linears[name]
            replacements.append((name, parent, child_name, _placeholder(fmt, _as_linear(child)), fmt))
        if checkpoint_files:
            self._check_checkpoint(model, checkpoint_files, {name: layer for name, _, _, layer, _ in replacements})
        for name, parent, child_name, layer, fmt in replacements:
            setattr(parent, child_name, layer)
            self._placeholders[name] = fmt
        model.memboost_quantization = list(self.quantization_config.quantize_calls or [])
        return model

    def _check_checkpoint(self, model, checkpoint_files, layers: Dict[str, QuantizedLinear]) -> None:
        """Every quantized weight the files hold must fit its layer (format and shape), and every layer must have one."""
        import os

        from ..io.serialization import FileChecksums

        where = os.path.dirname(str(checkpoint_files[0]))
        infos = _read_format_infos(checkpoint_files)  # checks each file's header first
        if os.environ.get("MEMBOOST_VERIFY", "1") != "0":
            for path in checkpoint_files:
                if str(path).endswith(".safetensors"):
                    FileChecksums(str(path)).verify()
        found = set()
        for key, info in infos.items():
            saved_name = key[:-len(f".weight.{FORMAT_INFO_KEY}")]
            if _head_of_another_model(model, saved_name):
                continue
            try:
                name, _ = _resolve_module(model, saved_name)
            except MemboostError:
                name = saved_name
            layer = layers.get(name)
            if layer is None:
                raise MemboostError(f"{where!r}: the checkpoint holds a quantized weight for layer {saved_name!r}, "
                                    "which quantization_config's 'modules' does not list")
            fmt, shape, version = info.get("format"), info.get("shape"), info.get("version")
            known = QuantizedTensor._formats.get(fmt)
            if known is not None and version != known.version:
                newer = isinstance(version, int) and version > known.version
                raise MemboostError(f"{where!r}: layer {saved_name!r} holds format {fmt!r} version {version!r}, "
                                    f"which this memboost does not read (it reads version {known.version}"
                                    f"{'; upgrade memboost' if newer else ''})")
            if fmt != layer.format or shape != list(layer.weight.shape):
                raise MemboostError(f"{where!r}: layer {saved_name!r} holds a {fmt} weight of shape {shape}, but the "
                                    f"model built from config.json has a {layer.format} layer of shape "
                                    f"{list(layer.weight.shape)}: the weights do not fit the config")
            found.add(name)
        if infos or any(str(p).endswith(".safetensors") for p in checkpoint_files):
            missing = sorted(set(layers) - found)
            if missing:
                raise MemboostError(f"{where!r}: quantization_config lists {len(missing)} quantized layer(s) the "
                                    f"checkpoint has no weight for, e.g. {missing[:3]}")

    # -- after the weights --------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            if self._errors:
                more = f" (and {len(self._errors) - 1} more layer(s))" if len(self._errors) > 1 else ""
                raise MemboostError(f"invalid quantized weight in the checkpoint: {self._errors[0]}{more}")
            missing = sorted(set(self._placeholders) - self._installed)
            if missing:
                raise MemboostError(f"no quantized weight was loaded for {len(missing)} layer(s) that "
                                    f"quantization_config lists, e.g. {missing[:3]}")
            # The keys were loaded under their own names: save_pretrained has nothing to convert back.
            op_cls = _deserialize_op_class()
            conversions = getattr(model, "_weight_conversions", None)
            if conversions:
                model._weight_conversions = [c for c in conversions
                                             if not any(isinstance(op, op_cls) for op in getattr(c, "operations", ()))]
            return model
        quantize_model(model, config.method, skip=config.skip, progress=False, **config.params)
        config._record(quantization_config(model))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False  # the quantized weights are frozen buffers; only bias/other parameters would train


_REGISTERED = False


def register() -> None:
    """Registers MemboostConfig and MemboostHfQuantizer with transformers
    under "memboost" (idempotent; import memboost does this when transformers loads)."""
    global _REGISTERED
    if _REGISTERED:
        return
    if not hasattr(HfQuantizer, "get_load_operations"):  # the 5.x weight-loading API this builds on
        raise MemboostError(f"transformers {transformers.__version__} is too old for memboost's integration "
                            f"(tested with transformers{TESTED_TRANSFORMERS})")
    for mapping, cls, register_fn in ((AUTO_QUANTIZATION_CONFIG_MAPPING, MemboostConfig, register_quantization_config),
                                      (AUTO_QUANTIZER_MAPPING, MemboostHfQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            register_fn(QUANT_METHOD)(cls)
        elif current is not cls:
            raise MemboostError(f"transformers already has a {QUANT_METHOD!r} quantization registered "
                                f"({current.__module__}.{current.__qualname__})")
    _REGISTERED = True


register()
