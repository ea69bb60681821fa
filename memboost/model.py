"""Whole-model helpers: replace every eligible nn.Linear of a model in place
(torchao's quantize_ style)."""

from typing import Callable, Iterable, Optional

from torch import nn

from .nn import MixedLinear


def quantize_linears_(model: nn.Module, ratio_4bit: float = 0.1, group_size: int = 64,
                      outlier_fraction: float = 0.002, skip: Iterable[str] = ("lm_head",),
                      filter_fn: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Replaces each nn.Linear (not named in `skip`, accepted by `filter_fn`,
    with in_features divisible by group_size) by a MixedLinear, in place.
    Returns the model."""
    skip = tuple(skip)
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(s and s in full for s in skip):
                continue
            if child.in_features % group_size or (filter_fn is not None and not filter_fn(full, child)):
                continue
            targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, MixedLinear.from_linear(child, ratio_4bit=ratio_4bit, group_size=group_size,
                                                            outlier_fraction=outlier_fraction))
    return model
