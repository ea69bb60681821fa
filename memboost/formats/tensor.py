"""QuantizedTensor: the one container every format, layer, file and CLI talks
to. A quantized weight is a dict of plain tensors plus small JSON metadata,
so its state_dict is safe for safetensors and torch.load(weights_only=True)."""

import functools
import json
from typing import Dict, Optional, Type

import torch

from .. import ops
from ..errors import MemboostError, MemboostTypeError

FORMAT_INFO_KEY = "format_info"
# A low-rank corrector any format's weight may carry (memboost.heal): the
# weight is then W_codes + A @ B.T, A [out, r], B [in, r], stored in float16,
# or in int8 with one float16 scale per row of each factor (the *_scale tensors).
CORRECTOR_NAMES = ("corrector_A", "corrector_B", "corrector_A_scale", "corrector_B_scale")
CORRECTOR_BITS = (16, 8)
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
    optional_tensor_names: tuple = CORRECTOR_NAMES
    _formats: Dict[str, Type["QuantizedTensor"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.format:
            QuantizedTensor._formats[cls.format] = cls
        if "linear" in cls.__dict__:
            cls.linear = _checked_linear(cls.__dict__["linear"])
        if "linear_bound" in cls.__dict__:
            cls.linear_bound = _corrected_linear_bound(cls.__dict__["linear_bound"])
        if "dequantize" in cls.__dict__:
            cls.dequantize = _corrected_dequantize(cls.__dict__["dequantize"])

    def __init__(self, tensors: Dict[str, torch.Tensor], meta: dict):
        self.tensors = dict(tensors)
        self.meta = dict(meta)
        self._validate()
        self._validate_corrector()

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

    # -- the low-rank corrector (memboost.heal) ---------------------------------
    @property
    def corrector_rank(self) -> int:
        """Rank of the low-rank corrector this weight carries (0: none)."""
        a = self.tensors.get("corrector_A")
        return 0 if a is None else int(a.shape[1])

    @property
    def corrector_bits(self) -> int:
        """16 (float16 factors) or 8 (int8 factors with per-row scales); 0 without a corrector."""
        a = self.tensors.get("corrector_A")
        return 0 if a is None else (8 if a.dtype == torch.int8 else 16)

    def corrector(self, dtype: torch.dtype = torch.float32):
        """The corrector's factors (A [out, r], B [in, r]) in `dtype`, or None."""
        return corrector_factors(self.tensors, dtype)

    def with_corrector(self, a: torch.Tensor, b: torch.Tensor, bits: int = 16) -> "QuantizedTensor":
        """This weight plus the corrector A @ B.T (A [out, r], B [in, r], any
        float dtype), stored in `bits` (16: float16; 8: int8 with a float16
        scale per row of each factor); replaces a corrector it had."""
        tensors = {k: v for k, v in self.tensors.items() if k not in CORRECTOR_NAMES}
        tensors.update(encode_corrector(a, b, bits, tuple(self.shape)))
        return type(self)(tensors, self.meta)

    def without_corrector(self) -> "QuantizedTensor":
        """The same codes without a corrector (no copy)."""
        return type(self)._wrap({k: v for k, v in self.tensors.items() if k not in CORRECTOR_NAMES}, self.meta)

    def _validate_corrector(self) -> None:
        validate_corrector(self.tensors, tuple(self.shape))

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
        names = self.tensor_names + tuple(k for k in self.optional_tensor_names if k in self.tensors)
        return {**{k: self.tensors[k] for k in names}, FORMAT_INFO_KEY: encode_json(info)}

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
            names = cls.tensor_names + tuple(k for k in cls.optional_tensor_names if k in state)
            return cls({k: state[k] for k in names}, info)
        except MemboostError as exc:
            if not where:
                raise
            raise type(exc)(f"{where}{exc}") from None

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._repr_fields().items())
        if self.corrector_rank:
            extra += f"{', ' if extra else ''}corrector_rank={self.corrector_rank}, corrector_bits={self.corrector_bits}"
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
        if "corrector_A" in self.tensors:
            # the codes' product (through these same checks), then the corrector
            y = self.without_corrector().linear(x, bias, *args, **kwargs)
            return _add_corrector(y, x, *corrector_factors(self.tensors, torch.float32))
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


def encode_corrector(a: torch.Tensor, b: torch.Tensor, bits: int, shape: tuple) -> Dict[str, torch.Tensor]:
    """The stored tensors of a corrector A @ B.T for a weight of `shape`."""
    if bits not in CORRECTOR_BITS:
        raise MemboostError(f"'bits' of a corrector must be one of {CORRECTOR_BITS}, got {bits!r}")
    for name, t in (("a", a), ("b", b)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2):
            raise MemboostTypeError(f"'{name}' must be a 2-D floating-point tensor, got "
                                    f"{getattr(t, 'dtype', type(t).__name__)}")
    n, k = shape
    if a.shape[0] != n or b.shape[0] != k or a.shape[1] != b.shape[1] or a.shape[1] < 1:
        raise MemboostError(f"corrector factors must be A [{n}, r] and B [{k}, r] with r >= 1, got "
                            f"{list(a.shape)} and {list(b.shape)}")
    a, b = a.detach().float(), b.detach().float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise MemboostError("corrector factors must be finite")
    if bits == 16:
        return {"corrector_A": a.clamp(-65504, 65504).half(), "corrector_B": b.clamp(-65504, 65504).half()}
    out = {}
    for name, t in (("corrector_A", a), ("corrector_B", b)):
        scale = (t.abs().amax(1, keepdim=True) / 127).clamp_min(2 ** -24).half().float()
        out[name] = (t / scale).round().clamp(-127, 127).to(torch.int8)
        out[name + "_scale"] = scale.half()
    return out


def corrector_factors(tensors: Dict[str, torch.Tensor], dtype: torch.dtype):
    """(A, B) of a stored corrector in `dtype`, or None when there is none."""
    a, b = tensors.get("corrector_A"), tensors.get("corrector_B")
    if a is None:
        return None
    if a.dtype == torch.int8:
        a = a.float() * tensors["corrector_A_scale"].float()
        b = b.float() * tensors["corrector_B_scale"].float()
    return a.to(dtype), b.to(dtype)


def validate_corrector(tensors: Dict[str, torch.Tensor], shape: tuple) -> None:
    present = [k for k in CORRECTOR_NAMES if k in tensors]
    if not present:
        return
    a, b = tensors.get("corrector_A"), tensors.get("corrector_B")
    if a is None or b is None:
        raise MemboostError(f"a corrector needs both 'corrector_A' and 'corrector_B', got {present}")
    n, k = shape
    if not (a.dim() == 2 and b.dim() == 2 and a.shape[0] == n and b.shape[0] == k and a.shape[1] == b.shape[1]
            and a.shape[1] >= 1):
        raise MemboostError(f"corrector factors must be A [{n}, r] and B [{k}, r] with r >= 1, got "
                            f"{list(a.shape)} and {list(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.int8):
        raise MemboostError(f"corrector factors must both be float16 or both int8, got {a.dtype} and {b.dtype}")
    scaled = a.dtype == torch.int8
    for name, rows in (("corrector_A_scale", n), ("corrector_B_scale", k)):
        s = tensors.get(name)
        if scaled != (s is not None):
            raise MemboostError(f"'{name}' must be present exactly when the corrector factors are int8")
        if s is not None and (s.dtype != torch.float16 or tuple(s.shape) != (rows, 1)):
            raise MemboostError(f"'{name}' must be float16 of shape [{rows}, 1], got {s.dtype} {list(s.shape)}")


def _add_corrector(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y + (x @ B) @ A.T, in y's dtype."""
    if a.dtype != x.dtype:
        a, b = a.to(x.dtype), b.to(x.dtype)
    return y + ((x @ b) @ a.T).to(y.dtype)


def _corrected_linear_bound(linear_bound):
    """A format's linear_bound plus its corrector, when it has one: one more
    op (memboost::low_rank_linear) on the format op's output, reading float16
    factors as stored (int8 ones dequantized to float32 once, here)."""
    @functools.wraps(linear_bound)
    def bound(self, bias=None, act_bits=None):
        f = linear_bound(self, bias, act_bits)
        a = self.tensors.get("corrector_A")
        if a is None:
            return f
        if a.dtype == torch.float16:
            a, b = a.contiguous(), self.tensors["corrector_B"].contiguous()
        else:
            a, b = corrector_factors(self.tensors, torch.float32)
        return ops.low_rank_linear_bound(a, b, f)
    return bound


def _corrected_dequantize(dequantize):
    """A format's dequantize plus its corrector A @ B.T: the weight the layer applies."""
    @functools.wraps(dequantize)
    def corrected(self):
        w = dequantize(self)
        factors = corrector_factors(self.tensors, torch.float32)
        if factors is None:
            return w
        a, b = factors
        return (w.float() + a @ b.T).to(w.dtype)
    return corrected


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
