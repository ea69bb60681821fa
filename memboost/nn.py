"""Drop-in nn.Linear replacements over QuantizedTensor.

A layer keeps its quantized weight in a QuantizedWeight child module whose
buffers are exactly the QuantizedTensor's state_dict, so `.to()`,
`state_dict()` and `load_state_dict()` work as for any module and the keys
are `weight.<tensor>` plus `weight.format_info` (safetensors-safe)."""

from typing import Optional

import torch
from torch import nn

from .mixed import MixedQuantizedTensor, quantize
from .tensor import FORMAT_INFO_KEY, QuantizedTensor, decode_json


class QuantizedWeight(nn.Module):
    def __init__(self, qtensor: QuantizedTensor):
        super().__init__()
        self._set(qtensor)

    def _set(self, qtensor: QuantizedTensor) -> None:
        self._format_cls = type(qtensor)
        self._meta = dict(qtensor.meta)
        for name, t in qtensor.state_dict().items():
            self.register_buffer(name, t)

    def tensor(self) -> QuantizedTensor:
        """The QuantizedTensor view of the buffers (no copy, no re-validation)."""
        cls = self._format_cls
        return cls._wrap({name: getattr(self, name) for name in cls.tensor_names}, self._meta)

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
        names = list(self._format_cls.tensor_names) + [FORMAT_INFO_KEY]
        present = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        missing = [prefix + n for n in names if n not in present]
        if strict:
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):] not in names and "." not in k[len(prefix):])
        if missing:
            missing_keys.extend(missing)
            return
        try:
            info = decode_json(present[FORMAT_INFO_KEY], prefix + FORMAT_INFO_KEY)
            qtensor = QuantizedTensor.from_state_dict(present)
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"{prefix[:-1] or 'weight'}: {exc}")
            return
        if info.get("shape") != self._meta.get("shape"):
            error_msgs.append(f"{prefix}: quantized weight of shape {info.get('shape')} does not fit a layer of "
                              f"shape {self._meta.get('shape')}")
            return
        self._set(qtensor.to(self.device))

    def extra_repr(self) -> str:
        return repr(self.tensor())


class MixedLinear(nn.Module):
    """nn.Linear with a mixed 2/4/16-bit weight; forward runs the fused kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 64,
                 ratio_4bit: float = 0.1, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = QuantizedWeight(MixedQuantizedTensor.zeros(
            (out_features, in_features), dtype=dtype, group_size=group_size, ratio_4bit=ratio_4bit, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, ratio_4bit: float = 0.1, group_size: int = 64,
                    outlier_fraction: float = 0.002, calibration: Optional[torch.Tensor] = None,
                    exact_zero: Optional[bool] = None) -> "MixedLinear":
        """Quantizes `linear`'s weight with memboost.quantize (same arguments)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"'linear' must be an nn.Linear, got {type(linear).__name__}")
        qtensor = quantize(linear.weight.detach(), ratio_4bit=ratio_4bit, group_size=group_size,
                           outlier_fraction=outlier_fraction, calibration=calibration, exact_zero=exact_zero)
        return cls.from_quantized(qtensor, linear.bias)

    @classmethod
    def from_quantized(cls, qtensor: MixedQuantizedTensor, bias: Optional[torch.Tensor] = None) -> "MixedLinear":
        """A layer around an existing quantized weight [out, in] (and a copy of `bias`)."""
        if not isinstance(qtensor, MixedQuantizedTensor):
            raise TypeError(f"'qtensor' must be a MixedQuantizedTensor, got {type(qtensor).__name__}")
        out_features, in_features = qtensor.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"'bias' must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.weight = QuantizedWeight(qtensor)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return self.weight.tensor().linear(x, bias)

    def extra_repr(self) -> str:
        q = self.weight.tensor()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={q.group_size}, ratio_4bit={q.ratio_4bit:.3f}, avg_bits={q.avg_bits:.3f}, "
                f"outliers={q.num_outliers}")
