"""memboost.save_safetensors / load_safetensors: exact, atomic, clear errors."""

import os

import pytest
import torch
from torch import nn

import memboost
from memboost.nn import MixedLinear


def _state():
    torch.manual_seed(0)
    model = nn.Sequential(MixedLinear.from_linear(nn.Linear(128, 64), ratio_4bit=0.25, outlier_fraction=0.01),
                          nn.LayerNorm(64))
    return model.state_dict()


def test_round_trip_is_exact(tmp_path):
    state = _state()
    path = str(tmp_path / "model.safetensors")
    memboost.save_safetensors(state, path, metadata={"note": "test"})
    loaded = memboost.load_safetensors(path)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "model.safetensors")
    memboost.save_safetensors(_state(), path)
    before = open(path, "rb").read()
    shared = torch.zeros(8)
    with pytest.raises(Exception):  # safetensors refuses tensors that share memory
        memboost.save_safetensors({"a": shared, "b": shared}, path)
    with pytest.raises(TypeError, match="'state' must be a dict of str -> torch.Tensor"):
        memboost.save_safetensors({"a": [1, 2]}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_load_names_missing_truncated_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="'path'"):
        memboost.load_safetensors(str(tmp_path / "absent.safetensors"))
    path = str(tmp_path / "model.safetensors")
    memboost.save_safetensors(_state(), path)
    data = open(path, "rb").read()
    for name, content in (("truncated", data[:len(data) // 2]), ("garbage", b"not a safetensors file" * 4),
                          ("empty", b"")):
        bad = str(tmp_path / f"{name}.safetensors")
        with open(bad, "wb") as f:
            f.write(content)
        with pytest.raises(ValueError, match="not a complete safetensors file"):
            memboost.load_safetensors(bad)
