"""Whole-model helpers: collect calibration statistics, then replace every
eligible linear layer of a model in place with a quantized one (torchao's
quantize_ style), with a report of what was done."""

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .._progress import progress_bar
from ..errors import MemboostError, MemboostTypeError
from ..nn import QuantizedLinear
from ..formats.tensor import FORMAT_INFO_KEY, QuantizedTensor


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear layer with its weight stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear view of a linear layer (an nn.Linear itself, or a Conv1D's transposed weight)."""
    if type(module) is nn.Linear:
        return module
    w = module.weight.detach().t()
    linear = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def _linears(model: nn.Module):
    """(qualified name, parent, attribute name, layer) for every nn.Linear and Conv1D."""
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is nn.Linear or _is_conv1d(child):
                yield (f"{name}.{child_name}" if name else child_name), module, child_name, child


def _skipped_by_name(full: str, skip: Iterable[str]) -> Optional[str]:
    for s in skip:
        if s and s in full:
            return f"name matches skip {s!r}"
    return None


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]
    avg_bits: float
    bytes_before: int
    bytes_after: int
    details: dict = field(default_factory=dict)


@dataclass
class QuantizationReport:
    """What quantize_model did: the layers replaced (with their realised
    parameters), those skipped and why, and the bytes before and after."""

    method: str
    replaced: List[LayerReport] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    # Settings expected to damage the model, each saying what to change
    # (quantize_model's rules; the command line adds its perplexity probe).
    warnings: List[str] = field(default_factory=list)
    # The output layer when quantize_model's lm_head made it int8 (outside
    # the totals below, which describe `method`'s layers).
    output_layer: Optional[LayerReport] = None
    # {layer: why its ratio_4bit differs from the one asked for}: the mixed
    # format's weights plan without calibration (memboost.model.plan.weights_plan).
    plan: Dict[str, str] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.replaced)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.replaced)

    @property
    def bits_per_weight(self) -> float:
        weights = sum(r.shape[0] * r.shape[1] for r in self.replaced)
        return 8.0 * self.bytes_after / weights if weights else 0.0

    def summary(self) -> str:
        if not self.replaced:
            line = f"memboost {self.method}: no layer replaced ({len(self.skipped)} skipped)"
        else:
            line = (f"memboost {self.method}: {len(self.replaced)} layers replaced, {len(self.skipped)} skipped; "
                    f"{self.bits_per_weight:.3f} bits per weight; {self.bytes_before / 2**20:.1f} MiB -> "
                    f"{self.bytes_after / 2**20:.1f} MiB")
        if self.output_layer is not None:
            o = self.output_layer
            line += (f"; output layer {o.name} int8 ({o.avg_bits:.2f} bits, {o.bytes_before / 2**20:.1f} MiB -> "
                     f"{o.bytes_after / 2**20:.1f} MiB)")
        lines = [line]
        if self.plan:
            more = sum(why.startswith("more") for why in self.plan.values())
            lines.append(f"weights plan (no calibration): {more} layer(s) got more 4-bit groups and "
                         f"{len(self.plan) - more} fewer, within the bits of the uniform ratio_4bit (the table's "
                         f"'plan' column says why)")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def table(self) -> str:
        """A Markdown table: one row per layer replaced, then the skipped ones."""
        keys = sorted({k for r in self.replaced for k in r.details})
        lines = ["| layer | shape | bits | " + " | ".join(keys) + (" |" if keys else "|"),
                 "|---|---|---|" + "---|" * len(keys)]
        for r in self.replaced:
            cells = [r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.avg_bits:.3f}"] + [str(r.details.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        if self.output_layer is not None:
            o = self.output_layer
            lines.append("| " + " | ".join([o.name, f"{o.shape[0]}x{o.shape[1]}", f"{o.avg_bits:.3f}"]
                                           + ["int8 (output layer)"] + [""] * (len(keys) - 1)) + " |")
        lines += [f"| {name} | skipped: {why} |" for name, why in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()


def _check_batches(batches) -> None:
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)):
        raise MemboostTypeError(
            f"'batches' must be an iterable of batches (e.g. a list of token-id tensors [batch, seq] or of dicts of "
            f"model inputs), got a single {type(batches).__name__}: wrap it in a list")
    try:
        iter(batches)
    except TypeError:
        raise MemboostTypeError(f"'batches' must be an iterable of batches, got {type(batches).__name__}") from None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layers being measured have their inputs."""


def _run_batches(model: nn.Module, batches: List, progress: Optional[bool] = False, desc: str = "") -> None:
    with torch.no_grad():
        for i, batch in enumerate(progress_bar(batches, desc, unit="batch", progress=progress)):
            if not isinstance(batch, (torch.Tensor, Mapping)):
                raise MemboostTypeError(f"batch {i} of 'batches' must be a tensor of model inputs or a dict of "
                                        f"keyword inputs, got {type(batch).__name__}")
            try:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
            except _StopForward:
                pass


def _input_moments(run: Callable[[], None], layers: Mapping[str, nn.Module], hessian: bool,
                   stop_at: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """{name: mean of x**2 per input channel (or X^T X / rows)} of each layer
    in `layers` over the forward passes that `run` makes; each ends at
    `stop_at`'s input."""
    sums: Dict[str, torch.Tensor] = {}
    rows: Dict[str, int] = {}

    def hook(name, in_features, stop):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, in_features).float()
            moment = x.T @ x if hessian else x.square().sum(0)
            sums[name] = sums[name] + moment if name in sums else moment
            rows[name] = rows.get(name, 0) + x.shape[0]
            if stop:
                raise _StopForward
        return accumulate

    handles = []
    for name, child in layers.items():
        in_features = child.weight.shape[0] if _is_conv1d(child) else child.in_features
        handles.append(child.register_forward_pre_hook(hook(name, in_features, child is stop_at)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: s / rows[name] for name, s in sums.items()}


def calibrate(model: nn.Module, batches: Iterable, skip: Iterable[str] = ("lm_head",),
              hessian: bool = False, progress: Optional[bool] = None,
              quantized: bool = False) -> Dict[str, torch.Tensor]:
    """Runs `model` on each batch (a tensor: model(batch); a dict: model(**batch))
    without gradients and returns, for every linear layer not named in `skip`,
    the mean of x**2 over all its input rows, per input channel (float32
    [in_features]): the diagonal of the layer's Hessian up to a constant,
    which is what quantize(..., calibration=) and quantize_model take.
    hessian=True returns the full second moment X^T X / rows instead
    (float32 [in_features, in_features], accumulated on the layer's device),
    with which the mixed format quantizes GPTQ-style. A progress bar runs over
    the batches: progress=True always, False never, None on a terminal.
    quantized=True also measures the layers memboost has already quantized
    (QuantizedLinear): the activations an NF4 model's own layers see, which
    export_gguf weighs its scale searches by."""
    _check_batches(batches)
    layers = {full: child for full, _, _, child in _linears(model) if _skipped_by_name(full, skip) is None}
    if quantized:
        layers.update((name, module) for name, module in model.named_modules()
                      if isinstance(module, QuantizedLinear) and _skipped_by_name(name, skip) is None)
    batches = list(batches)
    desc = "calibration (Hessians)" if hessian else "calibration"
    stats = _input_moments(lambda: _run_batches(model, batches, progress, desc), layers, hessian)
    if not stats:
        raise MemboostError("'batches' ran no input through any linear layer (empty, or every layer skipped)")
    return stats


def _stages(model: nn.Module, batch, layers: Mapping[str, nn.Module]) -> List[List[str]]:
    """The layers in the order one forward pass reaches them, grouped into
    stages of consecutive layers that read the same input tensor (q/k/v,
    gate/up): what sequential quantization measures and quantizes together."""
    order: List[Tuple[str, bool]] = []   # (layer, reads the same tensor as the layer called before it)
    last = [None]      # only the previous input is held, not every layer's

    def record(module, args, name):
        order.append((name, args[0] is last[0]))
        last[0] = args[0]

    handles = [child.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
               for name, child in layers.items()]
    try:
        _run_batches(model, [batch])
    finally:
        last[0] = None
        for handle in handles:
            handle.remove()
    stages: List[List[str]] = []
    seen = set()
    for name, shared_input in order:
        if name in seen:   # a layer called twice (shared): measured on its first call's stage
            continue
        seen.add(name)
        if shared_input and stages:
            stages[-1].append(name)
        else:
            stages.append([name])
    stages.extend([name] for name in layers if name not in seen)   # never reached: measured as nothing
    return stages


def _decoder_blocks(model: nn.Module, names: Iterable[str]) -> Optional[Tuple[nn.ModuleList, str]]:
    """(the nn.ModuleList of repeated blocks, its qualified name) when every
    one of `names` lies inside one of its entries (a decoder's layers), else None."""
    names = list(names)
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{list_name}." if list_name else ""
            if all(n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit() for n in names):
                return module, prefix
    return None


def _block_inputs(model: nn.Module, block: nn.Module, batches: List) -> List[Tuple[tuple, dict]]:
    """The (args, kwargs) each batch calls `block` with; the forward passes stop there."""
    captured: List[Tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        kwargs = dict(kwargs)
        # Blocks are run again and again on these inputs: a key/value cache
        # would grow with every run.
        for key in ("past_key_value", "past_key_values", "layer_past"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _run_batches(model, batches)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: List[Tuple[tuple, dict]]) -> None:
    with torch.no_grad():
        for args, kwargs in inputs:
            try:
                block(*args, **kwargs)
            except _StopForward:
                pass


def _block_outputs(block: nn.Module, inputs: List[Tuple[tuple, dict]]) -> List[Tuple[tuple, dict]]:
    """The next block's inputs: these with the hidden states replaced by `block`'s output."""
    nxt = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if args:
                nxt.append(((hidden,) + tuple(args[1:]), kwargs))
            else:
                nxt.append((args, dict(kwargs, hidden_states=hidden)))
    return nxt


def _sequential_runs(model: nn.Module, batches: List, stages: List[List[str]], name_prefix: str = ""):
    """Yields (stage, run) in order, where run() makes the forward passes
    that reach the stage's layers; the caller replaces the stage's layers
    before asking for the next. When every stage lies in a decoder's blocks,
    each block's inputs are captured once (from the block before it, already
    quantized) and run() runs that block alone: one pass per stage over one
    block instead of the model up to it (GPTQ implementations do the same)."""
    found = _decoder_blocks(model, [name[len(name_prefix):] for stage in stages for name in stage])
    if found is None:
        for stage in stages:
            yield stage, lambda: _run_batches(model, batches)
        return
    blocks, prefix = found
    per_block: Dict[int, List[List[str]]] = {}
    for stage in stages:
        per_block.setdefault(int(stage[0][len(name_prefix) + len(prefix):].split(".", 1)[0]), []).append(stage)
    first, last = min(per_block), max(per_block)
    inputs = _block_inputs(model, blocks[first], batches)
    for i in range(first, last + 1):
        for stage in per_block.get(i, []):
            yield stage, lambda block=blocks[i], inputs=inputs: _run_block(block, inputs)
        if i < last:
            inputs = _block_outputs(blocks[i], inputs)


# Below these fractions of 4-bit groups the mixed format costs a model much
# of its quality (SmolLM2-135M, README "Results": uncalibrated, ratio_4bit
# 0.5 (3.45 bits per weight) gave 3.2x the float perplexity and 0.1 (2.6
# bits) 17x; calibrated, 0.25 (2.8 bits) gave 2.7x, 2.9 bits planned with
# the Hessian 1.8x). Judged on the realised fraction rather than bits per
# weight, which small layers' per-row scales inflate.
MIXED_SAFE_RATIO_4BIT = {False: 1.0, True: 0.5}   # {calibrated: least ratio_4bit without a warning}


def damage_warnings(method: str, report: "QuantizationReport", calibrated: bool) -> List[str]:
    """Why the setting that produced `report` is expected to damage a
    float-trained model, and what to change (empty when it is not): the
    rules behind QuantizationReport.warnings."""
    if method == "mixed":
        weights = sum(r.shape[0] * r.shape[1] for r in report.replaced)
        ratio = sum(r.details.get("ratio_4bit", 1.0) * r.shape[0] * r.shape[1] for r in report.replaced) / weights
        if ratio < MIXED_SAFE_RATIO_4BIT[calibrated] - 1e-6:
            how = ("calibrate (memboost.calibrate; memboost quantize --calibrate TEXT, best with --hessian or "
                   "--bits), or raise ratio_4bit (1.0 with group_size 32: 4.44 bits, within 1.3x)" if not calibrated
                   else "raise ratio_4bit or --bits, or add --hessian")
            return [f"mixed with {ratio:.0%} of the groups in 4 bits ({report.bits_per_weight:.2f} bits per weight)"
                    f"{'' if calibrated else ' and no calibration'} usually damages a model badly (SmolLM2-135M: "
                    f"{'perplexity 538 against 32 at ratio_4bit 0.1' if not calibrated else '2.7x its perplexity at ratio_4bit 0.25'}); "
                    f"{how}"]
    if method in ("ternary", "lort"):
        return [f"{method} weights of a model trained in float lose the model (SmolLM2-135M: perplexity over "
                f"{'600 million' if method == 'ternary' else '70,000'} against 32) unless it is trained "
                "afterwards (healing, as BitNet models are trained ternary); for a model to use as it is, choose "
                "mixed (ratio_4bit 1.0) or nf4"]
    return []


def check_params(method: str, params: Mapping, calibrated: bool = False):
    """The layer class of `method` (memboost.nn.QuantizedLinear.for_format)
    after checking that its quantizer takes every name in `params` and, when
    `calibrated`, calibration statistics: what quantize_model checks before
    any work, and what a command checks before loading the model."""
    layer_cls = QuantizedLinear.for_format(method)
    signature = inspect.signature(layer_cls.from_linear)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        accepted = [n for n in signature.parameters if n not in ("linear", "calibration")]
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise MemboostError(f"method {method!r} takes no parameter {unknown[0]!r}; its parameters are "
                                f"{', '.join(accepted)}")
        if calibrated and "calibration" not in signature.parameters:
            takes = sorted(name for name, cls in QuantizedLinear._layers.items()
                           if "calibration" in inspect.signature(cls.from_linear).parameters)
            raise MemboostError(f"method {method!r} does not use calibration statistics (only "
                                f"{' and '.join(takes)} {'do' if len(takes) > 1 else 'does'}): quantize without them")
    return layer_cls


PLANS = ("weights", "uniform")   # quantize_model's `plan`: the first is the default


def check_plan(plan) -> None:
    """Refuses a `plan` that quantize_model does not know."""
    if plan not in PLANS:
        raise MemboostError(f"'plan' must be 'weights' (the default: spread the mixed format's 4-bit groups by the "
                            f"weights when no calibration is given) or 'uniform' (the same ratio_4bit in every "
                            f"layer), got {plan!r}")


def quantize_call(method: str, params: Mapping, skip: Iterable[str], calibrated: bool, layers: int) -> dict:
    """The record of one quantize_model call that save_quantized writes into
    quantization_config's 'quantize_calls' (plain parameters only)."""
    plain = {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str))}
    return {"method": method, "params": plain, "skip": list(skip), "calibrated": calibrated, "layers": layers}


