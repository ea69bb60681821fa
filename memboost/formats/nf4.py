"""NF4 (4-bit NormalFloat, the QLoRA format), bit for bit with bitsandbytes.

    q = memboost.nf4.quantize(w, block_size=64, double_quant=True)   # ~4.127 bits per weight
    w_hat = q.dequantize(); y = q.linear(x)
    sd = memboost.nf4.to_bitsandbytes(q)          # a bnb Linear4bit state_dict ("weight", "weight.absmax", ...)
    q2 = memboost.nf4.from_bitsandbytes(sd)       # and back

The layout (csrc/common/nf4.h, memboost/reference.py) is bitsandbytes': the
flattened weight in blocks of `block_size`, a float32 absmax per block, the
index of the nearest NF4 value of w / absmax, two codes per byte (element 2i
in the high nibble). With double quantization the absmax values are stored
as 8-bit codes of bitsandbytes' signed dynamic map, in blocks of 256 around
their mean (`nested_offset`), with a float32 absmax per 256 blocks.

State tensors: `codes` uint8 [ceil(n/2)]; `absmax` float32 [blocks] or, with
double quantization, uint8 [blocks] plus `nested_absmax` float32
[ceil(blocks/256)], `nested_map` float32 [256] and `nested_offset` float32
[1] (empty tensors without). Metadata: shape, dtype, block_size,
nested_block_size.
"""

import json
from typing import Dict, Optional

import torch

from .. import ops, reference
from ..errors import MemboostError, MemboostTypeError, check_float_weight
from .tensor import QuantizedTensor, dtype_from_name, dtype_name

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCK_SIZE = reference.NF4_NESTED_BLOCK_SIZE
_BNB_STATE_KEY = "quant_state.bitsandbytes__"


