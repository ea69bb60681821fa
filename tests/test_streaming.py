"""Block-by-block quantization from a safetensors folder (memboost.io.streaming):
the same tensors as the in-memory path, errors that name the file, no output
left by a failed run, and a reload that builds no float weight."""

import json
import os

import pytest
import torch

import memboost
from memboost.errors import MemboostError
from memboost.io import streaming
from memboost.io.checkpoint import load_state
from memboost.model.plan import ratio_4bit_from_costs

from conftest import tiny_llama, tiny_llama_with_tokenizer

FORMATS = {"nf4": {}, "ternary": {}, "lort": {"rank": 4, "iters": 2}, "mixed": {"ratio_4bit": 0.5, "group_size": 32}}


def _save_folder(model, path, dtype=None, tokenizer=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="40KB")  # several shards, as a large model has
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    folder = _save_folder(tiny_llama(), path)
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    return folder


def _batches(n=3, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, length), generator=g) for _ in range(n)]


def _in_memory(folder, out, method, params, batches=None, sequential=True, hessian=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto").eval()
    if batches is None:
        memboost.quantize_model(model, method, progress=False, **params)
    elif sequential:
        memboost.quantize_model(model, method, calibration_batches=batches, hessian=hessian, progress=False, **params)
    else:
        stats = memboost.calibrate(model, batches, hessian=hessian, progress=False)
        memboost.quantize_model(model, method, calibration=stats, progress=False, **params)
    memboost.save_quantized(model, out, max_shard_size="40KB")
    return load_state(out)


def _assert_same_state(a_dir, b_dir):
    a, b = load_state(a_dir), load_state(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    for name in ("config.json", "generation_config.json"):
        assert json.load(open(os.path.join(a_dir, name))) == json.load(open(os.path.join(b_dir, name))), name


@pytest.mark.parametrize("method", sorted(FORMATS))
def test_streaming_gives_the_in_memory_tensors(float_folder, tmp_path, method):
    params = FORMATS[method]
    _in_memory(float_folder, tmp_path / "memory", method, params)
    report = streaming.quantize_folder(float_folder, tmp_path / "stream", method, progress=False,
                                       max_shard_size="40KB", **params)
    assert len(report.replaced) == 14 and not report.skipped
    assert report.output_layer is not None and report.output_layer.name == "lm_head"  # int8, as in memory
    _assert_same_state(tmp_path / "memory", tmp_path / "stream")
    assert len([f for f in os.listdir(tmp_path / "stream") if f.endswith(".safetensors")]) > 1


@pytest.mark.parametrize("sequential,hessian", [(True, True), (True, False), (False, True)])
def test_streaming_calibrated_mixed_gives_the_in_memory_tensors(float_folder, tmp_path, sequential, hessian):
    params = FORMATS["mixed"]
    batches = _batches()
    _in_memory(float_folder, tmp_path / "memory", "mixed", params, batches, sequential, hessian)
    streaming.quantize_folder(float_folder, tmp_path / "stream", "mixed", calibration_batches=batches,
                              sequential=sequential, hessian=hessian, progress=False, max_shard_size="40KB", **params)
    _assert_same_state(tmp_path / "memory", tmp_path / "stream")


def test_calibration_changes_the_result(float_folder, tmp_path):
    # the comparison above would also pass if the batches were ignored on both paths
    params = FORMATS["mixed"]
    streaming.quantize_folder(float_folder, tmp_path / "plain", "mixed", progress=False, **params)
    streaming.quantize_folder(float_folder, tmp_path / "calib", "mixed", calibration_batches=_batches(), hessian=True,
                              progress=False, **params)
    a, b = load_state(tmp_path / "plain"), load_state(tmp_path / "calib")
    assert any(not torch.equal(a[k], b[k]) for k in a if ".weight." in k)


def test_bfloat16_tied_model_with_tokenizer(tmp_path):
    model, tokenizer = tiny_llama_with_tokenizer(tie_word_embeddings=True)
    folder = _save_folder(model, tmp_path / "float", torch.bfloat16, tokenizer)
    batches = _batches(2)
    _in_memory(folder, tmp_path / "memory", "nf4", {})
    streaming.quantize_folder(folder, tmp_path / "stream", "nf4", tokenizer=tokenizer, progress=False,
                              max_shard_size="40KB")
    _assert_same_state(tmp_path / "memory", tmp_path / "stream")
    _in_memory(folder, tmp_path / "memory_cal", "mixed", FORMATS["mixed"], batches)
    streaming.quantize_folder(folder, tmp_path / "stream_cal", "mixed", calibration_batches=batches, progress=False,
                              max_shard_size="40KB", **FORMATS["mixed"])
    _assert_same_state(tmp_path / "memory_cal", tmp_path / "stream_cal")
    reloaded = memboost.load_quantized(tmp_path / "stream")
    # the output layer int8 (quantize_model's default), the float embedding untied and kept
    assert type(reloaded.lm_head).__name__ == "Int8Linear" and not reloaded.config.tie_word_embeddings
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    ids = batches[0]
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, reloaded(ids).logits)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert os.path.isfile(tmp_path / "stream" / "tokenizer.json")


def test_lm_head_quantized_outside_the_blocks(float_folder, tmp_path):
    _in_memory(float_folder, tmp_path / "memory", "nf4", {"skip": (), "lm_head": None})
    report = streaming.quantize_folder(float_folder, tmp_path / "stream", "nf4", skip=(), lm_head=None,
                                       progress=False)
    assert report.replaced[-1].name == "lm_head"
    _assert_same_state(tmp_path / "memory", tmp_path / "stream")
    with pytest.raises(MemboostError, match="lm_head.*skip"):
        streaming.quantize_folder(float_folder, tmp_path / "cal", "mixed", skip=(), calibration_batches=_batches(),
                                  lm_head=None, progress=False)


def test_missing_shard_is_named(float_folder, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(float_folder, folder)
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]
    os.remove(folder / shard)
    with pytest.raises(MemboostError, match=shard):
        streaming.quantize_folder(folder, tmp_path / "out", "nf4", progress=False)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_shard_is_named(float_folder, tmp_path, keep):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(float_folder, folder)
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    size = os.path.getsize(folder / shard)
    with open(folder / shard, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(MemboostError, match=shard):
        streaming.quantize_folder(folder, tmp_path / "out", "nf4", progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_interrupted_run_leaves_no_output(float_folder, tmp_path, monkeypatch):
    calls = []
    original = streaming.quantize_model

    def failing(*args, **kwargs):
        calls.append(kwargs.get("name_prefix"))
        if len(calls) == 2:   # the second block, after the first one was written
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(streaming, "quantize_model", failing)
    with pytest.raises(KeyboardInterrupt):
        streaming.quantize_folder(float_folder, tmp_path / "out", "nf4", progress=False, max_shard_size="10KB")
    assert calls == ["model.layers.0.", "model.layers.1."]
    assert os.listdir(tmp_path) == []   # neither the output nor its staging folder


def test_interrupted_run_keeps_the_previous_output(float_folder, tmp_path, monkeypatch):
    streaming.quantize_folder(float_folder, tmp_path / "out", "nf4", progress=False)
    before = load_state(tmp_path / "out")
    monkeypatch.setattr(streaming, "_block_outputs", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        streaming.quantize_folder(float_folder, tmp_path / "out", "mixed", calibration_batches=_batches(),
                                  progress=False)
    after = load_state(tmp_path / "out")
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert os.listdir(tmp_path) == ["out"]


def test_bad_arguments(float_folder, tmp_path):
    with pytest.raises(MemboostError, match="no config.json"):
        streaming.quantize_folder(tmp_path, tmp_path / "out", "nf4")
    with pytest.raises(MemboostError, match="takes no parameter 'ratio_4bit'"):
        streaming.quantize_folder(float_folder, tmp_path / "out", "nf4", ratio_4bit=0.5)
    streaming.quantize_folder(float_folder, tmp_path / "q", "nf4", progress=False)
    with pytest.raises(MemboostError, match="already quantized"):
        streaming.quantize_folder(tmp_path / "q", tmp_path / "out", "nf4")


def test_gguf_export_of_a_mapped_folder_is_the_in_memory_export(tmp_path):
    """load_mapped's model (every tensor memory-mapped from the folder) exports the same GGUF bytes as the
    model transformers loads, and so does a streamed memboost folder against its in-memory twin."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_llama_with_tokenizer(tie_word_embeddings=False)
    folder = _save_folder(model, tmp_path / "float", torch.bfloat16, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto").eval()
    mapped = streaming.load_mapped(folder)
    assert all(p.device.type == "cpu" for p in mapped.parameters())
    for qtype in ("F16", "Q4_0"):
        memboost.export_gguf(loaded, tmp_path / "a.gguf", qtype, verbose=False)
        memboost.export_gguf(mapped, tmp_path / "b.gguf", qtype, verbose=False)
        assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    _in_memory(folder, tmp_path / "memory", "nf4", {})
    streaming.quantize_folder(folder, tmp_path / "stream", "nf4", progress=False)
    for folder, gguf in (("memory", "a.gguf"), ("stream", "b.gguf")):   # name: not the folders' own names
        memboost.export_gguf(memboost.load_quantized(tmp_path / folder), tmp_path / gguf, "Q4_0", name="tiny",
                             verbose=False)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf", "float", "memory", "stream"]   # no scratch left


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_bits_plan_is_the_in_memory_plan(tmp_path, tied):
    """The bits plan of two passes over the mapped folder measures the float model's E[x^2] and E[(dL/dy)^2]
    (allocate_ratio_4bit's calibrate / output_sensitivity) and so gives its plan; the folder quantized with
    it is the in-memory one."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_llama_with_tokenizer(tie_word_embeddings=tied)
    folder = _save_folder(model, tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto").eval()
    batches = _batches(n=3, length=12)
    stats = memboost.calibrate(loaded, batches, progress=False)
    sens = memboost.output_sensitivity(loaded, batches, progress=False)
    choices, weights, calibration, sensitivity = streaming._plan_statistics(
        folder, batches, 3.0, ("lm_head",), 32, 0.002, "auto", True, str(tmp_path), False)
    assert sorted(calibration) == sorted(sensitivity) == sorted(sens) and len(sens) == 14
    for name in sens:
        torch.testing.assert_close(calibration[name], stats[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(sensitivity[name], sens[name], rtol=1e-4, atol=1e-12)
    assert weights == sum(loaded.get_submodule(n).weight.numel() for n in sens)
    least = sum(c[0][1] for c in choices.values()) / weights   # every group 2-bit (small layers: many outliers)
    most = sum(c[-1][1] for c in choices.values()) / weights
    for share in (0.25, 0.5, 0.75):
        bits = least + share * (most - least)
        expected = memboost.allocate_ratio_4bit(loaded, batches, bits, calibration=stats, sensitivity=sens,
                                               group_size=32, progress=False)
        assert ratio_4bit_from_costs(choices, weights, bits) == expected
        assert len(set(expected.values())) > 1   # a plan that differs between layers
    plan = streaming.allocate_ratio_4bit_folder(folder, batches, bits, group_size=32, progress=False)
    assert plan == expected
    memboost.quantize_model(loaded, "mixed", ratio_4bit=plan, group_size=32, progress=False)
    memboost.save_quantized(loaded, tmp_path / "memory", max_shard_size="40KB")
    streaming.quantize_folder(folder, tmp_path / "stream", "mixed", ratio_4bit=plan, group_size=32, progress=False,
                              max_shard_size="40KB")
    _assert_same_state(tmp_path / "memory", tmp_path / "stream")
    assert sorted(os.listdir(tmp_path)) == ["float", "memory", "stream"]   # the scratch file is gone


def test_streamed_bits_plan_errors(float_folder, tmp_path):
    with pytest.raises(MemboostError, match="'bits' must be a positive"):
        streaming.allocate_ratio_4bit_folder(float_folder, _batches(), 0)
    with pytest.raises(MemboostError, match="below what the mixed format can store"):
        streaming.allocate_ratio_4bit_folder(float_folder, _batches(), 2.0, group_size=32, progress=False)
    with pytest.raises(MemboostError, match="group_size=48 divides"):
        streaming.allocate_ratio_4bit_folder(float_folder, _batches(), 3.0, group_size=48, progress=False)


def test_gguf_export_in_row_slices_gives_the_same_bytes(tmp_path, monkeypatch):
    """export_gguf converts a large matrix (an 8B model's embedding and output layer) a slice of rows at a time,
    float or int8: the file is byte for byte the one-piece conversion's, and the reported errors agree."""
    from memboost import _slices
    from memboost.io.gguf import export as gguf_export

    model, _ = tiny_llama_with_tokenizer(tie_word_embeddings=False)
    memboost.quantize_model(model, "nf4", progress=False)   # lm_head int8: its Q8_0 bytes copied slice by slice
    assert type(model.lm_head.weight.tensor()).__name__ == "Int8QuantizedTensor"
    reports = {}
    for name, weights in (("whole", 1 << 30), ("sliced", 1000)):   # 64 x 64 matrices: slices of 15 rows
        monkeypatch.setattr(_slices, "SLICE_ELEMENTS", weights)
        for qtype in ("Q4_0", "F16"):
            reports[name, qtype] = memboost.export_gguf(model, tmp_path / f"{name}-{qtype}.gguf", qtype,
                                                        verbose=False)
    for value in (model.model.embed_tokens.weight, model.lm_head.weight.tensor()):
        sliced = list(gguf_export._row_slices(value))   # still 1000 elements per slice
        assert len(sliced) == 5 and sum(p.shape[0] for p in sliced) == 64
    for qtype in ("Q4_0", "F16"):
        assert (tmp_path / f"whole-{qtype}.gguf").read_bytes() == (tmp_path / f"sliced-{qtype}.gguf").read_bytes()
        for a, b in zip(reports["whole", qtype].rows, reports["sliced", qtype].rows):
            assert (a.name, a.gguf_type, a.nbytes, a.note) == (b.name, b.gguf_type, b.nbytes, b.note)
            assert b.rel_error == pytest.approx(a.rel_error, rel=1e-5, abs=1e-9)


_RELOAD_PROBE = r"""
import json, os, sys
import torch
import memboost
from transformers import AutoConfig, AutoModelForCausalLM
from memboost.io.checkpoint import _parameters_on_meta

def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

folder, how = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(folder)
del config.quantization_config
with _parameters_on_meta():   # the model classes imported and built once: not counted below
    AutoModelForCausalLM.from_config(config)
before = anon_kib()
if how == "load_quantized":
    model = memboost.load_quantized(folder)
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
grown = anon_kib() - before
files = []
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split()
        if len(parts) > 5 and parts[5].endswith(".safetensors"):
            low, high = (int(x, 16) for x in parts[0].split("-"))
            files.append((low, high, parts[5]))
mapped = copied = 0
for name, t in model.state_dict().items():
    size = t.numel() * t.element_size()
    inside = [f for lo, hi, f in files if lo <= t.data_ptr() < hi]
    if inside and os.path.dirname(inside[0]) == os.path.realpath(folder):
        mapped += size
    else:
        copied += size
print(json.dumps({"anon_grown": grown * 1024, "mapped": mapped, "copied": copied}))
"""


@pytest.mark.slow
def test_reload_of_a_streamed_folder_maps_its_tensors(tmp_path):
    """load_quantized and from_pretrained of a streamed folder build the model on the meta device and take its
    tensors memory-mapped from the files: the process's own (anonymous) memory grows by far less than the
    quantized size, and the float weights are never made (they would be 4x the folder in float32)."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    folder = _save_folder(LlamaForCausalLM(config).eval(), tmp_path / "float", torch.bfloat16)
    streaming.quantize_folder(folder, tmp_path / "nf4", "nf4", progress=False)
    size = sum(os.path.getsize(tmp_path / "nf4" / f) for f in os.listdir(tmp_path / "nf4"))
    assert size > 40 * 2**20   # bf16 embedding (32 MiB), int8 lm_head (17 MiB), NF4 blocks
    for how in ("load_quantized", "from_pretrained"):
        out = subprocess.run([sys.executable, "-c", _RELOAD_PROBE, str(tmp_path / "nf4"), how], check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["anon_grown"] < 0.25 * size, (how, result, size)
        assert result["mapped"] > 0.95 * size and result["copied"] < 2**20, (how, result, size)


def test_each_block_is_freed_before_the_next(float_folder, tmp_path, monkeypatch):
    """Only one block's float weights are alive at a time: block 0's are gone (no reference left, e.g. in the
    list of layers checked up front) when block 1's are read."""
    import gc
    import weakref

    materialize = streaming._materialize
    first, alive_at_block_1 = [], []

    def recording(module, prefix, *args, **kwargs):
        if prefix.endswith("layers.1."):
            gc.collect()
            alive_at_block_1.extend(ref() is not None for ref in first)
        replaced = materialize(module, prefix, *args, **kwargs)
        if prefix.endswith("layers.0."):
            first.extend(weakref.ref(table[attr]) for table, attr, _ in replaced)
        return replaced

    monkeypatch.setattr(streaming, "_materialize", recording)
    streaming.quantize_folder(float_folder, tmp_path / "out", "nf4", progress=False)
    assert first and len(alive_at_block_1) == len(first)
    assert not any(alive_at_block_1)


def test_read_into_memory_is_the_mapped_tensor(float_folder, tmp_path):
    """SafetensorsSource.get(mapped=False) reads the bytes the map gives, checks a saved CRC-32 on them, and
    names the file of a truncated tensor."""
    import shutil

    from memboost.io.serialization import FileChecksums, SafetensorsSource

    with SafetensorsSource(float_folder) as src:
        for name in src.names():
            mapped, read = src.get(name), src.get(name, mapped=False)
            assert read.dtype == mapped.dtype and torch.equal(read, mapped), name
    # a memboost folder records CRC-32s: a changed byte is found by the plain read too
    out = tmp_path / "q"
    streaming.quantize_folder(float_folder, out, "nf4", progress=False, max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]
    layout = FileChecksums(out / shard)
    assert layout.recorded
    name, (start, end) = max(layout.offsets.items(), key=lambda item: item[1][1] - item[1][0])
    with open(out / shard, "r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 0xFF]))
    with SafetensorsSource(out) as src, pytest.raises(MemboostError, match=f"{name}.*damaged"):
        src.get(name, mapped=False)
    with SafetensorsSource(out, verify=False) as src:
        src.get(name, mapped=False)   # verify=False reads it anyway
    # truncated: the file is named
    folder = tmp_path / "cut"
    shutil.copytree(float_folder, folder)
    last = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    with SafetensorsSource(folder) as src:
        name = max((n for n in src.names() if src._where[n].endswith(last)), key=lambda n: src.shape(n))
        with open(folder / last, "r+b") as f:
            f.truncate(os.path.getsize(folder / last) - 8)
        with pytest.raises(MemboostError, match=f"{last}.*truncated"):
            src.get(name, mapped=False)


_RELEASE_PROBE = r"""
import sys
import torch
from memboost.io.streaming import load_mapped
from memboost.io.serialization import release_mapped_pages

def rss_file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])

model = load_mapped(sys.argv[1], dtype=torch.float32)
sums = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
touched = rss_file_kib()
dropped = release_mapped_pages()
after = rss_file_kib()
again = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
w = model.model.layers[0].mlp.down_proj.weight
w.data[0, 0] = 123.0                 # a written page: its map is kept
release_mapped_pages()
print(touched, after, dropped, again == sums, float(w[0, 0]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="release_mapped_pages reads /proc/self/smaps "
                    "(Linux); elsewhere it does nothing")
def test_release_mapped_pages_keeps_the_values(tmp_path):
    """release_mapped_pages drops the resident pages of a model mapped from its files (the GGUF export calls it
    after each tensor); the tensors read the same afterwards, and a map with a written page is left alone."""
    import subprocess
    import sys

    folder = _save_folder(tiny_llama(hidden_size=256, intermediate_size=1024), tmp_path / "f")  # float32, 8 MB
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE, folder], capture_output=True, text=True, check=True)
    touched, after, dropped, same, written = out.stdout.split()
    assert int(dropped) > 0
    assert int(touched) - int(after) > 4096, (touched, after)   # most of the weights' pages left the process
    assert same == "True" and float(written) == 123.0
