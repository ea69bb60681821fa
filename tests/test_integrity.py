"""Checksums: damaged bytes in a saved folder, a safetensors file or a .lort file are
named (tensor and file) at load; verify=False / --no-verify loads anyway; files
written before checksums existed still load."""

import json
import os
import re
import struct

import pytest
import torch

import memboost
from memboost.io.serialization import CHECKSUMS_KEY

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def _tiny_quantized(method="mixed", **params):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    memboost.quantize_model(model, method, progress=False, **params)
    return model


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _damage(path, name, seed=0):
    """Random bytes over the middle of tensor `name`'s data in a safetensors file."""
    start, header = _header(path)
    begin, end = header[name]["data_offsets"]
    at = start + (begin + end) // 2
    count = max(1, min(16, (end - begin) // 2))
    data = bytearray(open(path, "rb").read())
    noise = torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    noise = bytes(noise.tolist())
    if data[at:at + count] == noise:  # vanishingly unlikely; keep the test honest
        noise = bytes(b ^ 0xFF for b in noise)
    data[at:at + count] = noise
    with open(path, "wb") as f:
        f.write(data)


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 7, 11]])).logits


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight.codes", "model.embed_tokens.weight",
                                  "model.norm.weight"])
def test_damaged_tensor_in_a_saved_folder_is_named(tmp_path, name):
    model = _tiny_quantized("nf4")
    directory = tmp_path / "m"
    memboost.save_quantized(model, directory)
    path = str(directory / "model.safetensors")
    _damage(path, name)
    with pytest.raises(memboost.MemboostError, match=rf"model\.safetensors.*tensor '{name}' is damaged"):
        memboost.load_quantized(directory)
    with pytest.raises(memboost.MemboostError, match=f"'{name}' is damaged"):
        memboost.load_safetensors(path)
    damaged = memboost.load_quantized(directory, verify=False)  # the opt-out reads the bytes as they are
    # (the tensor itself: the damaged embedding rows feed no logit of _logits' tokens now that the int8
    # output layer no longer shares the embedding)
    assert not torch.equal(damaged.state_dict()[name], model.state_dict()[name])


def test_damage_in_a_shard_names_the_shard(tmp_path):
    model = _tiny_quantized("mixed", ratio_4bit=0.5)
    directory = tmp_path / "m"
    memboost.save_quantized(model, directory, max_shard_size="20KB")
    index = json.load(open(directory / "model.safetensors.index.json"))["weight_map"]
    name = "model.layers.0.self_attn.o_proj.weight.plane2"
    shard = index[name]
    _damage(str(directory / shard), name, seed=3)
    with pytest.raises(memboost.MemboostError, match=rf"{shard}'?: tensor '{name}' is damaged"):
        memboost.load_quantized(directory)
    memboost.load_quantized(directory, verify=False)


def test_every_stored_tensor_has_a_checksum_and_a_clean_folder_loads(tmp_path):
    model = _tiny_quantized("mixed", ratio_4bit=0.5)
    memboost.save_quantized(model, tmp_path / "m")
    _, header = _header(str(tmp_path / "m" / "model.safetensors"))
    checksums = json.loads(header["__metadata__"][CHECKSUMS_KEY])
    assert set(checksums) == set(header) - {"__metadata__"} and len(checksums) > 10
    assert torch.equal(_logits(memboost.load_quantized(tmp_path / "m")), _logits(model))