def _params_of(params: Mapping, full: str) -> Mapping:
    """The quantizer arguments of layer `full`: those given per layer ({layer name: value}) resolved."""
    per_layer = [k for k, v in params.items() if isinstance(v, Mapping)]
    if not per_layer:
        return params
    missing = [k for k in per_layer if full not in params[k]]
    if missing:
        raise MemboostError(f"'{missing[0]}' is given per layer but has no value for layer {full!r}")
    return {k: params[k][full] if k in per_layer else v for k, v in params.items()}


def select_layers(model: nn.Module, method: str, skip: Iterable[str] = ("lm_head",),
                  filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, name_prefix: str = "",
                  skipped: Optional[List[Tuple[str, str]]] = None, exclude: Optional[nn.Module] = None, **params):
    """The (qualified name, parent, attribute, nn.Linear view) of every layer
    of `model` that quantize_model would quantize with these arguments; the
    others go to `skipped` as (name, why). Raises when the format fits none
    of the layers it was not told to skip. Only shapes are read: `model`'s
    parameters may be on the meta device (memboost.io.streaming checks a
    whole model so before quantizing any block). `exclude`: a module left out
    without a reason (the output layer quantize_model quantizes apart)."""
    layer_cls = QuantizedLinear.for_format(method)
    skipped = [] if skipped is None else skipped
    refused = []   # (in_features, why) of the layers the format cannot take with these parameters
    targets = []
    for name, parent, child_name, child in _linears(model):
        if exclude is not None and child is exclude:
            continue
        full = name_prefix + name
        linear = _as_linear(child)
        why = (_skipped_by_name(full, skip)
               or (None if filter_fn is None or filter_fn(full, child) else "filter_fn returned False"))
        if not why:
            why = layer_cls.skip_reason(linear.in_features, linear.out_features, **_params_of(params, full))
            if why:
                refused.append((linear.in_features, why))
        if why:
            skipped.append((full, why))
        else:
            targets.append((full, parent, child_name, linear))
    if refused and not targets:
        hint = layer_cls.fitting_hint([k for k, _ in refused], **params)
        raise MemboostError(f"method {method!r} fits none of the {len(refused)} layers with these parameters "
                            f"({refused[0][1]}){'; ' + hint if hint else ''}")
    return targets


