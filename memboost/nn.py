"""Drop-in nn.Linear replacements over QuantizedTensor, one small class per
format on a shared base.

A layer keeps its quantized weight in a QuantizedWeight child module whose
buffers are the QuantizedTensor's state_dict, so `.to(device)`,
`state_dict()` and `load_state_dict()` work as for any module and the keys
are `weight.<tensor>` plus `weight.format_info` (safetensors-safe).

Casting a model (`model.half()`, `.float()`, `.to(torch.bfloat16)`) never
touches the packed weight: floating buffers (scales, outlier values) are
held as integer views of the same bits, which PyTorch's casts skip (they
only cast floating tensors), and viewed back, without a copy, when the
weight is used or saved. A cast changes only the compute dtype, which
follows the input (bitsandbytes' and torchao's layers behave the same).
"""

import math
import operator
from typing import Dict, List, Optional, Type

import torch
from torch import nn

from .errors import MemboostError, MemboostTypeError
from .formats.mixed import MixedQuantizedTensor, quantize
from .formats.nf4 import NF4QuantizedTensor
from .formats.nf4 import quantize as _nf4_quantize
from .formats.ternary import EPS as TERNARY_EPS, TernaryQuantizedTensor, check_act_bits
from .formats.ternary import quantize as ternary_quantize
from .formats.int8 import Int8QuantizedTensor, quantize as _int8_quantize, skip_reason as _int8_skip_reason
from .formats.lort import LoRTQuantizedTensor, decompose as lort_decompose, resolve_rank as resolve_lort_rank
from .formats.tensor import FORMAT_INFO_KEY, QuantizedTensor, check_output_dtype, decode_json

# Same-width integer views of the floating dtypes a quantized state holds.
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class QuantizedWeight(nn.Module):
    def __init__(self, qtensor: QuantizedTensor):
        super().__init__()
        self._set(qtensor)
        self.register_state_dict_post_hook(QuantizedWeight._float_views_in_state_dict)

    def _set(self, qtensor: QuantizedTensor) -> None:
        self._view = None
        for name in list(self._buffers):  # a replaced weight may hold fewer tensors (no corrector)
            del self._buffers[name]
        self._format_cls = type(qtensor)
        self._meta = dict(qtensor.meta)
        self._float_dtypes: Dict[str, torch.dtype] = {}
        for name, t in qtensor.state_dict().items():
            if t.is_floating_point():
                self._float_dtypes[name] = t.dtype
                t = t.view(_INT_VIEW[t.dtype])
            self.register_buffer(name, t)

    def _stored(self, name: str) -> torch.Tensor:
        t = getattr(self, name)
        dtype = self._float_dtypes.get(name)
        return t if dtype is None else t.view(dtype)

    @staticmethod
    def _float_views_in_state_dict(module, state_dict, prefix, local_metadata) -> None:
        for name, dtype in module._float_dtypes.items():
            key = prefix + name
            if key in state_dict:
                state_dict[key] = state_dict[key].view(dtype)

    def tensor(self) -> QuantizedTensor:
        """The QuantizedTensor view of the buffers (no copy, no re-validation).
        A layer's forward reads it on every call, and reading the buffers
        through nn.Module's attribute lookup costs microseconds, so the view
        is kept with the buffer objects it was built from and rebuilt only
        when one of them was replaced (`.to()`, load_state_dict, assignment,
        or a loader writing `_buffers` directly)."""
        buffers = tuple(self._buffers.values())
        cached = self._view
        if cached is not None and len(cached[0]) == len(buffers) and all(map(operator.is_, cached[0], buffers)):
            return cached[1]
        cls = self._format_cls
        # the format's tensors, and the optional ones (a corrector) this weight holds
        view = cls._wrap({name: self._stored(name) for name in self._buffers if name != FORMAT_INFO_KEY}, self._meta)
        self._view = (buffers, view)
        return view

    def _apply(self, fn, recurse=True):
        self._view = None  # holds the old buffers: drop them with the move
        return super()._apply(fn, recurse)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._meta["shape"])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor().dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, FORMAT_INFO_KEY).device

    def dequantize(self) -> torch.Tensor:
        return self.tensor().dequantize()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Shapes legitimately change between weights (outlier counts), so the
        # incoming tensors replace the buffers instead of being copied into them.
        required = list(self._format_cls.tensor_names) + [FORMAT_INFO_KEY]
        names = required + list(self._format_cls.optional_tensor_names)
        present = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        missing = [prefix + n for n in required if n not in present]
        if strict:
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):] not in names and "." not in k[len(prefix):])
        if missing:
            missing_keys.extend(missing)
            return
        layer = prefix[:-1] or "weight"
        try:
            # Integer views of floating tensors (a state_dict taken with
            # keep_vars, or one a caller built from the buffers) are read back.
            present = {n: (t.view(self._float_dtypes[n]) if n in self._float_dtypes and not t.is_floating_point()
                           and t.element_size() == self._float_dtypes[n].itemsize else t)
                       for n, t in present.items()}
            info = decode_json(present[FORMAT_INFO_KEY], prefix + FORMAT_INFO_KEY)
            qtensor = QuantizedTensor.from_state_dict(present, name=layer)
        except MemboostError as exc:
            error_msgs.append(str(exc) if str(exc).startswith(layer) else f"{layer}: {exc}")
            return
        if info.get("shape") != self._meta.get("shape"):
            error_msgs.append(f"{layer}: quantized weight of shape {info.get('shape')} does not fit a layer of "
                              f"shape {self._meta.get('shape')}")
            return
        device = self.device
        self._set(qtensor if device.type == "meta" else qtensor.to(device))

    def extra_repr(self) -> str:
        return f"format={self._format_cls.format}, shape={tuple(self.shape)}"


