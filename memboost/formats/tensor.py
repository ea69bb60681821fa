"""QuantizedTensor: the one container every format, layer, file and CLI talks
to. A quantized weight is a dict of plain tensors plus small JSON metadata,
so its state_dict is safe for safetensors and torch.load(weights_only=True)."""

import functools
import json
from typing import Dict, Optional, Type

import torch

from ..errors import MemboostError, MemboostTypeError

FORMAT_INFO_KEY = "format_info"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_json(obj: dict) -> torch.Tensor:
    """JSON metadata as a uint8 tensor (what bitsandbytes does for its quant_state)."""
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


_MAX_JSON_BYTES = 1 << 20  # metadata is small; a larger blob is corrupt


def decode_json(t: torch.Tensor, what: str) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise MemboostError(f"'{what}' must be a 1-D torch.uint8 tensor holding JSON, got {got}")
    if t.numel() > _MAX_JSON_BYTES:
        raise MemboostError(f"'{what}' holds {t.numel()} bytes, more than metadata ever needs ({_MAX_JSON_BYTES})")
    try:
        obj = json.loads(t.cpu().numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MemboostError(f"'{what}' does not hold valid JSON metadata: {exc}") from None
    if not isinstance(obj, dict):
        raise MemboostError(f"'{what}' must hold a JSON object, got {type(obj).__name__}")
    return obj


def dtype_from_name(name: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise MemboostError(f"unsupported dtype {name!r} in metadata; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def check_output_dtype(dtype, what: str = "dtype") -> torch.dtype:
    """The dtypes a quantized weight dequantizes to (and its layers compute in)."""
    if dtype not in _DTYPES.values():
        raise MemboostTypeError(f"'{what}' must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class QuantizedTensor:
    """Base class of the quantized formats (a registry keyed by `format`).

    Subclasses set `format`, `version`, `tensor_names` and implement
    `dequantize`, `linear` and `_validate`.
    """

    format: str = ""
    version: int = 1
    tensor_names: tuple = ()
    _formats: Dict[str, Type["QuantizedTensor"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.format:
            QuantizedTensor._formats[cls.format] = cls
        if "linear" in cls.__dict__:
            cls.linear = _checked_linear(cls.__dict__["linear"])

    def __init__(self, tensors: Dict[str, torch.Tensor], meta: dict):
        self.tensors = dict(tensors)
        self.meta = dict(meta)
        self._validate()

    @classmethod
    def _wrap(cls, tensors: Dict[str, torch.Tensor], meta: dict) -> "QuantizedTensor":
        """Builds without validation: for hot paths over already-validated parts."""
        obj = cls.__new__(cls)
        obj.tensors, obj.meta = tensors, meta
        return obj

    # -- what it represents -------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.meta["shape"])

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the original (and dequantized) weight."""
        return dtype_from_name(self.meta["dtype"])

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    # -- what it costs -------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of everything state_dict() stores, metadata included."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight, counting every tensor and the metadata."""
        return 8.0 * self.nbytes / max(1, self.numel())

    # -- behaviour (format specific) ----------------------------------------
    # Abstract: every registered format defines these three.
    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement linear()")

    def linear_bound(self, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None):
        """x -> self.linear(x, bias, act_bits) for inference: call it under
        torch.inference_mode. Formats whose product is one op bind it with
        every argument but x (no per-call checks or wrappers: the decode
        loop's path); x must be what linear would pass on: its last dimension
        in_features, a float dtype the op takes."""
        linear = self.linear
        if act_bits is None:
            return lambda x: linear(x, bias)
        return lambda x: linear(x, bias, act_bits=act_bits)

    def _validate(self) -> None:
        """Raises MemboostError unless the tensors and metadata form a valid
        weight of this format, wherever the tensors live: the kernels index
        with them, so a corrupt file must never reach a kernel."""
        raise NotImplementedError(f"{type(self).__name__} must implement _validate()")

    # -- moving and saving ---------------------------------------------------
    def to(self, *args, **kwargs) -> "QuantizedTensor":
        """Moves the packed tensors to a device. A dtype (torch.float16,
        torch.bfloat16 or torch.float32) changes only the dtype dequantize()
        returns; the packed codes and scales are never cast. Takes what
        torch.Tensor.to takes: `.to("cuda")`, `.to(torch.float16)`,
        `.to("cuda", torch.bfloat16)`, `.to(device=..., dtype=...)`."""
        device, dtype = _parse_to_args(args, kwargs)
        meta = self.meta if dtype is None else dict(self.meta, dtype=dtype_name(check_output_dtype(dtype)))
        tensors = self.tensors if device is None else {k: v.to(device) for k, v in self.tensors.items()}
        return type(self)._wrap(dict(tensors), meta)

    def cuda(self) -> "QuantizedTensor":
        return self.to("cuda")

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    def state_dict(self) -> Dict[str, torch.Tensor]:
        info = dict(self.meta, format=self.format, version=self.version)
        return {**{k: self.tensors[k] for k in self.tensor_names}, FORMAT_INFO_KEY: encode_json(info)}

    @staticmethod
    def from_state_dict(state: Dict[str, torch.Tensor], name: str = "") -> "QuantizedTensor":
        """Rebuilds the right format from a state_dict(); validates everything,
        on whatever device the tensors are. `name` (e.g. the layer's
        qualified name) prefixes every error message."""
        where = f"{name}: " if name else ""
        if not isinstance(state, dict):
            raise MemboostTypeError(f"{where}state must be a dict of tensors, got {type(state).__name__}")
        if FORMAT_INFO_KEY not in state:
            raise MemboostError(f"{where}state_dict has no '{FORMAT_INFO_KEY}' entry (keys: {sorted(state)[:8]})")
        try:
            info = decode_json(state[FORMAT_INFO_KEY], FORMAT_INFO_KEY)
            fmt = info.pop("format", None)
            version = info.pop("version", None)
            cls = QuantizedTensor._formats.get(fmt) if isinstance(fmt, str) else None
            if cls is None:
                raise MemboostError(f"unknown quantized format {fmt!r}; known: {sorted(QuantizedTensor._formats)}")
            if version != cls.version:
                newer = isinstance(version, int) and version > cls.version
                raise MemboostError(f"format '{fmt}' version {version!r} is not supported (this memboost reads "
                                    f"version {cls.version}{'; upgrade memboost' if newer else ''})")
            missing = [k for k in cls.tensor_names if k not in state]
            if missing:
                raise MemboostError(f"state_dict for format '{fmt}' is missing {missing}")
            return cls({k: state[k] for k in cls.tensor_names}, info)
        except MemboostError as exc:
            if not where:
                raise
            raise type(exc)(f"{where}{exc}") from None

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._repr_fields().items())
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"avg_bits={self.avg_bits:.3f}{', ' + extra if extra else ''})")

    def _repr_fields(self) -> dict:
        return {}


def _checked_linear(linear):
    """Every format's linear(x, bias, ...) behind the same two rules: an x
    whose last dimension is not in_features is refused by name, and a
    float64 x is computed in float32 and returned as float64, as the layers
    (memboost.nn.QuantizedLinear) and bitsandbytes' Linear4bit do (the
    input cast to the compute dtype, the output cast back)."""
    @functools.wraps(linear)
    def checked(self, x, bias=None, *args, **kwargs):
        if isinstance(x, torch.Tensor):
            shape = self.meta["shape"]  # a list: self.shape builds a torch.Size, on every call of every layer
            if len(shape) == 2 and (x.dim() == 0 or x.shape[-1] != shape[1]):
                raise MemboostError(f"'x' must have last dimension in_features={shape[1]}, got shape "
                                    f"{list(x.shape)}")
            if x.dtype == torch.float64:
                bias = bias.float() if isinstance(bias, torch.Tensor) and bias.dtype == torch.float64 else bias
                return linear(self, x.float(), bias, *args, **kwargs).double()
        return linear(self, x, bias, *args, **kwargs)
    return checked


def _parse_to_args(args, kwargs):
    """(device or None, dtype or None) from torch.Tensor.to-style arguments."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    kwargs.pop("non_blocking", None), kwargs.pop("copy", None)
    if kwargs:
        raise MemboostTypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device, int)):
            device = arg
        elif isinstance(arg, torch.Tensor):
            device = arg.device
        else:
            raise MemboostTypeError(f"to() takes a device and/or a dtype, got {type(arg).__name__}")
    return device, dtype
