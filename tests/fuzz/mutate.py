"""Structured mutations for the fuzz harnesses whose loaders take a dict of
tensors (QuantizedTensor.from_state_dict, the bitsandbytes conversion) or a
folder of files (load_quantized, the PEFT adapter loader).

A dict input is a valid state (written by memboost) plus the fuzz bytes read
as a list of edits through atheris.FuzzedDataProvider: flip bytes of a
tensor, set elements to extreme values, change a dtype, a shape or the
strides, drop or add keys, and edit the JSON metadata (fields set to odd
values, removed, or its bytes changed). The same bytes always give the same
edits, so a failing input replays exactly.

A folder input is one selector byte (which file of which template folder)
followed by that file's new contents.
"""

import json
import math
import os
import shutil

import atheris
import torch

DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool)
INT_VALUES = (0, 1, -1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4096, 32767, -32768,
              65535, 65536, 2**31 - 1, -2**31, 2**32, 2**62, -2**63)
FLOAT_VALUES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, 65504.0, 3e38, math.inf, -math.inf, math.nan)
JSON_VALUES = (None, True, False, "", "x", "float16", "float32", "bfloat16", "float64", "mixed", "ternary", "nf4",
               "lort", "absmean", [], [0], [1], [0, 0], [1, 1], [2, 64], [64, 2], [-1, 64], [2**31, 2**31],
               [2**62, 2], [1, 2, 3], [[1], 2], ["1", 2], [1.5, 2], {}, {"a": 1}, 1.5, math.nan, math.inf)
FIELD_NAMES = ("shape", "dtype", "group_size", "block_size", "nested_block_size", "method", "format", "version",
               "quant_type", "blocksize", "nested_blocksize", "nested_offset", "nested_dtype")


def pick(fdp, seq):
    return seq[fdp.ConsumeIntInRange(0, len(seq) - 1)]


def _json_value(fdp):
    if fdp.ConsumeBool():
        return pick(fdp, INT_VALUES) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-300, 5000)
    return pick(fdp, JSON_VALUES)


def _edit_json(fdp, info: dict) -> None:
    keys = sorted(info) + list(FIELD_NAMES)
    key = pick(fdp, keys)
    op = fdp.ConsumeIntInRange(0, 3)
    if op == 0:
        info.pop(key, None)
    elif op == 1 and isinstance(info.get(key), list) and info[key]:
        lst = list(info[key])
        lst[fdp.ConsumeIntInRange(0, len(lst) - 1)] = _json_value(fdp)
        info[key] = lst
    elif op == 2 and isinstance(info.get(key), int) and not isinstance(info.get(key), bool):
        info[key] += fdp.ConsumeIntInRange(-70, 70)
    else:
        info[key] = _json_value(fdp)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))  # dense, stride 1
    return flat.view(torch.uint8) if t.dtype != torch.bool else flat.to(torch.uint8)