def quantize_model(model: nn.Module, method: str = "mixed", skip: Iterable[str] = ("lm_head",),
                   calibration: Optional[Mapping[str, torch.Tensor]] = None,
                   filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, verbose: bool = False,
                   progress: Optional[bool] = None, *, calibration_batches: Optional[Iterable] = None,
                   hessian: bool = False, name_prefix: str = "", lm_head: Optional[str] = "int8",
                   plan: str = "weights", **params) -> QuantizationReport:
    """Replaces, in place, every nn.Linear (and GPT-2 Conv1D) of `model` not
    named in `skip` and accepted by `filter_fn` with the drop-in layer of
    `method` (memboost.nn.QuantizedLinear.for_format), quantized with
    `params` (the format's quantizer arguments, e.g. ratio_4bit=0.25 for
    "mixed"; any of them may be a {layer name: value} mapping, as
    memboost.allocate_ratio_4bit returns, to set it per layer). `calibration`,
    from calibrate(), gives each layer's statistics by qualified name. Every
    layer is quantized before any is replaced, so an error leaves the model
    as it was.

    Returns a QuantizationReport (layers replaced with their realised
    parameters and bits, layers skipped and why, bytes before and after),
    printed when verbose=True; warns when no layer was replaced. A progress
    bar runs over the layers: progress=True always, False never, None (the
    default) when stderr is a terminal (memboost._progress).

    calibration_batches (instead of `calibration`): batches of model inputs
    (as for calibrate()); the model is then calibrated and quantized
    sequentially, stage by stage in the order the forward pass reaches the
    layers (a stage: the layers reading the same input, as q/k/v or
    gate/up), each stage measured on the inputs the already-quantized
    earlier stages produce, so that errors do not compound unseen. One
    stage's statistics are held at a time (hessian=True: each layer's full
    X^T X, with which the mixed format quantizes GPTQ-style); the forward
    passes stop at the stage being measured. When every layer lies in the
    blocks of a decoder (the entries of one nn.ModuleList, as a Hugging Face
    model's layers), each block's inputs are captured once, from the
    quantized block before it, and the block is run alone. If a layer fails, the layers
    already replaced are put back.

    name_prefix: prepended to every layer name (skip, filter_fn, per-layer
    params, calibration, the report) when `model` is one block of a larger
    model, e.g. "model.layers.3." (memboost.io.streaming quantizes a model
    block by block so).

    lm_head: "int8" (default) makes the model's output layer (its
    get_output_embeddings(), or a linear named lm_head) an int8 layer
    (memboost.nn.Int8Linear, llama.cpp's Q8_0 layout, 8.5 bits per weight)
    whatever `method` and `skip` say, with the act_bits the other layers get:
    a float output layer is the largest weight a small model reads per
    generated token. A tied input embedding stays float and is untied
    (config.tie_word_embeddings becomes False), so a checkpoint holds the
    float embedding once and the int8 output layer, and loading does not tie
    them again. None keeps the output layer as `skip` decides (float by
    default). The report lists it as `output_layer`.

    plan: "weights" (the default) has the mixed format, without calibration
    and with one ratio_4bit below 1 for every layer, spend the 4-bit groups
    that ratio gives the layers where the weights alone say they matter
    (memboost.model.plan.weights_plan), within the same stored bits, so that
    ratio_4bit stays the average ratio; report.plan and the table's 'plan'
    column say which layers got more or fewer and why. "uniform" keeps the
    same ratio_4bit in every layer. With calibration, a ratio per layer, or
    another format, the plan does not apply."""
    if not isinstance(model, nn.Module):
        raise MemboostTypeError(f"'model' must be an nn.Module, got {type(model).__name__}")
    layer_cls = check_params(method, params, calibrated=calibration is not None or calibration_batches is not None)
    if lm_head not in (None, "int8"):
        raise MemboostError(f"'lm_head' must be 'int8' (quantize the output layer to int8) or None (leave it as "
                            f"'skip' decides), got {lm_head!r}")
    check_plan(plan)
    if isinstance(skip, str):
        skip = (skip,)
    report = QuantizationReport(method)
    output = _output_layer(model) if lm_head is not None else None
    targets = select_layers(model, method, skip, filter_fn, name_prefix, report.skipped, exclude=output, **params)
    if calibration is not None and calibration_batches is not None:
        raise MemboostError("give 'calibration' (statistics from calibrate) or 'calibration_batches', not both")
    if calibration is not None:
        missing = [full for full, *_ in targets if full not in calibration]
        if missing:
            raise MemboostError(f"'calibration' has no statistics for {len(missing)} layer(s) to quantize, e.g. "
                                f"{missing[:3]}; run memboost.calibrate on the same model with the same skip")

    head = _quantize_output_layer(model, output, params, report) if output is not None else None
    given = params
    if plan == "weights" and calibration is None and calibration_batches is None:
        params = _weights_planned(model, layer_cls, targets, params, name_prefix, report)

    def quantize_one(full, linear, stats):
        extra = {} if stats is None else {"calibration": stats}
        try:
            layer = layer_cls.from_linear(linear, **_params_of(params, full), **extra)
        except MemboostError as exc:
            raise type(exc)(f"{full}: {exc}") from None
        layer.train(linear.training)  # the replaced layer's mode: a model in eval() stays in eval()
        q = layer.weight.tensor()
        report.replaced.append(LayerReport(
            full, (linear.out_features, linear.in_features), q.avg_bits,
            linear.weight.numel() * linear.weight.element_size(), q.nbytes,
            {**q._repr_fields(), **({"plan": report.plan[full]} if full in report.plan else {})}))
        return layer

    def bar(items, unit, total=None):
        return progress_bar(items, f"memboost {method}", unit=unit, total=total, progress=progress)

    if calibration_batches is not None:
        _check_batches(calibration_batches)
        batches = list(calibration_batches)
        if not batches:
            raise MemboostError("'calibration_batches' holds no batch")
        by_name = {full: (parent, child_name, linear) for full, parent, child_name, linear in targets}
        modules = {full: getattr(parent, child_name) for full, (parent, child_name, _) in by_name.items()}
        done = []   # (parent, child_name, original module): put back if a later stage fails
        try:
            stages = _stages(model, batches[0], modules)
            for stage, run in bar(_sequential_runs(model, batches, stages, name_prefix), "stage", total=len(stages)):
                stats = _input_moments(run, {n: modules[n] for n in stage}, hessian, stop_at=modules[stage[-1]])
                for full in stage:
                    parent, child_name, linear = by_name[full]
                    layer = quantize_one(full, linear, stats.get(full))
                    done.append((parent, child_name, getattr(parent, child_name)))
                    setattr(parent, child_name, layer)
                del stats
        except BaseException:
            for parent, child_name, original in reversed(done):
                setattr(parent, child_name, original)
            report.replaced.clear()
            raise
    else:
        replacements = []
        for full, parent, child_name, linear in bar(targets, "layer"):
            stats = None if calibration is None else calibration[full]
            replacements.append((parent, child_name, quantize_one(full, linear, stats)))
        for parent, child_name, layer in replacements:
            setattr(parent, child_name, layer)
    if head is not None:
        _replace_output_layer(model, *head)
    if report.replaced:
        report.warnings.extend(damage_warnings(method, report,
                                               calibration is not None or calibration_batches is not None))
    if report.replaced or head is not None:  # what save_quantized writes into quantization_config
        calls = list(getattr(model, "memboost_quantization", []))
        call = quantize_call(method, given, skip, calibration is not None or calibration_batches is not None,
                             len(report.replaced))
        if report.plan:
            call["plan"] = dict(report.plan)
        call["lm_head"] = None if head is None else lm_head
        calls.append(call)
        model.memboost_quantization = calls
    if not report.replaced:
        reasons = sorted({why for _, why in report.skipped})
        warnings.warn(f"memboost.quantize_model replaced no layer ({len(report.skipped)} skipped: "
                      f"{'; '.join(reasons[:3]) or 'the model has no linear layer'})", stacklevel=2)
    if verbose:
        print(report)
    return report