class QuantizedLinear(nn.Module):
    """Base of the drop-in nn.Linear layers: y = x @ W.T + bias with W held
    in one quantized format. Subclasses set `format` (the QuantizedTensor
    format, also quantize_model's `method`) and implement `quantize_weight`.

    compute_dtype: None (default) computes in the input's dtype (float32 for
    a float64 input); torch.float16/bfloat16/float32 casts the input to it,
    and the output back to the input's dtype.
    act_bits: None computes exactly in float; 8 lets the CPU kernels multiply
    int8 activations with the integer codes (faster, a small stated error;
    see each format's linear()).
    """

    format: str = ""
    _layers: Dict[str, Type["QuantizedLinear"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.format:
            QuantizedLinear._layers[cls.format] = cls

    @staticmethod
    def for_format(name: str) -> Type["QuantizedLinear"]:
        """The layer class of a format (quantize_model's `method`)."""
        if name not in QuantizedLinear._layers:
            raise MemboostError(f"unknown method {name!r}; expected one of {sorted(QuantizedLinear._layers)}")
        return QuantizedLinear._layers[name]

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, **params) -> QuantizedTensor:
        """The format's quantizer for a weight [out, in] (keyword parameters only)."""
        raise NotImplementedError(f"{cls.__name__} must implement quantize_weight()")

    @classmethod
    def skip_reason(cls, in_features: int, out_features: int, **params) -> Optional[str]:
        """Why a linear of this shape cannot take the format with these
        parameters (None: it can). quantize_model reports it and moves on."""
        return None

    @classmethod
    def fitting_hint(cls, in_features: List[int], **params) -> str:
        """What would fit layers of these input sizes when skip_reason refused
        them all with `params` ('' when there is nothing to suggest)."""
        return ""

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_bits: Optional[int] = None,
                    compute_dtype: Optional[torch.dtype] = None, **params) -> "QuantizedLinear":
        """Quantizes `linear`'s weight with the format's quantizer (its keyword
        arguments); act_bits and compute_dtype are the layer's options."""
        if not isinstance(linear, nn.Linear):
            raise MemboostTypeError(f"'linear' must be an nn.Linear, got {type(linear).__name__}")
        return cls.from_quantized(cls.quantize_weight(linear.weight.detach(), **params), linear.bias,
                                  compute_dtype=compute_dtype, act_bits=act_bits)

    @classmethod
    def from_quantized(cls, qtensor: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                       compute_dtype: Optional[torch.dtype] = None,
                       act_bits: Optional[int] = None) -> "QuantizedLinear":
        """A layer around an existing quantized weight [out, in] (and a copy of `bias`)."""
        if cls.format and getattr(qtensor, "format", None) != cls.format:
            raise MemboostTypeError(f"'qtensor' must be a {cls.format} QuantizedTensor, got {type(qtensor).__name__}")
        out_features, in_features = qtensor.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise MemboostError(f"'bias' must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls.__new__(cls)
        QuantizedLinear._init(layer, qtensor, bias, compute_dtype, act_bits)
        return layer

    def _init(self, qtensor: QuantizedTensor, bias: Optional[torch.Tensor], compute_dtype,
              act_bits: Optional[int] = None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = qtensor.shape
        self.weight = QuantizedWeight(qtensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = None if compute_dtype is None else check_output_dtype(compute_dtype, "compute_dtype")
        if act_bits not in (None, 8):
            raise MemboostError(f"'act_bits' must be None (exact) or 8, got {act_bits!r}")
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or (x.dtype if x.dtype in _INT_VIEW else torch.float32)
        xc = x if x.dtype == dtype else x.to(dtype)
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        y = self._linear(self.weight.tensor(), xc, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def linear_bound(self, dtype: torch.dtype):
        """x -> self(x) for inputs of `dtype`, to be called under
        torch.inference_mode (memboost.runtime's decode loop): the format's op
        with every argument but x bound (QuantizedTensor.linear_bound) where
        forward would only pass x through; the layer itself where it has work
        of its own: casts to a compute dtype, a LoRA branch (_linear
        overridden), hooks."""
        compute = self.compute_dtype or (dtype if dtype in _INT_VIEW else torch.float32)
        bias = self.bias
        if (type(self)._linear is not QuantizedLinear._linear or compute != dtype
                or (bias is not None and bias.dtype != dtype) or self._forward_hooks or self._forward_pre_hooks):
            return self
        return self.weight.tensor().linear_bound(bias, self.act_bits)

    def _linear(self, qtensor: QuantizedTensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The format's fused product; a layer with options of its own (a LoRA
        branch) overrides this, not forward."""
        if self.act_bits is None:
            return qtensor.linear(x, bias)
        return qtensor.linear(x, bias, act_bits=self.act_bits)

    def extra_repr(self) -> str:
        q = self.weight.tensor()
        fields = ", ".join(f"{k}={v}" for k, v in q._repr_fields().items())
        act = "" if self.act_bits is None else f", act_bits={self.act_bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{fields + ', ' if fields else ''}avg_bits={q.avg_bits:.3f}{act}")


class MixedLinear(QuantizedLinear):
    """nn.Linear with a mixed 2/4/16-bit weight; forward runs the fused kernel."""

    format = "mixed"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 64,
                 ratio_4bit: float = 0.1, dtype: torch.dtype = torch.float16, device=None):
        qtensor = MixedQuantizedTensor.zeros((out_features, in_features), dtype=dtype, group_size=group_size,
                                             ratio_4bit=ratio_4bit, device=device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._init(qtensor, b, None, None)

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, **params) -> MixedQuantizedTensor:
        return quantize(weight, **params)

    @classmethod
    def skip_reason(cls, in_features: int, out_features: int, group_size: int = 64, **params) -> Optional[str]:
        if isinstance(group_size, int) and group_size > 0 and in_features % group_size:
            return f"group_size {group_size} does not divide in_features {in_features}"
        return None

    @classmethod
    def fitting_hint(cls, in_features: List[int], **params) -> str:
        common = math.gcd(*in_features)
        sizes = [g for g in range(16, common + 1, 16) if common % g == 0]
        if not sizes:
            return f"no group_size fits every layer (a multiple of 16 dividing in_features {sorted(set(in_features))})"
        return f"group sizes that fit every layer: {', '.join(map(str, sizes))}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, ratio_4bit: float = 0.1, group_size: int = 64,
                    outlier_fraction: float = 0.002, calibration: Optional[torch.Tensor] = None,
                    exact_zero: Optional[bool] = None, damp: float = 0.01, shrink: float = 0.5, *,
                    act_bits: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None) -> "MixedLinear":
        """Quantizes `linear`'s weight with memboost.quantize (same arguments;
        a 2-D `calibration` is the Hessian of the GPTQ-style sweep, which
        `damp` and `shrink` regularize)."""
        return super().from_linear(linear, ratio_4bit=ratio_4bit, group_size=group_size,
                                   outlier_fraction=outlier_fraction, calibration=calibration, exact_zero=exact_zero,
                                   damp=damp, shrink=shrink, act_bits=act_bits, compute_dtype=compute_dtype)


class TernaryLinear(QuantizedLinear):
    """nn.Linear with a ternary (BitNet b1.58) weight s * {-1, 0, +1}: the
    seed's TernaryLayer. act_bits=None runs the exact fused kernel (outputs
    equal x @ W_hat.T); act_bits=8 quantizes each activation row to int8 first
    (BitNet's W1.58A8) and uses the integer CPU kernels."""

    format = "ternary"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: Optional[int] = None,
                 per_row: bool = True, act_bits: Optional[int] = None, dtype: torch.dtype = torch.float16,
                 device=None):
        qtensor = TernaryQuantizedTensor.zeros((out_features, in_features), dtype=dtype, group_size=group_size,
                                               per_row=per_row, device=device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._init(qtensor, b, None, check_act_bits(act_bits))

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, **params) -> TernaryQuantizedTensor:
        return ternary_quantize(weight, **params)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "absmean", group_size: Optional[int] = None,
                    per_row: bool = True, eps: float = TERNARY_EPS, *, act_bits: Optional[int] = None,
                    compute_dtype: Optional[torch.dtype] = None) -> "TernaryLinear":
        """Quantizes `linear`'s weight with memboost.ternary.quantize (same arguments);
        any shape fits (rows are padded to whole chunks, the last group may be short)."""
        return super().from_linear(linear, method=method, group_size=group_size, per_row=per_row, eps=eps,
                                   act_bits=check_act_bits(act_bits), compute_dtype=compute_dtype)




# ---------------------------------------------------------------------- NF4


class NF4Linear(QuantizedLinear):
    """nn.Linear with an NF4 weight (bitsandbytes' layout); forward runs the
    fused nf4_linear straight from the packed codes.

    act_bits: None (default) computes exactly in float (equal to dequantize
    + F.linear within float rounding, what bitsandbytes computes, and what
    QLoRA training needs); 8 uses int8 activations and the int8 codebook on
    the CPU (faster at batch 1, adds ~0.5% relative output error).
    """

    format = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 64,
                 double_quant: bool = True, dtype: torch.dtype = torch.float32, device=None,
                 act_bits: Optional[int] = None):
        qtensor = NF4QuantizedTensor.zeros((out_features, in_features), dtype=dtype, block_size=block_size,
                                           double_quant=double_quant, device=device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._init(qtensor, b, None, act_bits)

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, **params) -> NF4QuantizedTensor:
        return _nf4_quantize(weight, **params)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True, *,
                    act_bits: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """Quantizes `linear`'s weight with memboost.nf4.quantize (same arguments)."""
        return super().from_linear(linear, block_size=block_size, double_quant=double_quant, act_bits=act_bits,
                                   compute_dtype=compute_dtype)


