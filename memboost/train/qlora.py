"""QLoRA on memboost's NF4: quantize a model's linears, train low-rank
adapters on top, save them in PEFT's format.

    model = memboost.qlora.prepare_model(model, r=16, alpha=32, dropout=0.05,
                                         target_modules=["q_proj", "v_proj"])
    memboost.qlora.num_trainable_parameters(model)
    ... train (only the adapters have requires_grad) ...
    memboost.qlora.save_adapter(model, "out/")      # adapter_model.safetensors + adapter_config.json
    memboost.qlora.load_adapter(model, "out/")      # also reads adapters PEFT wrote
    memboost.qlora.merge_adapters(model)            # fold B @ A into new NF4 weights
    memboost.qlora.unmerge_adapters(model)          # and back (restores the original NF4 weights)

Target modules follow PEFT's rule: a module is targeted when its qualified
name equals a target or ends with "." + target.
"""

import json
import os
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..errors import MemboostError, MemboostTypeError
from ..nn import NF4Linear, QLoRALinear
from ..formats.nf4 import quantize as nf4_quantize
from ..io.serialization import atomic_write, load_safetensors, save_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_CONFIG_ATTR = "_memboost_qlora"


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def prepare_model(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                  target_modules: Optional[List[str]] = None, block_size: int = 64, double_quant: bool = True,
                  compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Quantizes the targeted nn.Linear layers to NF4, wraps them in
    QLoRALinear (rank r, alpha, dropout), freezes every other parameter, and
    returns the model (changed in place). target_modules: names or name
    suffixes (PEFT's rule); default: every nn.Linear except `lm_head`."""
    if not isinstance(model, nn.Module):
        raise MemboostTypeError(f"'model' must be an nn.Module, got {type(model).__name__}")
    if target_modules is not None and (isinstance(target_modules, str) or
                                       not all(isinstance(t, str) for t in target_modules)):
        raise MemboostTypeError("'target_modules' must be a list of module names or name suffixes")
    prepared = qlora_layers(model)
    if prepared:
        # Again, it would wrap the adapters' own nn.Linear layers (lora_A, lora_B).
        raise MemboostError(f"'model' already has {len(prepared)} QLoRA layers (e.g. {next(iter(prepared))!r}): "
                            "prepare_model was called on it before; call it once, on a model of nn.Linear layers")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and (_matches(name, target_modules) if target_modules is not None
                                               else name.split(".")[-1] != "lm_head")]
    if not chosen:
        raise MemboostError(f"no nn.Linear matches target_modules={target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        layer = QLoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, block_size=block_size,
                                        double_quant=double_quant, compute_dtype=compute_dtype)
        _set_module(model, name, layer)
    targets = list(target_modules) if target_modules is not None else sorted({n.split(".")[-1] for n, _ in chosen})
    setattr(model, _CONFIG_ATTR, {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets})
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def qlora_layers(model: nn.Module) -> Dict[str, QLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def num_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base: W' = dequantize(W) + B @ A * alpha / r,
    quantized again to NF4 with the same block size. The adapters are kept
    (inactive while merged) and the original NF4 weight is kept so that
    unmerge_adapters restores it exactly."""
    for layer in qlora_layers(model).values():
        if layer.merged:
            continue
        base = layer.base_layer
        q = base.weight.tensor()
        merged = q.dequantize().float() + layer.delta_weight().to(q.device)
        layer._unmerged_weight = q.to(q.device)
        new = nf4_quantize(merged.to(q.dtype), block_size=q.block_size, double_quant=q.double_quant)
        base.weight._set(new)
        layer.merged = True
    return model


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> nn.Module:
    """The inverse of merge_adapters: the base gets its original NF4 weight
    back and the adapters are active again."""
    for layer in qlora_layers(model).values():
        if not layer.merged:
            continue
        original = getattr(layer, "_unmerged_weight", None)
        if original is None:  # merged state loaded from elsewhere: subtract and requantize
            q = layer.base_layer.weight.tensor()
            original = nf4_quantize((q.dequantize().float() - layer.delta_weight().to(q.device)).to(q.dtype),
                                    block_size=q.block_size, double_quant=q.double_quant)
        layer.base_layer.weight._set(original)
        layer._unmerged_weight = None
        layer.merged = False
    return model


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters under PEFT's key names (base_model.model.<module>.lora_A.weight, ...)."""
    layers = qlora_layers(model)
    if not layers:
        raise MemboostError("the model has no QLoRA layers (call memboost.qlora.prepare_model first)")
    state = {}
    for name, layer in layers.items():
        state[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        state[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    return state


def _config(model: nn.Module) -> dict:
    layers = qlora_layers(model)
    first = next(iter(layers.values()))
    info = getattr(model, _CONFIG_ATTR, None) or {
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": 0.0,
        "target_modules": sorted({n.split(".")[-1] for n in layers})}
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": list(info["target_modules"]), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "lora_bias": False,
    }


def save_adapter(model: nn.Module, directory: str) -> None:
    """Writes adapter_model.safetensors and adapter_config.json (PEFT's LoRA
    format) into `directory` (created if missing). Each file is written
    atomically; the weights first, so a config never points at missing ones."""
    state = adapter_state_dict(model)
    config = _config(model)
    if any(l.merged for l in qlora_layers(model).values()):
        raise MemboostError("adapters are merged into the base weights; unmerge_adapters(model) before saving them")
    os.makedirs(directory, exist_ok=True)
    save_safetensors(state, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with atomic_write(os.path.join(directory, ADAPTER_CONFIG)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Loads a PEFT LoRA adapter (ours or one PEFT wrote) into the model's
    QLoRA layers. Everything is checked first (config, key names, target
    modules, shapes); on any error nothing in the model has changed."""
    config_path, weights_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise MemboostError(f"adapter directory {directory!r} has no {os.path.basename(path)}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MemboostError(f"{config_path!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise MemboostError(f"{config_path!r}: peft_type must be 'LORA', got "
                            f"{config.get('peft_type') if isinstance(config, dict) else config!r}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise MemboostError(f"{config_path!r}: 'r' and 'lora_alpha' must be positive numbers, got {r!r}, {alpha!r}")
    if config.get("use_dora") or config.get("use_rslora") or config.get("rank_pattern") or \
            config.get("alpha_pattern") or config.get("bias", "none") != "none":
        raise MemboostError(f"{config_path!r}: DoRA, rsLoRA, per-module ranks and trained biases are not supported")
    state = load_safetensors(weights_path)
    layers = qlora_layers(model)
    incoming = {}
    for key, value in state.items():
        if not key.startswith(_PEFT_PREFIX) or not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise MemboostError(f"{weights_path!r}: unexpected key {key!r} (expected "
                                f"'{_PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        module, factor = key[len(_PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if module not in layers:
            raise MemboostError(f"{weights_path!r}: adapter for module {module!r}, which is not a QLoRA layer of "
                                f"this model (its QLoRA layers: {sorted(layers)[:6]}...)")
        incoming.setdefault(module, {})[factor] = value
    missing = sorted(set(layers) - set(incoming))
    if missing:
        raise MemboostError(f"{weights_path!r} has no adapter for the model's QLoRA layers {missing[:6]}")
    for module, factors in incoming.items():
        layer = layers[module]
        want = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
        for factor, shape in want.items():
            if factor not in factors:
                raise MemboostError(f"{weights_path!r}: module {module!r} has no {factor}")
            got = factors[factor]
            if tuple(got.shape) != shape:
                raise MemboostError(f"{weights_path!r}: {module}.{factor}.weight has shape {tuple(got.shape)}, "
                                    f"expected {shape} (r={r}, layer {layer.out_features}x{layer.in_features})")
            if not got.is_floating_point() or not bool(torch.isfinite(got).all()):
                raise MemboostError(f"{weights_path!r}: {module}.{factor}.weight must hold finite floats")
    with torch.no_grad():
        for module, factors in incoming.items():
            layer = layers[module]
            device = layer.base_layer.weight.device
            if layer.r != r:
                layer.lora_A = nn.Linear(layer.in_features, r, bias=False, device=device)
                layer.lora_B = nn.Linear(r, layer.out_features, bias=False, device=device)
            layer.lora_A.weight.copy_(factors["lora_A"])
            layer.lora_B.weight.copy_(factors["lora_B"])
            layer.r, layer.alpha, layer.scaling = r, alpha, alpha / r
    return model