def _weights_planned(model: nn.Module, layer_cls, targets, params: Mapping, name_prefix: str,
                     report: QuantizationReport) -> Mapping:
    """`params` with the mixed format's one ratio_4bit (the quantizer's
    default when not given) replaced by weights_plan's ratio per layer, its
    reasons in report.plan; `params` as they are for any other format, a
    ratio of 0 or 1, or parameters given per layer."""
    if getattr(layer_cls, "format", None) != "mixed" or not targets:
        return params
    defaults = {name: p.default for name, p in inspect.signature(layer_cls.from_linear).parameters.items()}
    setting = {name: params.get(name, defaults.get(name)) for name in ("ratio_4bit", "group_size", "outlier_fraction")}
    if any(isinstance(v, (Mapping, bool)) or not isinstance(v, (int, float)) for v in setting.values()):
        return params
    if not 0.0 < setting["ratio_4bit"] < 1.0:
        return params
    from .plan import weights_plan

    # Each decoder block spends its own bits (and the layers outside the
    # blocks theirs): memboost.io.streaming, which quantizes one block at a
    # time, then plans the same as a whole model in memory.
    blocks = next(((prefix, len(prefix)) for prefix in (f"{n}." if n else "" for n, m in model.named_modules()
                   if isinstance(m, nn.ModuleList) and len(m) > 1)), None)
    parts: Dict[Optional[str], Dict[str, nn.Module]] = {}
    for full, _, _, linear in targets:
        name = full[len(name_prefix):]
        head = name[blocks[1]:].split(".", 1)[0] if blocks and name.startswith(blocks[0]) else ""
        parts.setdefault(head if head.isdigit() else None, {})[full] = linear
    ratios = {}
    for layers in parts.values():
        part_ratios, reasons = weights_plan(model, layers, setting["ratio_4bit"], int(setting["group_size"]),
                                            float(setting["outlier_fraction"]), name_prefix)
        ratios.update(part_ratios)
        report.plan.update(reasons)
    return dict(params, ratio_4bit=ratios)


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's output layer (an nn.Linear or Conv1D): its
    get_output_embeddings() when it has one, else the linear named lm_head."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None and (type(out) is nn.Linear or _is_conv1d(out)):
        return out
    for full, _, child_name, child in _linears(model):
        if child_name == "lm_head":
            return child
    return None


