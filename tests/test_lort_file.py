"""The .lort file: round trip, memory mapping, atomic streaming writes, hostile files."""

import os
import random
import struct

import pytest
import torch

import lort
from lort.fileformat import ALIGN, LortFileError, LortWriter, load, save

from conftest import llm_like_weight


def _layers():
    q1, _ = lort.decompose(llm_like_weight(48, 200, seed=1), rank=4, iters=1, per_row_alpha=True)
    q2, _ = lort.decompose(llm_like_weight(130, 64, seed=2, dtype=torch.bfloat16), rank=0, iters=1)
    return {"model.layers.0.mlp.up_proj.weight": q1, "model.layers.0.mlp.down_proj.weight": q2}


def _tensors():
    g = torch.Generator().manual_seed(3)
    return {"model.embed_tokens.weight": torch.randn(10, 8, generator=g).half(),
            "model.norm.weight": torch.ones(8), "step": torch.tensor(7), "mask": torch.tensor([True, False]),
            "empty": torch.zeros(0, 3)}


@pytest.fixture
def good_file(tmp_path):
    path = str(tmp_path / "m.lort")
    save(path, _layers(), _tensors(), meta={"config": {"model_type": "llama"}, "tokenizer": {"a.json": "{}"}})
    return path


def test_round_trip_is_exact_and_memory_mapped(good_file):
    f = load(good_file)
    assert f.config == {"model_type": "llama"} and f.tokenizer_files == {"a.json": "{}"}
    for name, q in _layers().items():
        back = f.layers[name]
        assert back.dtype == q.dtype and back.rank == q.rank and back.per_row_alpha == q.per_row_alpha
        assert torch.equal(back.dequantize(), q.dequantize())
        for key in ("alpha", "A", "B", "packed"):
            assert back.tensors[key].data_ptr() % ALIGN == 0  # mapped in place at aligned offsets
    for name, t in _tensors().items():
        assert f.tensors[name].dtype == t.dtype and torch.equal(f.tensors[name], t)
    f.tensors["model.norm.weight"].add_(1)  # copy-on-write: the file is untouched
    assert torch.equal(load(good_file).tensors["model.norm.weight"], torch.ones(8))
    assert list(f.layers) == list(_layers())  # order kept


def test_header_keeps_the_seed_fields(good_file):
    with open(good_file, "rb") as fh:
        magic, version, layers, tensors = struct.unpack("<4sIII", fh.read(16))
    assert (magic, version, layers, tensors) == (b"LORT", 3, 2, 5)


def test_writer_is_atomic_and_checks_its_counts(tmp_path, good_file):
    before = open(good_file, "rb").read()
    with pytest.raises(lort.fileformat.MemboostError, match="declared 2 layers and 5 tensors, wrote 1 and 0"):
        with LortWriter(good_file, 2, 5) as w:
            w.add_layer("x.weight", next(iter(_layers().values())))
    with pytest.raises(RuntimeError, match="boom"):
        with LortWriter(good_file, 2, 5) as w:
            raise RuntimeError("boom")
    assert open(good_file, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["m.lort"]  # no temporary file left behind
    with pytest.raises(lort.fileformat.MemboostError, match="not used before"):
        with LortWriter(str(tmp_path / "dup.lort"), 2, 0) as w:
            q = next(iter(_layers().values()))
            w.add_layer("x.weight", q)
            w.add_layer("x.weight", q)
    with pytest.raises(lort.fileformat.MemboostError, match="folder .* does not exist"):
        save(str(tmp_path / "no" / "such" / "m.lort"), _layers())
    assert not os.path.exists(tmp_path / "dup.lort")


def _rewrite(path, data):
    with open(path, "wb") as fh:
        fh.write(data)


def test_hostile_headers_are_named(tmp_path, good_file):
    data = bytearray(open(good_file, "rb").read())
    bad = str(tmp_path / "bad.lort")
    cases = [
        (b"PK\x03\x04" + data[4:], "not a .lort file"),
        (data[:4] + struct.pack("<I", 1) + data[8:], "version 1 is not supported .*seed's file"),
        (data[:4] + struct.pack("<I", 4) + data[8:], "version 4 is not supported .*upgrade"),
        (data[:8] + struct.pack("<I", 2**31) + data[12:], "cannot fit"),
        (data[:16] + struct.pack("<Q", 2**60) + data[24:], "metadata length"),
        (data[:16] + struct.pack("<Q", 2**20) + data[24:], "truncated: metadata"),
        (bytes(data) + b"\0" * 70, "unexpected bytes after the last record"),
        (b"LOR", "truncated header"),
        (b"", "not a .lort file"),
    ]
    for content, message in cases:
        _rewrite(bad, content)
        with pytest.raises(LortFileError, match=message):
            load(bad)
    with pytest.raises(LortFileError, match="is not a file"):
        load(str(tmp_path / "missing.lort"))


def test_every_truncation_is_refused(tmp_path, good_file):
    data = open(good_file, "rb").read()
    bad = str(tmp_path / "cut.lort")
    for cut in sorted(set(range(0, len(data), 97)) | {len(data) - 1}):
        _rewrite(bad, data[:cut])
        with pytest.raises(LortFileError):
            load(bad)


def test_huge_declared_sizes_do_not_allocate(tmp_path):
    # one tensor claiming 2^40 elements: refused by the length check, nothing allocated
    path = str(tmp_path / "huge.lort")
    save(path, {}, {"t": torch.zeros(4)})
    data = bytearray(open(path, "rb").read())
    at = data.index(b"t") + 1 + 8  # name, dtype and ndim: then the dims
    data[at:at + 8] = struct.pack("<Q", 2**40)
    _rewrite(path, data)
    with pytest.raises(LortFileError, match="byte count 16 disagrees with shape"):
        load(path)
    data[at + 8:at + 16] = struct.pack("<Q", 2**42)
    _rewrite(path, data)
    with pytest.raises(LortFileError, match="truncated: data"):
        load(path)


def test_random_byte_mutations_load_or_raise_the_documented_error(tmp_path, good_file):
    data = open(good_file, "rb").read()
    rng = random.Random(0)
    bad = str(tmp_path / "mut.lort")
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        _rewrite(bad, mutated)
        try:
            f = load(bad)
            for q in f.layers.values():
                q.dequantize()  # whatever loads is a valid weight the kernels accept
            outcomes["loaded"] += 1
        except LortFileError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes
