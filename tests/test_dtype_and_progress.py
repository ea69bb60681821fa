"""What a saved model costs and what the long passes print: the CLI's --dtype,
the dtype of the unquantized tensors in a saved folder, `memboost info`'s
count of a tied embedding, the mode of what memboost writes, and progress
bars (on when asked, quiet in a pipe or a test)."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import memboost
from memboost import cli

from conftest import TINY_TEXT, tiny_llama_with_tokenizer

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def _folder(tmp_path, dtype=None, name="model"):
    """A tiny Llama (tied embedding) with a tokenizer, saved as a Hugging Face folder, in `dtype`."""
    model, tokenizer = tiny_llama_with_tokenizer()
    if dtype is not None:
        model = model.to(dtype)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _stored(path):
    """{name: (safetensors dtype, bytes)} of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()
            if k != "__metadata__"}


# -- --dtype --------------------------------------------------------------------
def test_load_model_uses_the_checkpoints_dtype_unless_told(tmp_path):
    bf16 = _folder(tmp_path, torch.bfloat16, "bf16")
    assert json.load(open(bf16 / "config.json"))["dtype"] == "bfloat16"
    assert cli.load_model(str(bf16))[0].model.embed_tokens.weight.dtype == torch.bfloat16
    assert cli.load_model(str(bf16), "float32")[0].model.embed_tokens.weight.dtype == torch.float32
    f32 = _folder(tmp_path, None, "f32")
    assert cli.load_model(str(f32), "float16")[0].model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    with pytest.raises(memboost.MemboostError, match="'dtype' must be one of"):
        cli.load_model(str(f32), "float64")


def test_cli_quantize_dtype_reaches_the_saved_folder(tmp_path, capsys):
    f32 = _folder(tmp_path, None, "f32")
    out = tmp_path / "q"
    assert cli.main(["quantize", str(f32), str(out), "--method", "nf4", "--dtype", "bfloat16", "--quiet"]) == 0
    stored = _stored(out / "model.safetensors")
    assert stored["model.embed_tokens.weight"][0] == "BF16" and stored["model.norm.weight"][0] == "BF16"
    # the default loads the float32 folder as float32; --save-dtype float32 keeps it so
    assert cli.main(["quantize", str(f32), str(out), "--method", "nf4", "--quiet"]) == 0
    assert _stored(out / "model.safetensors")["model.embed_tokens.weight"][0] == "F32"
    assert cli.main(["quantize", str(f32), str(out), "--method", "nf4", "--dtype", "bfloat16",
                     "--save-dtype", "float32", "--quiet"]) == 0
    assert _stored(out / "model.safetensors")["model.embed_tokens.weight"][0] == "F32"
    capsys.readouterr()