class Int8Linear(QuantizedLinear):
    """nn.Linear with an int8 weight in llama.cpp's Q8_0 layout (8.5 bits per
    weight): what quantize_model gives a language model's output layer
    (lm_head) by default, whatever format the other layers get.

    act_bits: None (default) computes exactly in float; 8 quantizes x to
    int8 per block of 32 and multiplies int8 by int8 on the CPU (llama.cpp's
    Q8_0 x Q8_0 dot product).
    """

    format = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.float32,
                 device=None, act_bits: Optional[int] = None):
        qtensor = Int8QuantizedTensor.zeros((out_features, in_features), dtype=dtype, device=device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._init(qtensor, b, None, act_bits)

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, **params) -> Int8QuantizedTensor:
        return _int8_quantize(weight, **params)

    @classmethod
    def skip_reason(cls, in_features: int, out_features: int, **params) -> Optional[str]:
        return _int8_skip_reason(in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_bits: Optional[int] = None,
                    compute_dtype: Optional[torch.dtype] = None) -> "Int8Linear":
        """Quantizes `linear`'s weight with memboost.int8.quantize."""
        return super().from_linear(linear, act_bits=act_bits, compute_dtype=compute_dtype)


# ---------------------------------------------------------------------- LoRT


class LoRTLinear(QuantizedLinear):
    """nn.Linear with a LoRT weight alpha*T + A@B.T (memboost.lort): forward
    is one op, memboost::lort_linear: the ternary kernel for alpha*T (exact,
    or int8 activations with act_bits=8) plus the low-rank path x@B then
    @A.T from the float16 factors, added into the same output buffer."""

    format = "lort"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 64,
                 per_row_alpha: bool = False, act_bits: Optional[int] = None, dtype: torch.dtype = torch.float16,
                 device=None):
        qtensor = LoRTQuantizedTensor.zeros((out_features, in_features), resolve_lort_rank(
            (out_features, in_features), rank), per_row_alpha=per_row_alpha, dtype=dtype, device=device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._init(qtensor, b, None, check_act_bits(act_bits))

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, **params) -> LoRTQuantizedTensor:
        return lort_decompose(weight, **params)[0]

    @classmethod
    def skip_reason(cls, in_features: int, out_features: int, rank=64, max_bits=None, per_row_alpha=False,
                    **params) -> Optional[str]:
        try:
            resolve_lort_rank((out_features, in_features), rank, max_bits, per_row_alpha)
        except MemboostError as exc:
            return str(exc)
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank=64, iters: int = 10, per_row_alpha: bool = False,
                    max_bits: Optional[float] = None, calibration: Optional[torch.Tensor] = None,
                    damp: float = 0.01, shrink: float = 0.5, *, act_bits: Optional[int] = None,
                    compute_dtype: Optional[torch.dtype] = None) -> "LoRTLinear":
        """Decomposes `linear`'s weight with memboost.lort.decompose (same
        arguments); `calibration` from memboost.calibrate is its H: the full
        X^T X / rows (hessian=True), or per input channel E[x^2] (a diagonal H);
        shrink 0.5 as the mixed format's (held-out output errors were lower so)."""
        params = {}
        if calibration is not None:
            h = calibration
            if isinstance(h, torch.Tensor) and h.dim() == 1:
                h = torch.diag(h.to(torch.float32))
            params = {"H": h, "damp": damp, "shrink": shrink}
        return super().from_linear(linear, rank=rank, iters=iters, per_row_alpha=per_row_alpha, max_bits=max_bits,
                                   act_bits=check_act_bits(act_bits), compute_dtype=compute_dtype, **params)