def test_a_folder_written_before_checksums_still_loads(tmp_path):
    """The files of a folder saved by memboost before this change: the same
    tensors and metadata without the checksum key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _tiny_quantized("mixed", ratio_4bit=0.5)
    directory = tmp_path / "m"
    memboost.save_quantized(model, directory, max_shard_size="20KB")
    shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(shards) > 1
    for shard in shards:
        path = str(directory / shard)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert metadata.pop(CHECKSUMS_KEY)
        save_file(tensors, path, metadata=metadata)
    assert torch.equal(_logits(memboost.load_quantized(directory)), _logits(model))


def test_a_damaged_checksum_table_is_refused(tmp_path):
    path = str(tmp_path / "t.safetensors")
    memboost.save_safetensors({"a": torch.arange(10.0), "b": torch.ones(3)}, path)
    data = open(path, "rb").read()
    # the recorded CRC of "a" changed (same length, so the header still parses)
    start, header = _header(path)
    crc = json.loads(header["__metadata__"][CHECKSUMS_KEY])["a"]
    other = f"{int(crc, 16) ^ 1:08x}"
    with open(path, "wb") as f:
        f.write(data.replace(crc.encode(), other.encode(), 1))
    with pytest.raises(memboost.MemboostError, match="tensor 'a' is damaged"):
        memboost.load_safetensors(path)
    assert torch.equal(memboost.load_safetensors(path, verify=False)["a"], torch.arange(10.0))


def test_safetensors_source_checks_each_tensor_it_reads(tmp_path):
    from memboost.io.serialization import SafetensorsSource

    path = str(tmp_path / "t.safetensors")
    memboost.save_safetensors({"a": torch.arange(100.0), "b": torch.ones(30)}, path)
    _damage(path, "b")
    with SafetensorsSource(path) as src:
        assert torch.equal(src.get("a"), torch.arange(100.0))  # lazily: only what is read is checked
        with pytest.raises(memboost.MemboostError, match="tensor 'b' is damaged"):
            src.get("b")
    with SafetensorsSource(path, verify=False) as src:
        assert not torch.equal(src.get("b"), torch.ones(30))


def test_from_pretrained_checks_the_checksums(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = _tiny_quantized("nf4")
    directory = tmp_path / "m"
    memboost.save_quantized(model, directory)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(directory)), _logits(model))
    name = "model.layers.0.self_attn.q_proj.weight.codes"
    _damage(str(directory / "model.safetensors"), name)
    with pytest.raises(memboost.MemboostError, match=f"tensor '{name}' is damaged"):
        AutoModelForCausalLM.from_pretrained(directory)
    monkeypatch.setenv("MEMBOOST_VERIFY", "0")
    AutoModelForCausalLM.from_pretrained(directory)


# -- .lort files -----------------------------------------------------------------
def _lort_file(tmp_path, version=None):
    import lort
    from lort.fileformat import LortWriter

    from conftest import llm_like_weight

    q, _ = lort.decompose(llm_like_weight(48, 200, seed=1), rank=4, iters=1, per_row_alpha=True)
    tensors = {"model.embed_tokens.weight": torch.randn(10, 8, generator=torch.Generator().manual_seed(2)).half(),
               "model.norm.weight": torch.ones(8)}
    path = str(tmp_path / f"m{version or ''}.lort")
    with LortWriter(path, 1, len(tensors), {"config": None}, **({"version": version} if version else {})) as w:
        w.add_layer("model.layers.0.mlp.up_proj.weight", q)
        for name, t in tensors.items():
            w.add_tensor(name, t)
    return path, q, tensors


def test_damaged_lort_records_are_named(tmp_path):
    from lort.fileformat import LortFileError, load

    path, q, tensors = _lort_file(tmp_path)
    data = open(path, "rb").read()
    layer = "model.layers.0.mlp.up_proj.weight"
    for record, raw in ((f"layer 0 ('{layer}')", q.tensors["A"].view(torch.uint8).numpy().tobytes()),
                        ("tensor 0 ('model.embed_tokens.weight')",
                         tensors["model.embed_tokens.weight"].view(torch.uint8).numpy().tobytes())):
        assert data.count(raw) == 1
        at = data.index(raw) + len(raw) // 2
        damaged = bytearray(data)
        damaged[at:at + 8] = bytes(b ^ 0x5A for b in damaged[at:at + 8])
        bad = str(tmp_path / "damaged.lort")
        with open(bad, "wb") as f:
            f.write(damaged)
        with pytest.raises(LortFileError, match=rf"damaged\.lort'?: {re.escape(record)}: damaged: its bytes do not "
                                                "match the checksum"):
            load(bad)
        loose = load(bad, verify=False)  # the opt-out reads the bytes as they are
        assert not (torch.equal(loose.layers[layer].tensors["A"], q.tensors["A"])
                    and torch.equal(loose.tensors["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"]))


def test_lort_version_2_files_still_load(tmp_path):
    from lort.fileformat import load

    path, q, tensors = _lort_file(tmp_path, version=2)
    with open(path, "rb") as f:
        assert struct.unpack("<4sI", f.read(8)) == (b"LORT", 2)
    f = load(path)
    assert torch.equal(f.layers["model.layers.0.mlp.up_proj.weight"].dequantize(), q.dequantize())
    assert all(torch.equal(f.tensors[k], v) for k, v in tensors.items())
    assert os.path.getsize(path) < os.path.getsize(_lort_file(tmp_path)[0])  # v3 carries the checksum fields
