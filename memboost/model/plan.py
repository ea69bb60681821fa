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
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .._progress import progress_bar
from ..errors import MemboostError, MemboostTypeError
from ..formats.mixed import quantize
from .quantize import _as_linear, _check_batches, _linears, _skipped_by_name, calibrate


def loss_inputs_of(batch, i: int) -> Tuple[dict, int]:
    """(model keyword inputs with labels, tokens predicted; 0 without labels) of
    calibration batch `i`: a tensor of token ids is its own labels, a dict gets
    labels=input_ids unless it has labels."""
    if isinstance(batch, torch.Tensor):
        kwargs = {"input_ids": batch, "labels": batch}
    elif isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "labels" not in kwargs and "input_ids" in kwargs:
            kwargs["labels"] = kwargs["input_ids"]
    else:
        raise MemboostTypeError(f"batch {i} of 'batches' must be a tensor of token ids or a dict of model inputs, "
                                f"got {type(batch).__name__}")
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor):
        return kwargs, 0
    return kwargs, max(1, int((labels[..., 1:] != -100).sum())) if labels.dim() else 1


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
            kwargs, predicted = loss_inputs_of(batch, i)
            with torch.enable_grad():
                out = model(**kwargs)
                loss = getattr(out, "loss", None)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise MemboostError("the model returned no scalar loss for labels=...; output_sensitivity "
                                        "needs a model that computes its loss (a causal LM)")
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
                 outlier_fraction: float, weighted_search: bool = True):
    """(cost of each count of 4-bit groups per row [groups + 1], stored bits
    of each count [groups + 1]) of one layer: the rows' groups become 4-bit in
    the order the quantizer takes them (largest weighted 2-bit error first),
    each saving its 2-bit minus its 4-bit error. weighted_search=False
    measures a quantizer that is given no calibration (errors still weighed
    by `diag`)."""
    w = weight.detach().float()
    n, k = w.shape
    groups = k // group_size
    per_group = []
    bits = []
    for ratio in (0.0, 1.0):
        q = quantize(w, ratio_4bit=ratio, group_size=group_size, outlier_fraction=outlier_fraction,
                     calibration=diag if weighted_search else None)
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


