"""Bits where they matter: the mixed format's share of 4-bit groups chosen
per layer so that a whole model meets a budget of bits per weight with the
least estimated loss.

Each layer's cost of quantization is estimated as the increase of the
model's loss, to second order with the Fisher approximation:

    dL ~ 1/2 * sum_o E[(dL/dy_o)^2] * E[(dy_o)^2],  E[(dy_o)^2] ~ sum_j E[x_j^2] dW_oj^2

(y = W x the layer's output, g_o = dL/dy_o measured by backpropagating the
model's own loss over the calibration batches; x_j^2 from calibrate()). The
per-output-channel weight E[g_o^2] is what makes layers comparable: an error
in a value projection and one in a gate projection of the same size do not
cost the model the same. The choice per layer is then a multiple-choice
knapsack over the numbers of 4-bit groups per row, solved by its Lagrangian
(each layer minimises cost + lambda * bits; lambda bisected to the budget).
"""

import math
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from .._progress import progress_bar
from ..errors import MemboostError, MemboostTypeError
from ..formats.mixed import quantize
from .quantize import _as_linear, _check_batches, _linears, _skipped_by_name, calibrate


def output_sensitivity(model: nn.Module, batches: Iterable, skip: Iterable[str] = ("lm_head",),
                       progress: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """{layer name: E[(dL/dy)^2] per output channel (float32 [out_features])}
    for every linear layer not named in `skip`, with L the model's loss on
    each batch summed over its predicted tokens (so each token's gradient
    counts once). A batch is a tensor of token ids (the model is called with
    labels=batch: next-token cross-entropy for a causal LM) or a dict of
    model inputs (labels=input_ids unless it has 'labels'). Parameters get no
    .grad; the model's requires_grad flags are put back. A progress bar runs
    over the batches: progress=True always, False never, None on a terminal."""
    _check_batches(batches)
    if isinstance(skip, str):
        skip = (skip,)
    layers = {full: child for full, _, _, child in _linears(model) if _skipped_by_name(full, skip) is None}
    if not layers:
        raise MemboostError("'model' has no linear layer to measure (every layer skipped)")
    sums: Dict[str, torch.Tensor] = {}
    tokens = 0
    outputs: List = []

    def keep(name):
        def hook(module, args, out):
            outputs.append((name, out))
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [child.register_forward_hook(keep(name)) for name, child in layers.items()]
    try:
        for p in model.parameters():  # the layers' outputs must be part of the graph
            p.requires_grad_(True)
        for i, batch in enumerate(progress_bar(batches, "gradients", unit="batch", progress=progress)):
            outputs.clear()
            if isinstance(batch, torch.Tensor):
                kwargs = {"input_ids": batch, "labels": batch}
            elif isinstance(batch, Mapping):
                kwargs = dict(batch)
                if "labels" not in kwargs and "input_ids" in kwargs:
                    kwargs["labels"] = kwargs["input_ids"]
            else:
                raise MemboostTypeError(f"batch {i} of 'batches' must be a tensor of token ids or a dict of model "
                                        f"inputs, got {type(batch).__name__}")
            with torch.enable_grad():
                out = model(**kwargs)
                loss = getattr(out, "loss", None)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise MemboostError("the model returned no scalar loss for labels=...; output_sensitivity "
                                        "needs a model that computes its loss (a causal LM)")
                labels = kwargs["labels"]
                predicted = max(1, int((labels[..., 1:] != -100).sum())) if labels.dim() else 1
                grads = torch.autograd.grad(loss * predicted, [o for _, o in outputs], allow_unused=True)
            for (name, o), g in zip(outputs, grads):
                if g is None:
                    continue
                g2 = g.detach().float().reshape(-1, g.shape[-1]).square().sum(0)
                sums[name] = sums[name] + g2 if name in sums else g2
            tokens += predicted
    finally:
        outputs.clear()
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if not sums:
        raise MemboostError("'batches' ran no input through any linear layer (empty, or every layer skipped)")
    return {name: s / tokens for name, s in sums.items()}


def _group_costs(weight: torch.Tensor, diag: torch.Tensor, sens: torch.Tensor, group_size: int,
                 outlier_fraction: float):
    """(cost of each count of 4-bit groups per row [groups + 1], stored bits
    of each count [groups + 1]) of one layer: the rows' groups become 4-bit in
    the order the quantizer takes them (largest weighted 2-bit error first),
    each saving its 2-bit minus its 4-bit error."""
    w = weight.detach().float()
    n, k = w.shape
    groups = k // group_size
    per_group = []
    bits = []
    for ratio in (0.0, 1.0):
        q = quantize(w, ratio_4bit=ratio, group_size=group_size, outlier_fraction=outlier_fraction, calibration=diag)
        err = ((q.dequantize().float() - w).square() * diag).view(n, groups, group_size).sum(-1)
        per_group.append(err)
        bits.append(8.0 * q.nbytes)
    err2, err4 = per_group
    saving = (err2 - err4).gather(1, err2.argsort(dim=1, descending=True))
    row_costs = torch.cat([err2.sum(1, keepdim=True), err2.sum(1, keepdim=True) - saving.cumsum(1)], dim=1)
    costs = 0.5 * (sens.float().unsqueeze(1) * row_costs).sum(0)
    # Storage grows by the 4-bit groups' second bit plane; all-4-bit rows keep
    # only the extreme outliers, which their exact count accounts for.
    per_group_bits = 2.0 * group_size * n
    stored = [bits[0] + c * per_group_bits for c in range(groups)] + [bits[1]]
    return costs.double().tolist(), stored


def allocate_ratio_4bit(model: nn.Module, batches: Iterable, bits: float, calibration: Optional[Mapping] = None,
                        sensitivity: Optional[Mapping] = None, skip: Iterable[str] = ("lm_head",),
                        group_size: int = 64, outlier_fraction: float = 0.002,
                        progress: Optional[bool] = None) -> Dict[str, float]:
    """{layer name: ratio_4bit} for every linear layer not named in `skip`
    whose in_features group_size divides, such that the layers together
    store at most `bits` bits per weight (every scale, zero and outlier
    counted, as QuantizationReport.bits_per_weight) with the least estimated
    loss (see this module). Pass it as quantize_model's ratio_4bit:

        stats = memboost.calibrate(model, batches)
        plan = memboost.allocate_ratio_4bit(model, batches, bits=2.9, calibration=stats)
        memboost.quantize_model(model, "mixed", ratio_4bit=plan, calibration=stats)

    `calibration` (from calibrate(); measured here when omitted, a Hessian's
    diagonal used when given 2-D) and `sensitivity` (from output_sensitivity();
    measured here when omitted) come from the float model and `batches`.
    Progress bars run over those passes and the layers: progress=True always,
    False never, None on a terminal."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits <= 0:
        raise MemboostError(f"'bits' must be a positive number of bits per weight, got {bits!r}")
    if isinstance(skip, str):
        skip = (skip,)
    batches = list(batches) if batches is not None else []
    layers = {}
    for full, _, _, child in _linears(model):
        linear = _as_linear(child)
        if _skipped_by_name(full, skip) is None and linear.in_features % group_size == 0:
            layers[full] = linear
    if not layers:
        raise MemboostError(f"'model' has no linear layer whose in_features group_size={group_size} divides")
    if calibration is None:
        calibration = calibrate(model, batches, skip=skip, progress=progress)
    if sensitivity is None:
        sensitivity = output_sensitivity(model, batches, skip=skip, progress=progress)
    for what, stats in (("calibration", calibration), ("sensitivity", sensitivity)):
        missing = [name for name in layers if name not in stats]
        if missing:
            raise MemboostError(f"'{what}' has no statistics for {len(missing)} layer(s), e.g. {missing[:3]}")

    choices = {}
    weights = 0
    for name, linear in progress_bar(layers.items(), "bits plan", unit="layer", total=len(layers),
                                     progress=progress):
        diag = calibration[name]
        diag = (diag.diagonal() if diag.dim() == 2 else diag).clamp_min(0).float().to(linear.weight.device)
        costs, stored = _group_costs(linear.weight, diag, sensitivity[name].to(linear.weight.device), group_size,
                                     outlier_fraction)
        choices[name] = list(zip(costs, stored))
        weights += linear.weight.numel()
    return ratio_4bit_from_costs(choices, weights, bits)


def ratio_4bit_from_costs(choices: Mapping[str, List], weights: int, bits: float) -> Dict[str, float]:
    """{layer name: ratio_4bit} from each layer's [(estimated cost, stored
    bits)] per count of 4-bit groups per row (_group_costs), over `weights`
    weights in all: the choice that stores at most `bits` bits per weight
    with the least total cost (allocate_ratio_4bit's solve; the streaming
    plan of memboost.io.streaming gathers the same costs block by block)."""
    budget = bits * weights
    least = sum(min(s for _, s in c) for c in choices.values())
    if least > budget:
        raise MemboostError(f"'bits'={bits} is below what the mixed format can store for these layers "
                            f"({least / weights:.3f} bits per weight with every group 2-bit)")
    # Costs as a fraction of the all-2-bit total, bits per weight: lambda is then of order one.
    scale = sum(c[0][0] for c in choices.values()) or 1.0
    table = {name: [(cost / scale, stored / weights) for cost, stored in c] for name, c in choices.items()}

    def pick(lam: float) -> Dict[str, int]:
        return {name: min(range(len(c)), key=lambda i: (c[i][0] + lam * c[i][1], c[i][1]))
                for name, c in table.items()}

    def stored_bits(picked: Dict[str, int]) -> float:
        return sum(table[name][i][1] for name, i in picked.items())

    # The smallest lambda (bits are cheapest) whose choice fits, bisected on a log scale.
    lo, hi = -40.0, 40.0
    if stored_bits(pick(math.exp(lo))) <= bits:
        hi = lo
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if stored_bits(pick(math.exp(mid))) <= bits:
            hi = mid
        else:
            lo = mid
    picked = pick(math.exp(hi))
    # The Lagrangian choice can leave some of the budget unspent: spend it on
    # the upgrades that save the most cost per bit while they fit.
    spare = bits - stored_bits(picked)
    while True:
        best = None
        for name, i in picked.items():
            cost, size = table[name][i]
            for j, (c, s) in enumerate(table[name]):
                if s > size and s - size <= spare and c < cost:
                    gain = (cost - c) / (s - size)
                    if best is None or gain > best[0]:
                        best = (gain, name, j, s - size)
        if best is None:
            break
        _, name, j, extra = best
        picked[name] = j
        spare -= extra
    return {name: picked[name] / (len(choices[name]) - 1) for name in choices}