# -- saved folders keep the model's own dtype ------------------------------------
@pytest.mark.parametrize("own", [torch.bfloat16, torch.float16])
def test_unquantized_tensors_are_saved_in_the_models_own_dtype(tmp_path, own):
    model, _ = tiny_llama_with_tokenizer()
    model.config.dtype = own  # a model loaded in float32 from a 16-bit checkpoint
    memboost.quantize_model(model, "nf4", progress=False)
    memboost.save_quantized(model, tmp_path / "own")
    memboost.save_quantized(model, tmp_path / "f32", dtype=torch.float32)
    small, big = _stored(tmp_path / "own" / "model.safetensors"), _stored(tmp_path / "f32" / "model.safetensors")
    code = {torch.bfloat16: "BF16", torch.float16: "F16"}[own]
    assert "lm_head.weight" not in small  # the embedding is stored once (the output layer is int8 by default)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert small[name] == (code, big[name][1] // 2) and big[name][0] == "F32", name
    quantized = [k for k in small if ".weight." in k]
    assert quantized and all(small[k] == big[k] for k in quantized)  # quantized weights untouched
    reloaded = memboost.load_quantized(tmp_path / "own")
    assert isinstance(reloaded.lm_head, memboost.nn.Int8Linear)  # untied from the float embedding
    assert reloaded.model.embed_tokens.weight.dtype == own
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    with torch.no_grad():
        want = model(ids).logits
        got = memboost.load_quantized(tmp_path / "own", dtype=torch.float32)(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # 16-bit rounding of embedding and norms only
    with pytest.raises(memboost.MemboostError, match="'dtype' must be 'auto', None or one of"):
        memboost.save_quantized(model, tmp_path / "x", dtype=torch.int8)


def test_a_float32_model_without_a_16_bit_origin_is_saved_as_it_is(tmp_path):
    model, _ = tiny_llama_with_tokenizer()  # config dtype: float32
    memboost.quantize_model(model, "nf4", progress=False)
    memboost.save_quantized(model, tmp_path / "m")
    assert _stored(tmp_path / "m" / "model.safetensors")["model.embed_tokens.weight"][0] == "F32"


# -- memboost info ------------------------------------------------------------
def test_info_counts_a_tied_embedding_once(tmp_path, capsys):
    model, _ = tiny_llama_with_tokenizer(tie_word_embeddings=True)
    memboost.quantize_model(model, "nf4", progress=False)
    memboost.save_quantized(model, tmp_path / "m", dtype=None)
    assert cli.main(["info", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out
    reported = float(printed.split(" MiB of other tensors")[0].rsplit(" ", 1)[1])
    stored = _stored(tmp_path / "m" / "model.safetensors")
    other = sum(n for k, (_, n) in stored.items() if ".weight." not in k and not k.endswith(".format_info"))
    assert "lm_head.weight" not in stored
    assert reported == pytest.approx(other / 2**20, abs=0.051)
    embedding = stored["model.embed_tokens.weight"][1]
    assert abs(reported - (other + embedding) / 2**20) > 0.001  # a second count would show


# -- file modes -------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_and_folders_get_the_users_umask(tmp_path, umask):
    import lort.fileformat

    model, tokenizer = tiny_llama_with_tokenizer()
    memboost.quantize_model(model, "nf4", progress=False)
    old = os.umask(umask)
    try:
        memboost.save_quantized(model, tmp_path / "m", tokenizer=tokenizer)
        memboost.save_safetensors({"a": torch.ones(3)}, str(tmp_path / "a.safetensors"))
        lort.fileformat.save(str(tmp_path / "a.lort"), {}, {"a": torch.ones(3)})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o777 & ~umask
    for path in [tmp_path / "m" / f for f in os.listdir(tmp_path / "m")] + [tmp_path / "a.safetensors",
                                                                          tmp_path / "a.lort"]:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


# -- progress bars ------------------------------------------------------------------
def _batches():
    return [torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def test_passes_print_nothing_by_default_and_a_bar_when_asked(monkeypatch, capfd):
    from memboost.testbed import perplexity

    model, tokenizer = tiny_llama_with_tokenizer()
    monkeypatch.delenv("MEMBOOST_PROGRESS", raising=False)
    memboost.calibrate(model, _batches())
    memboost.model.plan.output_sensitivity(model, _batches())
    perplexity(model, tokenizer, TINY_TEXT, context=32, max_tokens=128)
    assert capfd.readouterr() == ("", "")  # not a terminal: quiet
    memboost.calibrate(model, _batches(), progress=True)
    assert "calibration" in capfd.readouterr().err
    monkeypatch.setenv("MEMBOOST_PROGRESS", "1")
    memboost.calibrate(model, _batches(), hessian=True)
    memboost.model.plan.output_sensitivity(model, _batches())
    perplexity(model, tokenizer, TINY_TEXT, context=32, max_tokens=128)
    err = capfd.readouterr().err
    # the bars (leave=False) clear themselves; what they showed names each pass
    assert "calibration (Hessians)" in err and "gradients" in err and "perplexity" in err
    monkeypatch.setenv("MEMBOOST_PROGRESS", "0")
    memboost.calibrate(model, _batches())
    assert capfd.readouterr().err == ""


def test_cli_in_a_pipe_prints_no_bar_unless_asked(tmp_path):
    folder = _folder(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT)
    env = {k: v for k, v in os.environ.items() if k != "MEMBOOST_PROGRESS"}
    command = [sys.executable, "-m", "memboost", "quantize", str(folder), str(tmp_path / "q"), "--bits", "5.0",
               "--group-size", "32", "--calibrate", str(text), "--calib-tokens", "100"]
    quiet = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert "it/s" not in quiet.stderr and "batch" not in quiet.stderr and "%|" not in quiet.stderr
    loud = subprocess.run(command, capture_output=True, text=True, env={**env, "MEMBOOST_PROGRESS": "1"}, check=True)
    # a folder streams: the --bits plan's two passes over the blocks, then the quantizing pass
    for desc in ("bits plan: forward", "bits plan: backward", "memboost mixed"):
        assert desc in loud.stderr, desc
    ppl = [sys.executable, "-m", "memboost", "eval", str(tmp_path / "q"), "--text", str(text), "--tokens", "64",
           "--window", "32", "--new-tokens", "2"]
    assert "perplexity:" not in subprocess.run(ppl, capture_output=True, text=True, env=env, check=True).stderr
    assert "perplexity:" in subprocess.run(ppl, capture_output=True, text=True, env={**env, "MEMBOOST_PROGRESS": "1"},
                                           check=True).stderr


# Slow: it loads the real SmolLM2 (about a minute under the sanitizers). Run in
# the sanitizer suite before tests/test_fuzz.py, it also made every fuzz
# harness's child process run out of time and memory there; not understood yet.
@pytest.mark.slow
def test_loading_smollm2_shows_no_gguf_bar(monkeypatch, capfd):
    # transformers' bar over the GGUF tensors prints wherever stderr goes (tqdm's default), even here
    monkeypatch.setenv("MEMBOOST_PROGRESS", "1")  # hidden even where bars are asked for: it is not memboost's
    model, _ = memboost.testbed.load_smollm2()
    assert "Converting and de-quantizing GGUF tensors" not in capfd.readouterr().err
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.device.type == "meta" for p in model.parameters())