def _quantize_output_layer(model: nn.Module, output: nn.Module, params: Mapping, report: QuantizationReport):
    """(parent, attribute name, int8 layer) for the output layer, quantized
    (not yet put in place); None, with the reason in report.skipped, when
    its input size does not fit int8's blocks."""
    from ..nn import Int8Linear

    for full, parent, child_name, child in _linears(model):
        if child is output:
            break
    else:
        return None
    linear = _as_linear(output)
    why = Int8Linear.skip_reason(linear.in_features, linear.out_features)
    if why:
        report.skipped.append((full, f"lm_head int8: {why}"))
        return None
    act_bits = params.get("act_bits")
    if isinstance(act_bits, Mapping):
        act_bits = act_bits.get(full)
    try:
        layer = Int8Linear.from_linear(linear, act_bits=act_bits)
    except MemboostError as exc:
        raise type(exc)(f"{full}: {exc}") from None
    layer.train(output.training)
    q = layer.weight.tensor()
    report.output_layer = LayerReport(full, (linear.out_features, linear.in_features), q.avg_bits,
                                      linear.weight.numel() * linear.weight.element_size(), q.nbytes,
                                      {"format": "int8", **q._repr_fields()})
    return parent, child_name, layer


def _replace_output_layer(model: nn.Module, parent: nn.Module, child_name: str, layer: nn.Module) -> None:
    """Puts the int8 output layer in place; an input embedding it was tied
    to stays float and is untied in the config, so that transformers'
    tie_weights() (called when loading) does not put the float embedding
    back in its place."""
    setattr(parent, child_name, layer)
    _untie_output_layer(model, layer)


