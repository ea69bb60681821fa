"""Whole-model helpers: collect calibration statistics, then replace every
eligible nn.Linear of a model in place (torchao's quantize_ style)."""

from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from .mixed import MixedQuantizedTensor
from .nn import MixedLinear
from .tensor import FORMAT_INFO_KEY, QuantizedTensor


def _eligible_linears(model: nn.Module, skip: Iterable[str], filter_fn=None, group_size: Optional[int] = None):
    """(qualified name, parent, attribute name, nn.Linear) for each exact
    nn.Linear not named in `skip`, accepted by `filter_fn`, and whose
    in_features group_size divides (when given)."""
    skip = tuple(skip)
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(s and s in full for s in skip):
                continue
            if group_size is not None and child.in_features % group_size:
                continue
            if filter_fn is not None and not filter_fn(full, child):
                continue
            yield full, module, child_name, child


def calibrate(model: nn.Module, batches: Iterable, skip: Iterable[str] = ("lm_head",)) -> Dict[str, torch.Tensor]:
    """Runs `model` on each batch (a tensor: model(batch); a dict: model(**batch))
    without gradients and returns, for every nn.Linear not named in `skip`,
    the mean of x**2 over all its input rows, per input channel (float32
    [in_features]): the diagonal of the layer's Hessian up to a constant,
    which is what quantize(..., calibration=) and quantize_linears_ take."""
    sums: Dict[str, torch.Tensor] = {}
    rows: Dict[str, int] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            sums[name] = sums[name] + x.square().sum(0) if name in sums else x.square().sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return accumulate

    handles = [child.register_forward_pre_hook(hook(full)) for full, _, _, child in _eligible_linears(model, skip)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if not rows:
        raise ValueError("'batches' ran no input through any linear layer (empty, or every layer skipped)")
    return {name: s / rows[name] for name, s in sums.items()}


def quantize_linears_(model: nn.Module, ratio_4bit: float = 0.1, group_size: int = 64,
                      outlier_fraction: float = 0.002, skip: Iterable[str] = ("lm_head",),
                      filter_fn: Optional[Callable[[str, nn.Linear], bool]] = None,
                      calibration: Optional[Mapping[str, torch.Tensor]] = None,
                      exact_zero: Optional[bool] = None) -> nn.Module:
    """Replaces each nn.Linear (not named in `skip`, accepted by `filter_fn`,
    with in_features divisible by group_size) by a MixedLinear, in place.
    `calibration`, from calibrate(), gives each layer's per-input-channel
    statistics by qualified name; every replaced layer must have an entry.
    The other arguments are memboost.quantize's. Returns the model."""
    targets = list(_eligible_linears(model, skip, filter_fn, group_size))
    if calibration is not None:
        missing = [full for full, *_ in targets if full not in calibration]
        if missing:
            raise ValueError(f"'calibration' has no statistics for {len(missing)} layer(s) to quantize, e.g. "
                             f"{missing[:3]}; run memboost.calibrate on the same model with the same skip")
    for full, parent, child_name, child in targets:
        setattr(parent, child_name, MixedLinear.from_linear(
            child, ratio_4bit=ratio_4bit, group_size=group_size, outlier_fraction=outlier_fraction,
            calibration=None if calibration is None else calibration[full], exact_zero=exact_zero))
    return model


def load_quantized_(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Loads a state_dict saved from a model that quantize_linears_ changed
    into a model of the same architecture built as usual (plain nn.Linear
    layers, e.g. from its config): every nn.Linear whose weight is quantized
    in `state_dict` becomes a MixedLinear first, in place. Returns
    load_state_dict's (missing_keys, unexpected_keys)."""
    replacements = []  # every layer is checked before any is replaced
    for full, parent, child_name, child in list(_eligible_linears(model, skip=())):
        prefix = f"{full}.weight."
        if prefix + FORMAT_INFO_KEY not in state_dict:
            continue
        parts = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        qtensor = QuantizedTensor.from_state_dict(parts)
        if not isinstance(qtensor, MixedQuantizedTensor) or tuple(qtensor.shape) != tuple(child.weight.shape):
            raise ValueError(f"'state_dict' has a {type(qtensor).__name__} of shape {tuple(qtensor.shape)} for "
                             f"'{full}', an nn.Linear of weight shape {tuple(child.weight.shape)}")
        replacements.append((parent, child_name, MixedLinear.from_quantized(qtensor.to(child.weight.device),
                                                                            child.bias)))
    for parent, child_name, layer in replacements:
        setattr(parent, child_name, layer)
    return model.load_state_dict(state_dict, strict=strict)
