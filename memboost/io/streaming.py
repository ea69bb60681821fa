"""Quantizing a model larger than memory: decoder block by decoder block,
from its safetensors folder to a save_quantized folder.

    report = quantize_folder("Llama-3-8B", "llama-nf4", "nf4")
    report = quantize_folder("Llama-3-8B", "llama-mixed", "mixed", calibration_batches=windows, hessian=True)

The model is built from its config on the meta device (no memory; transformers'
classes), then each decoder block in turn gets its float weights read from
the shards (SafetensorsSource, into memory freed with the block: a memory
map's pages would stay in the process until the end), is quantized by quantize_model
(the same quantizers as the in-memory path), written (ShardWriter) and
dropped. With calibration batches, the inputs of the first block are captured
with only the tensors outside the blocks mapped (the embeddings), and each
block's outputs become the next block's inputs: by default through the block
already quantized (GPTQ's sequential order, as
quantize_model(calibration_batches=...)), with
sequential=False through the float block (as calibrate() on the float model
then quantize_model(calibration=...)). Either gives the tensors the in-memory
path gives. The layers outside the blocks (embeddings, final norm, lm_head)
come last.

Memory: one block's float weights, the calibration inputs of one block
(sequences x length x hidden, plus their outputs while the next inputs are
computed) and one stage's statistics (hessian=True: in x in float32 per layer
of the stage); the quantized tensors wait for their output shard in a
scratch file (ShardWriter's spill).
The output folder is written in a staging folder and renamed into place at
the end: an error or interruption leaves no output folder.
"""

import contextlib
import math
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .._progress import progress_bar
from ..errors import MemboostError, MemboostTypeError
from ..model.plan import _group_costs, loss_inputs_of, ratio_4bit_from_costs
from ..model.quantize import (QuantizationReport, _as_linear, _block_inputs, _block_outputs, _check_batches,
                              _input_moments, _is_conv1d, _linears, _output_layer, _run_batches, _skipped_by_name,
                              check_params, check_plan, damage_warnings, quantize_call, quantize_model,
                              select_layers)
from .checkpoint import (CONFIG_NAME, ScratchFile, ShardWriter, _own_dtype, _parameters_on_meta, _plain_float_dtype,
                         cast_for_storage, quantization_config_of, quantized_formats, replace_directory, write_config)
