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
    def write(i):
        if kind == "file":
            memboost.save_safetensors(states[i % 2], path)
        else:
            memboost.save_quantized(models[i % 2], path, max_shard_size="40KB")
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
