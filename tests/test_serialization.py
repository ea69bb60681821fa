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
    with pytest.raises(memboost.MemboostTypeError, match="'state' must be a dict of str -> torch.Tensor"):
        memboost.save_safetensors({"a": [1, 2]}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_load_names_missing_truncated_and_corrupt_files(tmp_path):
    with pytest.raises(memboost.MemboostError, match="'path'.*is not a file"):
        memboost.load_safetensors(str(tmp_path / "absent.safetensors"))
    path = str(tmp_path / "model.safetensors")
    memboost.save_safetensors(_state(), path)
    data = open(path, "rb").read()
    for name, content in (("truncated", data[:len(data) // 2]), ("garbage", b"not a safetensors file" * 4),
                          ("empty", b"")):
        bad = str(tmp_path / f"{name}.safetensors")
        with open(bad, "wb") as f:
            f.write(content)
        with pytest.raises(memboost.MemboostError, match="is not a .*safetensors file"):
            memboost.load_safetensors(bad)
    pt = str(tmp_path / "model.pt")
    torch.save(_state(), pt)
    with pytest.raises(memboost.MemboostError, match="not a safetensors file: it is a zip archive, as torch.save"):
        memboost.load_safetensors(pt)


def test_tied_tensors_are_stored_once_and_restored(tmp_path):
    emb = torch.randn(10, 4)
    state = {"embed.weight": emb, "norm": torch.ones(4), "lm_head.weight": emb}
    path = str(tmp_path / "tied.safetensors")
    memboost.save_safetensors(state, path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "norm"]
    loaded = memboost.load_safetensors(path)
    assert loaded.keys() == state.keys() and torch.equal(loaded["lm_head.weight"], emb)
    assert loaded["lm_head.weight"] is loaded["embed.weight"]
    # memory shared without being the same view is stored as separate copies
    memboost.save_safetensors({"a": emb, "b": emb[1:]}, path)
    loaded = memboost.load_safetensors(path)
    assert torch.equal(loaded["b"], emb[1:]) and torch.equal(loaded["a"], emb)


def test_write_failure_midway_leaves_the_old_file(tmp_path):
    from memboost.io.serialization import atomic_write
    path = str(tmp_path / "file.bin")
    with open(path, "wb") as f:
        f.write(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("boom")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["file.bin"]
    with pytest.raises(memboost.MemboostError, match="folder .* does not exist"):
        memboost.save_safetensors(_state(), str(tmp_path / "absent" / "x.safetensors"))


def test_a_header_length_whose_first_byte_looks_like_pickle_is_read(tmp_path):
    # The 8-byte header length comes first: a low byte of 0x80 is not a pickle.
    path = str(tmp_path / "x.safetensors")
    for name_len in range(1, 200):
        state = {"t" * name_len: torch.zeros(2)}
        memboost.save_safetensors(state, path)
        if open(path, "rb").read(1) == b"\x80":
            assert memboost.load_safetensors(path).keys() == state.keys()
            return
    pytest.fail("no header length with a low byte of 0x80 was produced")