from .serialization import SafetensorsSource, _split_aliases, check_output_path

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def decoder_blocks(model: nn.Module) -> Tuple[nn.ModuleList, str]:
    """(the nn.ModuleList of a model's decoder blocks, its qualified name +
    "."): the outermost ModuleList whose entries all hold linear layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                any(type(m) is nn.Linear or _is_conv1d(m) for m in entry.modules()) for entry in module):
            return module, f"{name}." if name else ""
    raise MemboostError(f"{type(model).__name__} has no list of decoder blocks (an nn.ModuleList of blocks with "
                        "linear layers): it cannot be quantized block by block")


def _slots(module: nn.Module, prefix: str, tensors: Dict[int, List[Tuple[str, nn.Module, str, bool]]]):
    """Collects, for each parameter and persistent buffer of `module` (one
    entry per distinct tensor: tied ones share it), (qualified name, owning
    module, attribute, is a parameter)."""
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False):
        owner = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                tensors.setdefault(id(p), []).append((owner + attr, mod, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                tensors.setdefault(id(b), []).append((owner + attr, mod, attr, False))
    return tensors


def _materialize(module: nn.Module, prefix: str, source: SafetensorsSource, dtype: torch.dtype,
                 skip_prefix: Optional[str] = None, mapped: bool = False
                 ) -> List[Tuple[nn.Module, str, bool, torch.Tensor]]:
    """Gives every parameter (and persistent buffer) of `module`, named
    `prefix` in the model, its tensor from `source` (floating point ones in
    `dtype`), tied slots the same tensor. Names under `skip_prefix` (the
    decoder blocks, handled one by one) are left alone. mapped=False reads
    each tensor into memory of its own, freed with the module's tensors: a
    block's pages leave the process with the block (a memory map's pages
    would count in its resident memory until the source closes: the whole
    model's, 16 GB for an 8B model in bfloat16, by the last block).
    mapped=True maps them: for a model kept whole (load_mapped), or a pass
    that touches a few pages of large tensors (the embedding rows of the
    first block's inputs). Returns what _release needs to put the meta
    tensors back."""
    replaced = []
    for slots in _slots(module, prefix, {}).values():
        slots = [s for s in slots if skip_prefix is None or not s[0].startswith(skip_prefix)]
        if not slots:
            continue
        stored = [s for s in slots if source.has(s[0])]
        if not stored:
            if all(not is_param for *_, is_param in slots):
                continue   # a persistent buffer the checkpoint does not hold keeps its built value
            raise MemboostError(f"{source.path!r} has no tensor {slots[0][0]!r}, which the model built from its "
                                "config needs (a checkpoint whose names transformers converts while loading cannot "
                                "be streamed: load it whole)")
        name, mod, attr, _ = stored[0]
        current = getattr(mod, attr)
        t = source.get(name, mapped=mapped)
        if tuple(t.shape) != tuple(current.shape):
            raise MemboostError(f"{source.path!r}: tensor {name!r} has shape {tuple(t.shape)}, the model's config "
                                f"makes it {tuple(current.shape)}")
        if t.is_floating_point() and current.is_floating_point():
            t = t.to(dtype)
        for _, mod, attr, is_param in slots:
            table = mod._parameters if is_param else mod._buffers
            replaced.append((table, attr, table[attr]))
            table[attr] = nn.Parameter(t, requires_grad=False) if is_param else t
    return replaced


def _release(replaced) -> None:
    """Puts back the tensors _materialize replaced (the meta ones, tied as they were): the loaded ones are freed."""
    for table, attr, original in reversed(replaced):
        table[attr] = original


def _compute_dtype(dtype, config, source: SafetensorsSource) -> torch.dtype:
    """The dtype the float weights are quantized from and calibration runs
    in: `dtype`, or for "auto" the config's own (as from_pretrained's
    dtype="auto"), else the first floating-point tensor's."""
    if dtype != "auto":
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype not in _FLOAT_DTYPES:
            raise MemboostError(f"'dtype' must be 'auto' or one of {[str(d) for d in _FLOAT_DTYPES]}")
        return dtype
    own = getattr(config, "dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    if own in _FLOAT_DTYPES:
        return own
    for name in source.names():
        if source.torch_dtype(name) in _FLOAT_DTYPES:
            return source.torch_dtype(name)
    return torch.float32


def _as_keyword_inputs(inputs):
    """The captured (args, kwargs) of a block as ((), kwargs with hidden_states), so that quantize_model can
    call the block with each as a batch of keyword inputs."""
    converted = []
    for args, kwargs in inputs:
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors):
            raise MemboostError("the first decoder block's inputs depend on parameters inside the blocks: this "
                                "architecture cannot be calibrated block by block")
        if len(args) > 1:
            raise MemboostError("the decoder blocks take more than one positional input: they cannot be "
                                "calibrated block by block")
        converted.append(((), dict(kwargs, hidden_states=args[0]) if args else kwargs))
    return converted


