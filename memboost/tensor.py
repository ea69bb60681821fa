"""QuantizedTensor: the one container every format, layer, file and CLI talks
to. A quantized weight is a dict of plain tensors plus small JSON metadata,
so its state_dict is safe for safetensors and torch.load(weights_only=True)."""

import json
from typing import Dict, Optional, Type

import torch

FORMAT_INFO_KEY = "format_info"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_json(obj: dict) -> torch.Tensor:
    """JSON metadata as a uint8 tensor (what bitsandbytes does for its quant_state)."""
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode_json(t: torch.Tensor, what: str) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"'{what}' must be a 1-D uint8 tensor holding JSON, got {type(t).__name__}")
    try:
        obj = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"'{what}' does not hold valid JSON metadata: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"'{what}' must hold a JSON object, got {type(obj).__name__}")
    return obj


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype '{name}' in metadata; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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
    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement linear()")

    def _validate(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _validate()")

    # -- moving and saving ---------------------------------------------------
    def to(self, device) -> "QuantizedTensor":
        return type(self)._wrap({k: v.to(device) for k, v in self.tensors.items()}, self.meta)

    def cuda(self) -> "QuantizedTensor":
        return self.to("cuda")

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    def state_dict(self) -> Dict[str, torch.Tensor]:
        info = dict(self.meta, format=self.format, version=self.version)
        return {**{k: self.tensors[k] for k in self.tensor_names}, FORMAT_INFO_KEY: encode_json(info)}

    @staticmethod
    def from_state_dict(state: Dict[str, torch.Tensor]) -> "QuantizedTensor":
        """Rebuilds the right format from a state_dict(); validates everything."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
        if FORMAT_INFO_KEY not in state:
            raise ValueError(f"state_dict has no '{FORMAT_INFO_KEY}' entry (keys: {sorted(state)})")
        info = decode_json(state[FORMAT_INFO_KEY], FORMAT_INFO_KEY)
        fmt = info.pop("format", None)
        version = info.pop("version", None)
        cls = QuantizedTensor._formats.get(fmt)
        if cls is None:
            raise ValueError(f"unknown quantized format {fmt!r}; known: {sorted(QuantizedTensor._formats)}")
        if version != cls.version:
            raise ValueError(f"format '{fmt}' version {version!r} is not supported (this memboost reads {cls.version})")
        missing = [k for k in cls.tensor_names if k not in state]
        if missing:
            raise ValueError(f"state_dict for format '{fmt}' is missing {missing}")
        return cls({k: state[k] for k in cls.tensor_names}, info)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._repr_fields().items())
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"avg_bits={self.avg_bits:.3f}{', ' + extra if extra else ''})")

    def _repr_fields(self) -> dict:
        return {}