class QLoRALinear(nn.Module):
    """QLoRA: a frozen NF4 base (an NF4Linear) plus trainable low-rank
    factors, y = base(x) + dropout(x) @ A.T @ B.T * alpha / r.

    A [r, in] starts random (Kaiming-uniform, as PEFT), B [out, r] at zero, so
    training starts at the quantized base model. The base weight never gets a
    gradient; the input gradient goes through nf4_linear's autograd, which
    dequantizes inside backward (nothing dequantized is kept between forward
    and backward). The factors are float32 parameters; the branch computes in
    the base layer's compute dtype (the input's dtype by default).
    Attribute names follow PEFT's (base_layer, lora_A, lora_B, lora_dropout)
    so adapter keys read `<module>.lora_A.weight`.
    """

    def __init__(self, base_layer: "NF4Linear", r: int = 16, alpha: float = 32, dropout: float = 0.05):
        super().__init__()
        if not isinstance(base_layer, NF4Linear):
            raise MemboostTypeError(f"'base_layer' must be an NF4Linear, got {type(base_layer).__name__}")
        if type(r) is not int or r <= 0:
            raise MemboostError(f"'r' must be a positive int, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise MemboostError(f"'alpha' must be a positive number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise MemboostError(f"'dropout' must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                    block_size: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "QLoRALinear":
        base = NF4Linear.from_linear(linear, block_size=block_size, double_quant=double_quant)
        base.compute_dtype = None if compute_dtype is None else check_output_dtype(compute_dtype, "compute_dtype")
        return cls(base, r=r, alpha=alpha, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dtype = y.dtype
        xd = self.lora_dropout(x.to(dtype))
        lora = (xd @ self.lora_A.weight.to(dtype).T) @ self.lora_B.weight.to(dtype).T
        return y + lora * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """B @ A * alpha / r in float32 [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"