class NF4QuantizedTensor(QuantizedTensor):
    format = "nf4"
    version = 1
    tensor_names = ("codes", "absmax", "nested_absmax", "nested_map", "nested_offset")

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def nested_block_size(self) -> int:
        return int(self.meta["nested_block_size"])

    @property
    def double_quant(self) -> bool:
        return self.tensors["absmax"].dtype == torch.uint8

    @classmethod
    def zeros(cls, shape, dtype=torch.float32, block_size: int = 64, double_quant: bool = True,
              device=None) -> "NF4QuantizedTensor":
        """A valid all-zero weight (what a layer holds before load_state_dict)."""
        return quantize(torch.zeros(*shape, dtype=dtype, device=device), block_size, double_quant)

    def dequantize(self) -> torch.Tensor:
        return ops.nf4_dequantize(self.tensors, self.numel(), self.block_size, self.nested_block_size,
                                  self.dtype).view(self.shape)

    def block_scales(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded from the nested codes with double quantization)."""
        t = self.tensors
        return reference.nf4_block_scales(t["absmax"], t["nested_absmax"], t["nested_map"], t["nested_offset"],
                                          self.nested_block_size)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None
               ) -> torch.Tensor:
        """x @ W.T + bias straight from the codes. act_bits=None: exact float
        (equal to dequantize + F.linear within float rounding); 8: int8
        activations and int8 codebook on the CPU (llama.cpp's IQ4_NL recipe)."""
        if len(self.shape) != 2:
            raise MemboostError(f"linear needs a 2-D weight [out, in], this one has shape {tuple(self.shape)}")
        if act_bits not in (None, 0, 8):
            raise MemboostError(f"'act_bits' must be None (exact) or 8, got {act_bits!r}")
        return ops.nf4_linear(x, self.tensors, self.shape[0], self.block_size, self.nested_block_size, bias,
                              act_bits or 0)

    def linear_bound(self, bias: Optional[torch.Tensor] = None, act_bits: Optional[int] = None):
        if act_bits not in (None, 0, 8):
            raise MemboostError(f"'act_bits' must be None (exact) or 8, got {act_bits!r}")
        return ops.nf4_linear_bound(self.tensors, self.shape[0], self.block_size, self.nested_block_size, bias,
                                    act_bits or 0)

    def _repr_fields(self) -> dict:
        return {"block_size": self.block_size, "double_quant": self.double_quant}

    def _validate(self) -> None:
        meta, t = self.meta, self.tensors
        for key in ("shape", "dtype", "block_size", "nested_block_size"):
            if key not in meta:
                raise MemboostError(f"nf4 metadata is missing '{key}'")
        shape, bs, nbs = meta["shape"], meta["block_size"], meta["nested_block_size"]
        if not (isinstance(shape, list) and len(shape) >= 1 and all(type(s) is int and s >= 0 for s in shape)):
            raise MemboostError(f"metadata 'shape' must be a list of non-negative ints, got {shape!r}")
        if bs not in BLOCK_SIZES:
            raise MemboostError(f"metadata 'block_size' must be one of {BLOCK_SIZES}, got {bs!r}")
        if not (type(nbs) is int and nbs > 0):
            raise MemboostError(f"metadata 'nested_block_size' must be a positive int, got {nbs!r}")
        self.dtype  # validates the dtype name
        n = self.numel()
        blocks = -(-n // bs)
        for name in self.tensor_names:
            if not isinstance(t.get(name), torch.Tensor):
                raise MemboostError(f"'{name}' must be a tensor, got {type(t.get(name)).__name__}")
            if t[name].dim() != 1:
                raise MemboostError(f"'{name}' must be 1-D, got shape {tuple(t[name].shape)}")
        _expect(t, "codes", torch.uint8, (n + 1) // 2, f"two codes per byte for {n} weights")
        absmax = t["absmax"]
        if absmax.dtype == torch.float32:
            _expect(t, "absmax", torch.float32, blocks, f"one per block of {bs}")
            for name in ("nested_absmax", "nested_map", "nested_offset"):
                if t[name].numel():
                    raise MemboostError(f"'{name}' must be empty without double quantization (float32 'absmax')")
            a = absmax.detach().cpu()
            if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
                raise MemboostError("'absmax' must hold finite, non-negative values")
        elif absmax.dtype == torch.uint8:
            _expect(t, "absmax", torch.uint8, blocks, f"one code per block of {bs}")
            _expect(t, "nested_absmax", torch.float32, -(-blocks // nbs), f"one per {nbs} blocks")
            _expect(t, "nested_map", torch.float32, 256, "the 8-bit dynamic map")
            _expect(t, "nested_offset", torch.float32, 1, "the mean absmax")
            small = torch.cat([t[k].detach().cpu() for k in ("nested_absmax", "nested_map", "nested_offset")])
            if not bool(torch.isfinite(small).all()) or bool((t["nested_absmax"].detach().cpu() < 0).any()):
                raise MemboostError("'nested_absmax', 'nested_map' and 'nested_offset' must be finite "
                                    "(nested_absmax non-negative)")
            m = t["nested_map"].detach().cpu()
            if not bool((m[1:] >= m[:-1]).all()) or float(m.abs().max()) > 1.0:
                raise MemboostError("'nested_map' must be sorted ascending within [-1, 1]")
        else:
            raise MemboostError(f"'absmax' must have dtype torch.float32 (plain) or torch.uint8 (double "
                                f"quantization), got {absmax.dtype}")
        devices = {v.device for v in t.values()}
        if len(devices) > 1:
            raise MemboostError(f"nf4 tensors must be on one device, got {sorted(map(str, devices))}")


def _expect(t: dict, name: str, dtype: torch.dtype, numel: int, what: str) -> None:
    x = t[name]
    if x.dtype != dtype:
        raise MemboostError(f"'{name}' must have dtype {dtype}, got {x.dtype}")
    if x.numel() != numel:
        raise MemboostError(f"'{name}' must have {numel} entries ({what}), got {x.numel()}")


def quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4QuantizedTensor:
    """NF4 of w (any shape; fp32, fp16 or bf16; CPU or CUDA), bitsandbytes'
    layout and rounding. double_quant: quantize the block absmax values again
    (8-bit, blocks of 256; ~4.127 instead of ~4.5 bits per weight)."""
    check_float_weight(w)
    if type(block_size) is not int or block_size not in BLOCK_SIZES:
        raise MemboostError(f"'block_size' must be one of {BLOCK_SIZES} (bitsandbytes' sizes), got {block_size!r}")
    if not isinstance(double_quant, bool):
        raise MemboostTypeError(f"'double_quant' must be True or False, got {double_quant!r}")
    codes, absmax = ops.nf4_quantize(w.detach(), block_size)
    empty = absmax.new_empty(0)
    tensors = {"codes": codes, "absmax": absmax, "nested_absmax": empty, "nested_map": empty, "nested_offset": empty}
    if double_quant:
        offset = absmax.mean().reshape(1)  # bitsandbytes' offset: torch's mean, the same bits
        nested_map = reference.dynamic_map(absmax.device)
        codes8, nested = ops.nf4_quantize_absmax(absmax, offset, nested_map, NESTED_BLOCK_SIZE)
        tensors.update(absmax=codes8, nested_absmax=nested, nested_map=nested_map, nested_offset=offset)
    meta = {"shape": list(w.shape), "dtype": dtype_name(w.dtype), "block_size": block_size,
            "nested_block_size": NESTED_BLOCK_SIZE}
    return NF4QuantizedTensor(tensors, meta)


# The qlora-rs seed's names.
def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> NF4QuantizedTensor:
    return quantize(w, block_size=block_size)


def dequantize_nf4(q: NF4QuantizedTensor) -> torch.Tensor:
    if not isinstance(q, NF4QuantizedTensor):
        raise MemboostTypeError(f"'q' must be an NF4QuantizedTensor, got {type(q).__name__}")
    return q.dequantize()


# ------------------------------------------------------ bitsandbytes interop
def to_bitsandbytes(q: NF4QuantizedTensor, prefix: str = "weight") -> Dict[str, torch.Tensor]:
    """q as the state_dict entries of a bitsandbytes Linear4bit / Params4bit:
    `{prefix}` (uint8 [n/2, 1]), `{prefix}.absmax`, `{prefix}.quant_map`, with
    double quantization `{prefix}.nested_absmax` and `{prefix}.nested_quant_map`,
    and `{prefix}.quant_state.bitsandbytes__nf4` (JSON in a uint8 tensor)."""
    if not isinstance(q, NF4QuantizedTensor):
        raise MemboostTypeError(f"'q' must be an NF4QuantizedTensor, got {type(q).__name__}")
    t = q.tensors
    info = {"quant_type": "nf4", "blocksize": q.block_size, "dtype": dtype_name(q.dtype), "shape": list(q.shape)}
    out = {prefix: t["codes"].reshape(-1, 1), f"{prefix}.absmax": t["absmax"],
           f"{prefix}.quant_map": reference.nf4_codebook(t["codes"].device)}
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = t["nested_absmax"]
        out[f"{prefix}.nested_quant_map"] = t["nested_map"]
        info.update(nested_blocksize=q.nested_block_size, nested_dtype="float32",
                    nested_offset=float(t["nested_offset"].item()))
    payload = json.dumps(info).encode("utf-8")
    out[f"{prefix}.{_BNB_STATE_KEY}nf4"] = torch.tensor(list(payload), dtype=torch.uint8)
    return out


def from_bitsandbytes(state_dict: Dict[str, torch.Tensor], prefix: str = "weight") -> NF4QuantizedTensor:
    """The NF4 weight stored under `prefix` in a bitsandbytes Linear4bit
    state_dict (what to_bitsandbytes writes, and what bitsandbytes and
    transformers save). Refuses fp4 and other quant types."""
    if not isinstance(state_dict, dict):
        raise MemboostTypeError(f"'state_dict' must be a dict of tensors, got {type(state_dict).__name__}")
    state_keys = [k for k in state_dict if k.startswith(f"{prefix}.{_BNB_STATE_KEY}")]
    if not state_keys:
        raise MemboostError(f"no '{prefix}.{_BNB_STATE_KEY}<type>' entry in the state_dict: not a bitsandbytes "
                            f"4-bit weight (keys: {sorted(state_dict)[:8]})")
    if len(state_keys) > 1:
        raise MemboostError(f"several quant_state entries for '{prefix}': {sorted(state_keys)}")
    key = state_keys[0]
    quant_type = key[len(f"{prefix}.{_BNB_STATE_KEY}"):]
    if quant_type != "nf4":
        raise MemboostError(f"'{key}': quant type {quant_type!r} is not supported; memboost reads NF4 only")
    raw = state_dict[key]
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise MemboostError(f"'{key}' must be a 1-D torch.uint8 tensor holding JSON")
    try:
        info = json.loads(raw.cpu().numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MemboostError(f"'{key}' does not hold valid JSON (corrupt or truncated): {exc}") from None
    if not isinstance(info, dict):
        raise MemboostError(f"'{key}' must hold a JSON object, got {type(info).__name__}")
    if info.get("quant_type") != "nf4":
        raise MemboostError(f"'{key}': quant_type {info.get('quant_type')!r} is not supported; memboost reads "
                            f"NF4 only")
    for field in ("blocksize", "dtype", "shape"):
        if field not in info:
            raise MemboostError(f"'{key}' is missing the field '{field}'")
    shape, bs = info["shape"], info["blocksize"]
    if not (isinstance(shape, list) and shape and all(type(s) is int and s >= 0 for s in shape)):
        raise MemboostError(f"'{key}': 'shape' must be a list of non-negative ints, got {shape!r}")
    dtype = dtype_from_name(info["dtype"])

    def get(name: str) -> torch.Tensor:
        k = f"{prefix}.{name}" if name else prefix
        if k not in state_dict:
            raise MemboostError(f"bitsandbytes state_dict is missing '{k}'")
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            raise MemboostError(f"'{k}' must be a tensor, got {type(v).__name__}")
        return v

    codes = get("")
    if codes.dtype != torch.uint8:
        raise MemboostError(f"'{prefix}' must hold the packed codes as torch.uint8 (quant_storage uint8), "
                            f"got {codes.dtype}")
    quant_map = get("quant_map")
    if quant_map.numel() != 16 or not torch.equal(quant_map.detach().float().cpu(), reference.nf4_codebook()):
        raise MemboostError(f"'{prefix}.quant_map' is not the NF4 codebook")
    absmax = get("absmax")
    nested_keys = ("nested_blocksize", "nested_offset")
    empty = torch.empty(0, dtype=torch.float32, device=codes.device)
    tensors = {"codes": codes.reshape(-1), "absmax": absmax, "nested_absmax": empty, "nested_map": empty,
               "nested_offset": empty}
    nested_bs = NESTED_BLOCK_SIZE
    if any(k in info for k in nested_keys):
        for k in nested_keys:
            if k not in info:
                raise MemboostError(f"'{key}' has nested statistics but no '{k}'")
        if info.get("nested_dtype", "float32") != "float32":
            raise MemboostError(f"'{key}': nested_dtype {info.get('nested_dtype')!r} is not supported (float32)")
        offset = info["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise MemboostError(f"'{key}': 'nested_offset' must be a number, got {offset!r}")
        nested_bs = info["nested_blocksize"]
        tensors.update(nested_absmax=get("nested_absmax"), nested_map=get("nested_quant_map"),
                       nested_offset=torch.tensor([float(offset)], dtype=torch.float32, device=codes.device))
    elif absmax.dtype != torch.float32:
        raise MemboostError(f"'{prefix}.absmax' must be float32 without nested statistics, got {absmax.dtype}")
    meta = {"shape": shape, "dtype": dtype_name(dtype), "block_size": bs, "nested_block_size": nested_bs}
    try:
        return NF4QuantizedTensor(tensors, meta)
    except MemboostError as exc:
        raise MemboostError(f"bitsandbytes weight '{prefix}': {exc}") from None