def _untie_output_layer(model: nn.Module, layer: nn.Module) -> None:
    """A quantized output layer is no longer the input embedding's tensor:
    the config stops tying them (transformers' tie_weights() would put the
    float embedding in the quantized layer's place)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = False
    tied_keys = getattr(model, "all_tied_weights_keys", None)
    name = next((n for n, m in model.named_modules() if m is layer), None)
    if isinstance(tied_keys, dict) and name is not None:
        model.all_tied_weights_keys = {k: v for k, v in tied_keys.items() if not k.startswith(name + ".")}


def quantize_linears_(model: nn.Module, ratio_4bit: Union[float, Mapping[str, float]] = 0.1, group_size: int = 64,
                      outlier_fraction: float = 0.002, skip: Iterable[str] = ("lm_head",),
                      filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                      calibration: Optional[Mapping[str, torch.Tensor]] = None,
                      exact_zero: Optional[bool] = None, calibration_batches: Optional[Iterable] = None,
                      hessian: bool = False, damp: float = 0.01, shrink: float = 0.5,
                      lm_head: Optional[str] = "int8") -> nn.Module:
    """quantize_model(model, method="mixed", ...) under its earlier name:
    replaces each eligible linear with a MixedLinear in place and returns the
    model (the report is quantize_model's); calibration_batches quantizes
    sequentially (see quantize_model); ratio_4bit may be a {layer name:
    ratio} plan from allocate_ratio_4bit."""
    quantize_model(model, "mixed", skip=skip, calibration=calibration, filter_fn=filter_fn,
                   calibration_batches=calibration_batches, hessian=hessian, lm_head=lm_head,
                   ratio_4bit=ratio_4bit, group_size=group_size, outlier_fraction=outlier_fraction,
                   exact_zero=exact_zero, damp=damp, shrink=shrink)
    return model


def load_quantized_(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                    assign: bool = False):
    """Loads a state_dict saved from a model that quantize_model changed
    into a model of the same architecture built as usual (plain nn.Linear
    layers, e.g. from its config): every linear whose weight is quantized in
    `state_dict` becomes its format's layer first, in place. Tied weights
    are tied again afterwards (model.tie_weights() when the model has it),
    except a quantized output layer (quantize_model's int8 lm_head), whose
    input embedding stays float and untied (config.tie_word_embeddings
    becomes False).
    assign=True takes the tensors instead of copying them (a model whose
    parameters are on the meta device). Returns load_state_dict's
    (missing_keys, unexpected_keys)."""
    replacements = []  # every layer is checked before any is replaced
    for full, parent, child_name, child in list(_linears(model)):
        prefix = f"{full}.weight."
        if prefix + FORMAT_INFO_KEY not in state_dict:
            continue
        parts = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        qtensor = QuantizedTensor.from_state_dict(parts, name=full)
        linear = _as_linear(child)
        if tuple(qtensor.shape) != tuple(linear.weight.shape):
            raise MemboostError(f"'state_dict' has a {type(qtensor).__name__} of shape {tuple(qtensor.shape)} for "
                                f"'{full}', a linear layer of weight shape {tuple(linear.weight.shape)}")
        device = child.weight.device
        layer = QuantizedLinear.for_format(qtensor.format).from_quantized(
            qtensor if device.type == "meta" else qtensor.to(device), linear.bias)
        replacements.append((parent, child_name, layer))
    output = _output_layer(model)
    for parent, child_name, layer in replacements:
        if getattr(parent, child_name) is output:
            _untie_output_layer(model, layer)  # a quantized output layer (int8 by default) is not tied again
        setattr(parent, child_name, layer)
    result = model.load_state_dict(state_dict, strict=strict, assign=assign)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return result