def _edit_tensor(fdp, t: torch.Tensor) -> object:
    op = fdp.ConsumeIntInRange(0, 8)
    if op == 0 and t.numel():  # overwrite a few raw bytes
        raw = _as_bytes(t)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            raw[fdp.ConsumeIntInRange(0, raw.numel() - 1)] = fdp.ConsumeIntInRange(0, 255)
        return raw.view(t.dtype).reshape(t.shape) if t.dtype != torch.bool else raw.bool().reshape(-1)[:t.numel()].reshape(t.shape)
    if op == 1 and t.numel():  # extreme values at a few positions
        out = t.detach().clone().reshape(-1)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            i = fdp.ConsumeIntInRange(0, out.numel() - 1)
            if out.is_floating_point():
                out[i] = pick(fdp, FLOAT_VALUES)
            elif out.dtype == torch.bool:
                out[i] = fdp.ConsumeBool()
            else:
                info = torch.iinfo(out.dtype)
                out[i] = max(info.min, min(info.max, pick(fdp, INT_VALUES)))
        return out.reshape(t.shape)
    if op == 2:  # another dtype (values converted)
        return t.to(pick(fdp, DTYPES))
    if op == 3:  # the same bytes read as another dtype, when they fit
        dt = pick(fdp, DTYPES)
        raw = _as_bytes(t)
        size = torch.empty(0, dtype=dt).element_size()
        return raw[:raw.numel() // size * size].view(dt) if dt != torch.bool else raw.bool()
    if op == 4:  # fewer or more elements
        flat = t.detach().reshape(-1)
        n = fdp.ConsumeIntInRange(0, flat.numel() + 64)
        out = flat[:n] if n <= flat.numel() else torch.cat([flat, flat.new_zeros(n - flat.numel())])
        return out if fdp.ConsumeBool() or t.dim() < 2 or not t.shape[-1] or n % t.shape[-1] else out.reshape(-1, t.shape[-1])
    if op == 5:  # same elements, another shape
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            return t.reshape(-1)
        if choice == 1:
            return t.unsqueeze(fdp.ConsumeIntInRange(0, t.dim()))
        if choice == 2 and t.dim() >= 2:
            return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) if t.shape[0] else t.reshape(0)
        return t.reshape(1, -1) if t.numel() else t.reshape(0, 0)
    if op == 6:  # non-contiguous views
        if t.dim() >= 2:
            return t.t() if fdp.ConsumeBool() else t[:, ::2]
        return t[::2] if fdp.ConsumeBool() else t.expand(2, *t.shape)
    if op == 7:  # not a tensor at all
        return pick(fdp, (None, 0, 1.5, "codes", [1, 2], b"\x00"))
    return torch.empty(0, dtype=t.dtype) if fdp.ConsumeBool() else torch.zeros((), dtype=t.dtype)


def mutate_state(data: bytes, states: list, json_keys=("format_info",)) -> dict:
    """One of `states` (picked by the first bytes) edited as `data` says.
    Tensors under `json_keys` hold JSON (memboost.tensor.encode_json) and are
    edited as JSON objects most of the time."""
    fdp = atheris.FuzzedDataProvider(data)
    state = dict(states[fdp.ConsumeIntInRange(0, len(states) - 1)])
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        keys = sorted(state)
        if not keys:
            break
        key = pick(fdp, keys)
        action = fdp.ConsumeIntInRange(0, 9)
        value = state[key]
        if action <= 3 and any(j in key for j in json_keys) and isinstance(value, torch.Tensor) \
                and value.dtype == torch.uint8 and value.dim() == 1:
            try:
                info = json.loads(value.numpy().tobytes().decode("utf-8"))
            except ValueError:
                info = None
            if isinstance(info, dict):
                _edit_json(fdp, info)
                payload = json.dumps(info, sort_keys=True).encode("utf-8")
                state[key] = torch.tensor(list(payload), dtype=torch.uint8)
                continue
        if action == 8:
            del state[key]
        elif action == 9:  # a renamed or extra key
            new = key + pick(fdp, ("", "x", ".weight", "4")) if fdp.ConsumeBool() else key[:-1]
            state[new] = state.pop(key) if fdp.ConsumeBool() else value
        elif isinstance(value, torch.Tensor):
            try:
                state[key] = _edit_tensor(fdp, value)
            except (RuntimeError, IndexError, ValueError):  # an edit this tensor cannot take: skip it
                pass
    return state


class FolderInputs:
    """Template folders (written by memboost) whose files the fuzz input
    replaces one at a time: input = selector byte + the new file's bytes."""

    def __init__(self, root: str, templates: list):
        self.root = root
        self.templates = templates  # folder paths
        self.files = [(d, name) for d in templates for name in sorted(os.listdir(d))]

    def seeds(self) -> list:
        out = []
        for i, (d, name) in enumerate(self.files):
            with open(os.path.join(d, name), "rb") as f:
                out.append(bytes([i]) + f.read())
        return out

    def apply(self, data: bytes) -> str:
        """A scratch copy of the selected template with the selected file
        replaced by data[1:] (an empty input replaces nothing); returns its path."""
        scratch = os.path.join(self.root, "scratch")
        shutil.rmtree(scratch, ignore_errors=True)
        index = data[0] % len(self.files) if data else 0
        folder, name = self.files[index]
        shutil.copytree(folder, scratch)
        if data:
            with open(os.path.join(scratch, name), "wb") as f:
                f.write(data[1:])
        return scratch
