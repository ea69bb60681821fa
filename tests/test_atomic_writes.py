"""A writer killed at a random moment leaves the previous file intact or the
new one complete, never a mix (every file memboost writes goes through
memboost.serialization.atomic_write)."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import memboost

WRITER = textwrap.dedent("""
    import sys, torch, memboost
    from torch import nn
    kind, path = sys.argv[1], sys.argv[2]
    states = [{"w": torch.full((256, 256), float(i)), "b": torch.arange(1000.0) + i} for i in range(2)]
    models = []
    if kind == "directory":
        from transformers import LlamaConfig, LlamaForCausalLM
        for i in range(2):
            torch.manual_seed(i)
            m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4)).eval()
            memboost.quantize_model(m, "mixed", ratio_4bit=0.5, progress=False)
            models.append(m)
    if kind == "gguf":
        from transformers import LlamaConfig, LlamaForCausalLM
        for i in range(2):
            m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4)).eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.fill_(float(i))
            models.append(m)
    if kind == "adapter":
        from memboost import qlora
        for i in range(2):
            m = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
            qlora.prepare_model(m, r=8, target_modules=["0", "1"])
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if "lora" in name:
                        p.fill_(float(i))
            models.append(m)
    if kind == "lort":
        from lort import fileformat
        from memboost.formats.lort import decompose
        layers = [{"w": decompose(torch.randn(256, 512, generator=torch.Generator().manual_seed(i)), rank=8,
                                  iters=1)[0]} for i in range(2)]
    def write(i):
        if kind == "file":
            memboost.save_safetensors(states[i % 2], path)
        elif kind == "directory":
            memboost.save_quantized(models[i % 2], path, max_shard_size="40KB")
        elif kind == "gguf":
            memboost.export_gguf(models[i % 2], path, "Q8_0", verbose=False, progress=False)
        elif kind == "adapter":
            qlora.save_adapter(models[i % 2], path)
        else:
            fileformat.save(path, layers[i % 2], {"b": torch.arange(1000.0) + i % 2}, {"version": i % 2})
    write(0)  # a complete first version, then the kill lands in a later write
    print("ready", flush=True)
    i = 1
    while True:  # alternate the two contents until killed
        write(i)
        i += 1
""")


def _kill_at_random(kind, path, kills, seed):
    rng = random.Random(seed)
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        yield


def _first_value(state):
    return float(state["w"][0, 0])


def test_killed_safetensors_writer_leaves_a_whole_file(tmp_path):
    path = tmp_path / "state.safetensors"
    for _ in _kill_at_random("file", path, kills=6, seed=0):
        state = memboost.load_safetensors(str(path))  # complete: it loads
        i = _first_value(state)
        assert i in (0.0, 1.0)
        assert torch.equal(state["w"], torch.full((256, 256), i)) and torch.equal(state["b"], torch.arange(1000.0) + i)


def test_killed_checkpoint_writer_leaves_a_whole_directory(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    path = tmp_path / "model"
    seen = set()
    for _ in _kill_at_random("directory", path, kills=3, seed=1):
        model = memboost.load_quantized(path)  # complete: config, index and every shard agree
        seen.add(float(model.model.embed_tokens.weight[0, 0]))
    assert 1 <= len(seen) <= 2


def test_killed_gguf_writer_leaves_a_whole_file(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the hf extra (gguf) is not installed")
    import numpy as np

    path = tmp_path / "model.gguf"
    for _ in _kill_at_random("gguf", path, kills=3, seed=2):
        tensors = gguf.GGUFReader(str(path)).tensors        # complete: every tensor is there and readable
        values = {round(float(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1)[0]), 3)
                  for t in tensors}
        assert len(tensors) == 2 * 9 + 3 and len(values) == 1 and values <= {0.0, 1.0}


def test_killed_adapter_writer_leaves_a_whole_folder(tmp_path):
    from torch import nn

    from memboost import qlora

    path = tmp_path / "adapter"
    for _ in _kill_at_random("adapter", path, kills=3, seed=3):
        model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
        qlora.prepare_model(model, r=8, target_modules=["0", "1"])
        qlora.load_adapter(model, str(path))                 # config and weights agree
        values = {float(p.flatten()[0]) for n, p in model.named_parameters() if "lora" in n}
        assert len(values) == 1 and values <= {0.0, 1.0}


def test_killed_lort_writer_leaves_a_whole_file(tmp_path):
    from lort import fileformat

    path = tmp_path / "model.lort"
    for _ in _kill_at_random("lort", path, kills=3, seed=4):
        f = fileformat.load(str(path))                       # complete: every record checks out
        i = f.meta["version"]
        assert i in (0, 1) and torch.equal(f.tensors["b"], torch.arange(1000.0) + i)
        assert set(f.layers) == {"w"}


@pytest.mark.parametrize("exchange", [True, False])
def test_replaced_directory_is_never_missing(tmp_path, monkeypatch, exchange):
    # The folder is swapped in one renameat2(RENAME_EXCHANGE) where Linux
    # allows it; elsewhere two renames. Both leave the new contents and no
    # staging or old folder behind; with the exchange, the folder at the path
    # is never absent (a rename of the path itself is refused mid-swap).
    from memboost.io import checkpoint

    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange_paths", lambda a, b: False)
    target = tmp_path / "model"
    for version in range(3):
        with checkpoint.replace_directory(str(target)) as staging:
            with open(os.path.join(staging, "version"), "w") as f:
                f.write(str(version))
        assert (target / "version").read_text() == str(version)
        assert sorted(os.listdir(tmp_path)) == ["model"]
    if exchange:
        renamed = []
        real_replace = os.replace
        monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (renamed.append((a, b)), real_replace(a, b)))
        with checkpoint.replace_directory(str(target)) as staging:
            open(os.path.join(staging, "version"), "w").close()
        assert renamed == []  # one exchange, no rename that takes the folder away
        assert (target / "version").read_text() == ""


def test_directory_exchange_swaps_two_folders(tmp_path):
    from memboost.io.checkpoint import _exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert _exchange_paths(str(a), str(b))  # Linux (3.15+) on a local file system, as CI runs
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    assert not _exchange_paths(str(a), str(tmp_path / "missing"))  # an error changes nothing
    assert (a / "x").read_text() == "b"
