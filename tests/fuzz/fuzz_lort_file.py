"""lort.fileformat.load on mutated .lort files that lort.fileformat.save wrote
(LoRT layers of each alpha kind, uncompressed tensors of several dtypes, the
config and tokenizer metadata); every layer that loads is then exercised
(dequantize and linear), so a file the reader accepts is one the kernels take.
Read with the checksums checked (load or a named refusal), then without: a
hostile file can carry checksums that match, so the checks after them must
hold on their own, and the mutated bytes should reach them."""

import functools
import os

import torch

from lort.fileformat import LortFileError, load, save

import seeds as _seeds

PATH = os.path.join(_seeds.FOLDER, "input.lort")


@functools.lru_cache(maxsize=None)
def _files() -> tuple:
    layers = {f"model.layers.{i}.mlp.down_proj.weight": q for i, q in enumerate(_seeds.quantized("lort"))}
    tensors = {"model.norm.weight": torch.ones(8), "model.embed_tokens.weight": torch.randn(6, 8).half(),
               "step": torch.tensor([3]), "flags": torch.tensor([True, False])}
    meta = {"config": {"model_type": "llama", "hidden_size": 8}, "tokenizer": {"tokenizer.json": "{}"}}
    out = []
    for i, (lay, ten) in enumerate(((layers, tensors), (layers, {}), ({}, tensors))):
        path = os.path.join(_seeds.FOLDER, f"seed{i}.lort")
        save(path, lay, ten, meta=meta)
        with open(path, "rb") as f:
            out.append(f.read())
    return tuple(out)


def seeds():
    return list(_files())


def target(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        load(PATH)
    except LortFileError:
        pass
    for q in load(PATH, verify=False).layers.values():
        _seeds.exercise(q)