def _solve(choices: Mapping[str, List], bits: float, weights: int) -> Dict[str, int]:
    """{layer: index of its choice} among each layer's (cost, stored bits)
    choices with the least total cost whose stored bits stay within `bits`
    per weight over `weights` weights: the Lagrangian of the multiple-choice
    knapsack, lambda bisected to the budget, then whatever budget is left
    spent on the best upgrades per bit."""
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
    return picked


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
    with the least total cost (_solve; allocate_ratio_4bit's solve, and the
    streaming plan of memboost.io.streaming gathers the same costs block by block)."""
    picked = _solve(choices, bits, weights)
    return {name: picked[name] / (len(choices[name]) - 1) for name in choices}


# The layers that read a decoder block's normalized input, and the norms that
# give it (their weights scale each input channel): attention's input, then
# the MLP's (Gemma 2/3 apply post_attention_layernorm to the attention's
# output and pre_feedforward_layernorm to the MLP's input).
_NORMED_INPUTS = (
    (("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack"),
     ("input_layernorm", "ln_1", "attention_norm")),
    (("gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3"),
     ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm")),
)


def _input_scale(model: nn.Module, name: str, in_features: int) -> Tuple[Optional[torch.Tensor], str]:
    """(the squared scale of each input channel of layer `name` that its
    block's norm gives, float32 [in_features], and the norm's name), or
    (None, "") when the layer reads no norm this knows of. Gemma's norms
    scale by 1 + weight."""
    kind = name.rsplit(".", 1)[-1]
    norms = next((norms for kinds, norms in _NORMED_INPUTS if kind in kinds), None)
    if norms is None:
        return None, ""
    parts = name.split(".")[:-1]
    for depth in range(len(parts), -1, -1):   # the nearest enclosing module that holds one of the norms
        prefix = ".".join(parts[:depth])
        try:
            holder = model.get_submodule(prefix)
        except AttributeError:
            continue
        for norm_name in norms:
            norm = getattr(holder, norm_name, None)
            weight = getattr(norm, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.shape == (in_features,) and weight.device.type != "meta":
                scale = weight.detach().float() + (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)
                bias = getattr(norm, "bias", None)
                square = scale.square() + (bias.detach().float().square() if isinstance(bias, torch.Tensor) else 0.0)
                return square, f"{prefix}.{norm_name}" if prefix else norm_name
    return None, ""


def weights_plan(model: nn.Module, layers: Mapping[str, nn.Module], ratio_4bit: float, group_size: int = 64,
                 outlier_fraction: float = 0.002, name_prefix: str = "", progress: Optional[bool] = False,
                 use_norms: bool = True, weighted_search: bool = False) -> Tuple[Dict[str, float], Dict[str, str]]:
    """({layer name: ratio_4bit}, {layer name: why it differs from ratio_4bit})
    for the mixed format without calibration: the 4-bit groups that a uniform
    `ratio_4bit` would store in `layers` ({name: nn.Linear}, names with
    `name_prefix`, all in `model`) spent where the weights alone say they
    matter, within the same stored bits.

    Each layer's cost is its relative output error ||dW x||^2 / ||W x||^2 for
    inputs whose channels have the scale that the norm before the layer gives
    them (its weight; 1 where the layer reads no known norm), times the
    layer's number of weights: every weight's share of the error counts
    alike, so a layer whose 2-bit weights lose much of its output (weights
    of widely differing magnitudes within a group, as behind a norm with
    outlier channels) gets 4-bit groups first, and a layer whose groups fare
    like the others' keeps about the uniform ratio. (Every layer counting
    alike, without its size, made a small layer's groups cheap: on
    SmolLM2-135M it gave q/k/v every group in 4 bits, the MLP none, and a
    worse perplexity than the uniform ratio.) The choice is
    allocate_ratio_4bit's knapsack, with these costs in place of the
    measured loss. Deterministic; it quantizes each layer twice more (all
    2-bit, all 4-bit). quantize_model calls it once per decoder block
    (plan="weights", its default)."""
    choices, reasons, errors, scaled = {}, {}, {}, {}
    weights = budget = 0
    for name, linear in progress_bar(layers.items(), "weights plan", unit="layer", total=len(layers),
                                     progress=progress):
        w = linear.weight.detach().float()
        n, k = w.shape
        diag, norm = _input_scale(model, name[len(name_prefix):], k) if use_norms else (None, "")
        if diag is None:
            diag = torch.ones(k, device=w.device)
        energy = float((w.square() * diag).sum()) or 1.0
        try:
            costs, stored = _group_costs(w, diag.to(w.device), torch.full((n,), 2.0 / energy, device=w.device),
                                         group_size, outlier_fraction, weighted_search=weighted_search)
        except MemboostError as exc:
            raise type(exc)(f"{name}: {exc}") from None
        errors[name] = math.sqrt(max(costs[0], 0.0))
        uniform = int(ratio_4bit * (k // group_size) + 0.5)   # the quantizer's rounding (_num_4bit_groups)
        # A relative error weighs by the layer's share of the weights: each
        # weight's error counts alike, so a small layer's groups are not cheap.
        choices[name] = [(cost * w.numel(), size) for cost, size in zip(costs, stored)]
        budget += stored[uniform]
        weights += w.numel()
        scaled[name] = name_prefix + norm if norm else ""
    picked = _solve(choices, budget / weights, weights)
    plan = {name: picked[name] / (len(choices[name]) - 1) for name in layers}
    median = sorted(errors.values())[len(errors) // 2]
    sizes = {name: linear.weight.numel() for name, linear in layers.items()}
    median_size = sorted(sizes.values())[len(sizes) // 2]
    for name in layers:
        groups = len(choices[name]) - 1
        uniform = int(ratio_4bit * groups + 0.5)
        if picked[name] != uniform:
            reasons[name] = (f"{'more' if picked[name] > uniform else 'fewer'} 4-bit groups "
                             f"({uniform}->{picked[name]} of {groups}): 2-bit output error {errors[name]:.2f} "
                             f"(median {median:.2f}), {sizes[name] / median_size:.2g}x the median layer's weights"
                             f"{', inputs scaled by ' + scaled[name] if scaled[name] else ''}")
    return plan, reasons