def _read_config(source: str):
    """The transformers config of the plain model folder `source`, checked."""
    source = os.fspath(source)
    if not os.path.isdir(source):
        raise MemboostError(f"'source' {source!r} is not a model folder")
    config_path = os.path.join(source, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise MemboostError(f"{source!r} has no {CONFIG_NAME}: not a model folder")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise MemboostError(f"{config_path!r}: transformers cannot read this config: {exc}") from None
    if getattr(config, "quantization_config", None) is not None:
        raise MemboostError(f"{source!r} is already quantized (its config has a quantization_config)")
    return config


def _meta_model(source: str, config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with its parameters on the meta device, in eval mode, with the folder's
    generation config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with _parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, KeyError) as exc:
            raise MemboostError(f"{os.path.join(source, CONFIG_NAME)!r}: unsupported architecture: {exc}") from None
    if os.path.isfile(os.path.join(source, "generation_config.json")):
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(source, local_files_only=True)
    return model.eval()


def load_mapped(source: str, dtype: Union[str, torch.dtype] = "auto", verify: bool = True) -> nn.Module:
    """The plain Hugging Face model in the folder `source`, built on the meta
    device and given its tensors memory-mapped from the safetensors files
    (nothing is copied unless `dtype`, "auto": the config's, casts): its
    pages are the files', which the kernel can drop and read again, so a
    pass that reads each weight once (the GGUF export) runs in memory well
    below the model's size."""
    config = _read_config(source)
    with SafetensorsSource(source, verify=verify) as src:
        compute_dtype = _compute_dtype(dtype, config, src)
        model = _meta_model(source, config, compute_dtype)
        _materialize(model, "", src, compute_dtype, mapped=True)
    return model


def quantize_folder(source: str, directory: str, method: str = "mixed", skip: Iterable[str] = ("lm_head",), *,
                    calibration_batches: Optional[Iterable] = None, sequential: bool = True, hessian: bool = False,
                    dtype: Union[str, torch.dtype] = "auto", save_dtype: Union[str, torch.dtype, None] = "auto",
                    max_shard_size: Union[int, str] = "2GB", tokenizer=None, progress: Optional[bool] = None,
                    verify: bool = True, lm_head: Optional[str] = "int8", plan: str = "weights",
                    **params) -> QuantizationReport:
    """Quantizes the Hugging Face model in the folder `source` (config.json
    and safetensors weights, one file or shards) with `method` and `params`
    (as quantize_model) into `directory`, the folder save_quantized writes
    (created or replaced as a whole, only once everything is written),
    decoder block by decoder block so that only one block's float weights
    are in memory (see the module). `calibration_batches` (batches of model
    inputs, as quantize_model takes) calibrate the layers of the decoder
    blocks: sequential=True measures each block on the outputs of the
    quantized blocks before it (quantize_model(calibration_batches=...)),
    False on the float model's (calibrate() then quantize_model(calibration=
    ...)); hessian=True collects X^T X for the mixed format's GPTQ-style
    rounding. `dtype`: the dtype the weights are quantized from and the
    calibration runs in ("auto": the config's); `save_dtype`: that of the
    unquantized tensors in `directory` (save_quantized's `dtype`);
    `tokenizer` is saved with the model. A progress bar runs over the
    blocks (progress as quantize_model's). `plan` as quantize_model's: the
    weights plan spends each block's bits within the block, as it does in
    memory. Returns the QuantizationReport of all layers."""
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    calibrated = calibration_batches is not None
    check_params(method, params, calibrated=calibrated)
    check_plan(plan)
    if not (save_dtype is None or save_dtype == "auto" or save_dtype in _FLOAT_DTYPES):
        raise MemboostError(f"'save_dtype' must be 'auto', None or one of {[str(d) for d in _FLOAT_DTYPES]}, "
                            f"got {save_dtype!r}")
    batches = None
    if calibrated:
        _check_batches(calibration_batches)
        batches = list(calibration_batches)
        if not batches:
            raise MemboostError("'calibration_batches' holds no batch")
    source = os.fspath(source)
    config = _read_config(source)
    check_output_path(directory, folder=True)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(SafetensorsSource(source, verify=verify))
        compute_dtype = _compute_dtype(dtype, config, src)
        model = _meta_model(source, config, compute_dtype)
        blocks, blocks_prefix = decoder_blocks(model)
        # the whole model checked before any work (the output layer is int8's when lm_head says so)
        targets = select_layers(model, method, skip, exclude=_output_layer(model) if lm_head else None, **params)
        if not targets:
            raise MemboostError(f"no layer of {source!r} is left to quantize: every one is skipped")
        outside = [name for name, *_ in targets if not name.startswith(blocks_prefix)]
        # names only from here: the list holds every layer module, whose weights would then outlive their block
        # (each block's float weights kept to the end: the whole model's, in memory)
        del targets
        if calibrated and outside:
            raise MemboostError(f"calibrated quantization block by block covers the decoder blocks only; layer "
                                f"{outside[0]!r} lies outside them: add it to 'skip' (e.g. skip=('lm_head',))")
        storage_dtype = _own_dtype(model) if save_dtype == "auto" else save_dtype
        report = QuantizationReport(method)
        formats: Dict[str, str] = {}
        staging = stack.enter_context(replace_directory(directory))
        writer = ShardWriter(staging, max_shard_size, spill=True)

        inputs = None
        if calibrated:
            # The first block's inputs, with what lies outside the blocks mapped (embeddings; lm_head's pages
            # are never read: the forward passes stop at the first block).
            loaded = _materialize(model, "", src, compute_dtype, skip_prefix=blocks_prefix, mapped=True)
            inputs = _as_keyword_inputs(_block_inputs(model, blocks[0], batches))
            _release(loaded)

        def quantize_part(part, prefix, head=None, **extra):
            with warnings.catch_warnings():  # a block without a layer to quantize is not worth a warning
                warnings.filterwarnings("ignore", message="memboost.quantize_model replaced no layer")
                part_report = quantize_model(part, method, skip=skip, progress=False, name_prefix=prefix,
                                             lm_head=head, plan=plan, **extra, **params)
            report.replaced.extend(part_report.replaced)
            report.skipped.extend(part_report.skipped)
            report.plan.update(part_report.plan)
            if part_report.output_layer is not None:
                report.output_layer = part_report.output_layer

        bar = progress_bar(range(len(blocks)), f"memboost {method}", unit="block", total=len(blocks),
                           progress=progress)
        for i in bar:
            prefix = f"{blocks_prefix}{i}."
            block = blocks[i]
            _materialize(block, prefix, src, compute_dtype)
            if not calibrated:
                quantize_part(block, prefix)
            elif sequential:
                quantize_part(block, prefix, hessian=hessian, calibration_batches=[kw for _, kw in inputs])
                if i + 1 < len(blocks):
                    inputs = _block_outputs(block, inputs)
            else:
                layers = {prefix + name: child for name, _, _, child in _linears(block)
                          if _skipped_by_name(prefix + name, skip) is None}
                stats = _input_moments(lambda: _run_batches(block, [kw for _, kw in inputs]), layers, hessian)
                if i + 1 < len(blocks):
                    inputs = _block_outputs(block, inputs)
                quantize_part(block, prefix, calibration=stats)
                del stats
            block_formats = quantized_formats(block, prefix)
            formats.update(block_formats)
            state = block.state_dict(prefix=prefix)
            writer.add(cast_for_storage(state, block_formats, storage_dtype))
            blocks[i] = nn.Module()   # its float and quantized tensors are freed (the writer holds the latter)
            del block, state
        inputs = None

        # What lies outside the blocks: embeddings, final norm, lm_head (quantized when not skipped).
        loaded = _materialize(model, "", src, compute_dtype, skip_prefix=blocks_prefix)
        quantize_part(model, "", head=lm_head)  # the output layer as quantize_model's lm_head says
        rest_formats = quantized_formats(model)
        formats.update(rest_formats)
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks_prefix)}
        stored, aliases = _split_aliases(rest)
        plain_dtype = _plain_float_dtype(model, stored)
        # The float weights of a quantized lm_head are freed (1 GiB for the 8B shape) before a shard may be
        # written from the scratch file (its pages mapped meanwhile), the stored ones (the embedding) once they
        # are in the scratch file.
        _release(loaded)
        writer.add(cast_for_storage(stored, rest_formats, storage_dtype))
        del rest, stored
        writer.close(aliases)
        call = quantize_call(method, params, skip, calibrated, len(report.replaced))
        call["lm_head"] = lm_head if lm_head is not None and lm_head in rest_formats.values() else None
        if report.plan:
            call["plan"] = dict(report.plan)
        write_config(staging, model.config, quantization_config_of(formats, [call]), model.generation_config,
                     plain_dtype=plain_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    report.warnings.extend(damage_warnings(method, report, calibrated))
    return report


@contextlib.contextmanager
def _blocks_replaced_by(blocks: nn.ModuleList, last_output: List, returns_tuple: bool):
    """Inside, the model's decoder blocks pass their input through, except
    the last, which returns last_output[0]: a forward pass of the model is
    then its layers outside the blocks (embeddings, final norm, output
    layer and loss) on those hidden states. Each block keeps its attributes
    (the model may read them); only its forward is replaced."""
    def passthrough(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if returns_tuple else hidden

    def last(*args, **kwargs):
        return (last_output[0],) if returns_tuple else last_output[0]

    for i, block in enumerate(blocks):
        block.forward = last if i == len(blocks) - 1 else passthrough
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def allocate_ratio_4bit_folder(source: str, batches: Iterable, bits: float, skip: Iterable[str] = ("lm_head",),
                               group_size: int = 64, outlier_fraction: float = 0.002, *,
                               dtype: Union[str, torch.dtype] = "auto", verify: bool = True,
                               scratch: Optional[str] = None, progress: Optional[bool] = None) -> Dict[str, float]:
    """allocate_ratio_4bit for the model in the folder `source`, decoder
    block by decoder block: {layer name: ratio_4bit} for the layers of the
    decoder blocks not named in `skip` whose in_features group_size divides,
    storing at most `bits` bits per weight together; pass it as
    quantize_folder's ratio_4bit.

    The plan needs every layer's costs before any is quantized, and its
    sensitivities E[(dL/dy)^2] come from backpropagating the model's loss;
    both are measured on the float model, as allocate_ratio_4bit measures
    them, in two passes over the memory-mapped weights:
    - forward, block by block: each layer's E[x^2] (calibrate()'s) and each
      block's input hidden states, written to an unnamed scratch file in
      `scratch` (blocks x tokens x hidden in the compute dtype, on disk);
    - the loss on the last block's outputs (the layers outside the blocks),
      then backward, last block first: each block is run again on its saved
      input with gradients (one batch at a time), the gradient of its output
      carried back to its input (gradient checkpointing at block
      boundaries), and its layers' costs computed while its weights are
      mapped.
    No approximation: the plan is allocate_ratio_4bit's on the float model
    (up to the order of floating-point sums). Memory: one block's weights,
    the hidden states of every batch at one block boundary (and their
    gradients), one batch's activations with gradients inside one block and
    its logits."""
    choices, weights, _, _ = _plan_statistics(source, batches, bits, skip, group_size, outlier_fraction, dtype,
                                              verify, scratch, progress)
    return ratio_4bit_from_costs(choices, weights, bits)


def _plan_statistics(source, batches, bits, skip, group_size, outlier_fraction, dtype, verify, scratch, progress):
    """(each planned layer's [(cost, stored bits)], the planned weights, E[x^2] and E[(dL/dy)^2] of each
    planned layer) of allocate_ratio_4bit_folder's two passes."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits <= 0:
        raise MemboostError(f"'bits' must be a positive number of bits per weight, got {bits!r}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    _check_batches(batches)
    batches = list(batches)
    if not batches:
        raise MemboostError("'batches' holds no batch")
    loss_inputs = [loss_inputs_of(batch, i) for i, batch in enumerate(batches)]
    for i, (_, predicted) in enumerate(loss_inputs):
        if not predicted:
            raise MemboostError(f"batch {i} of 'batches' has no token ids to predict (input_ids or labels)")
    tokens = sum(predicted for _, predicted in loss_inputs)
    source = os.fspath(source)
    config = _read_config(source)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(SafetensorsSource(source, verify=verify))
        compute_dtype = _compute_dtype(dtype, config, src)
        model = _meta_model(source, config, compute_dtype)
        blocks, blocks_prefix = decoder_blocks(model)
        planned: List[Dict[str, nn.Module]] = []   # per block: {full name: layer}
        for i, block in enumerate(blocks):
            prefix = f"{blocks_prefix}{i}."
            planned.append({prefix + name: child for name, _, _, child in _linears(block)
                            if _skipped_by_name(prefix + name, skip) is None
                            and _as_linear(child).in_features % group_size == 0})
        if not any(planned):
            raise MemboostError(f"{source!r} has no layer in its decoder blocks whose in_features "
                                f"group_size={group_size} divides (every one skipped or not divisible)")

        loaded = _materialize(model, "", src, compute_dtype, skip_prefix=blocks_prefix, mapped=True)
        inputs = _as_keyword_inputs(_block_inputs(model, blocks[0], batches))
        _release(loaded)
        saved = ScratchFile(scratch)
        stack.callback(saved.close)

        # Forward: E[x^2] of each layer, each block's inputs saved.
        calibration: Dict[str, torch.Tensor] = {}
        entries: List[List] = []     # per block, per batch: its input hidden states in `saved`
        returns_tuple = False
        bar = progress_bar(range(len(blocks)), "bits plan: forward", unit="block", total=len(blocks),
                           progress=progress)
        for i in bar:
            loaded = _materialize(blocks[i], f"{blocks_prefix}{i}.", src, compute_dtype)
            entries.append([saved.write(kw["hidden_states"]) for _, kw in inputs])
            if i == len(blocks) - 1:
                with torch.no_grad():
                    returns_tuple = isinstance(blocks[i](**inputs[0][1]), (tuple, list))
            outputs = []
            calibration.update(_input_moments(lambda: outputs.append(_block_outputs(blocks[i], inputs)),
                                              planned[i], hessian=False))
            inputs = outputs[0]
            _release(loaded)
        keywords = [kw for _, kw in inputs]   # every block's inputs but the hidden states
        last_hidden = [kw["hidden_states"] for kw in keywords]
        del inputs, outputs

        # The loss on the last block's outputs: their gradients.
        loaded = _materialize(model, "", src, compute_dtype, skip_prefix=blocks_prefix)
        grads = []
        injected: List = [None]
        with _blocks_replaced_by(blocks, injected, returns_tuple), torch.enable_grad():
            for (kwargs, predicted), hidden in zip(loss_inputs, last_hidden):
                injected[0] = hidden.detach().requires_grad_(True)
                loss = getattr(model(**kwargs), "loss", None)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise MemboostError("the model returned no scalar loss for labels=...; the bits plan needs a "
                                        "model that computes its loss (a causal LM)")
                grads.append(torch.autograd.grad(loss * predicted, injected[0])[0].detach())
                injected[0] = None
        _release(loaded)
        del last_hidden

        # Backward, last block first: the layers' E[(dL/dy)^2], then their costs.
        choices: Dict[str, List] = {}
        weights: Dict[str, int] = {}
        sensitivity: Dict[str, torch.Tensor] = {}
        bar = progress_bar(range(len(blocks) - 1, -1, -1), "bits plan: backward", unit="block",
                           total=len(blocks), progress=progress)
        for i in bar:
            block, layers = blocks[i], planned[i]
            loaded = _materialize(block, f"{blocks_prefix}{i}.", src, compute_dtype)
            sums: Dict[str, torch.Tensor] = {}
            kept: List = []
            handles = [child.register_forward_hook(lambda m, args, out, name=name: kept.append((name, out)))
                       for name, child in layers.items()]
            try:
                hidden_in = saved.read(entries[i])
                for b, kw in enumerate(keywords):
                    kept.clear()
                    with torch.enable_grad():
                        x = hidden_in[b].detach().clone().requires_grad_(True)
                        out = block(**dict(kw, hidden_states=x))
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        got = torch.autograd.grad(out, [x] + [o for _, o in kept], grad_outputs=grads[b],
                                                  allow_unused=True)
                    grads[b] = None if got[0] is None else got[0].detach()
                    for (name, _), g in zip(kept, got[1:]):
                        if g is not None:
                            g2 = g.detach().float().reshape(-1, g.shape[-1]).square().sum(0)
                            sums[name] = sums[name] + g2 if name in sums else g2
                del hidden_in
            finally:
                kept.clear()
                for handle in handles:
                    handle.remove()
            for name, child in layers.items():
                if name not in sums or name not in calibration:
                    raise MemboostError(f"the calibration batches ran no input (or no gradient) through layer "
                                        f"{name!r}: it cannot be planned")
                linear = _as_linear(child)
                sensitivity[name] = sums[name] / tokens
                costs, stored = _group_costs(linear.weight, calibration[name].clamp_min(0).float(),
                                             sensitivity[name], group_size, outlier_fraction)
                choices[name] = list(zip(costs, stored))
                weights[name] = linear.weight.numel()
            _release(loaded)
            if any(g is None for g in grads) and i > 0:
                raise MemboostError(f"block {i}'s input gets no gradient from the loss: the blocks before it "
                                    "cannot be planned")
    order = [name for layers in planned for name in layers]   # the model's order, as allocate_ratio_4bit's
    return {name: choices[name] for name in order}, sum(weights.values()), calibration, sensitivity
