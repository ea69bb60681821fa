"""Whole-model helpers: collect calibration statistics, then replace every
eligible nn.Linear of a model in place (torchao's quantize_ style)."""

from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from .nn import MixedLinear


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
                      calibration: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """Replaces each nn.Linear (not named in `skip`, accepted by `filter_fn`,
    with in_features divisible by group_size) by a MixedLinear, in place.
    `calibration`, from calibrate(), gives each layer's per-input-channel
    statistics by qualified name; every replaced layer must have an entry.
    Returns the model."""
    targets = list(_eligible_linears(model, skip, filter_fn, group_size))
    if calibration is not None:
        missing = [full for full, *_ in targets if full not in calibration]
        if missing:
            raise ValueError(f"'calibration' has no statistics for {len(missing)} layer(s) to quantize, e.g. "
                             f"{missing[:3]}; run memboost.calibrate on the same model with the same skip")
    for full, parent, child_name, child in targets:
        setattr(parent, child_name, MixedLinear.from_linear(
            child, ratio_4bit=ratio_4bit, group_size=group_size, outlier_fraction=outlier_fraction,
            calibration=None if calibration is None else calibration[full]))
    return model
