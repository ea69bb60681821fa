"""lort-compress and lort-infer on tiny model folders built here (no downloads)."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from lort import compress, infer
from lort.fileformat import load
from lort.model import load_model
from memboost.nn import LoRTLinear

from conftest import TINY_TEXT as TEXT, tiny_llama_with_tokenizer

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (untied head) with a word-level tokenizer, saved as one safetensors file,
    and the same model saved in several shards."""
    model, tokenizer = tiny_llama_with_tokenizer(tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("lort")
    for name, shard in (("single", "1GB"), ("sharded", "40KB")):
        model.save_pretrained(root / name, max_shard_size=shard)
        tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text(TEXT)
    return root


def _run(main, argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_then_infer_rebuilds_the_model_from_the_file_alone(model_dir, tmp_path, capsys):
    out = str(tmp_path / "tiny.lort")
    code, printed, _ = _run(compress.main, ["-m", str(model_dir / "single"), "-o", out, "--min-dim", "32",
                                            "--rank", "8", "--iters", "3", "--quiet"], capsys)
    assert code == 0, printed
    assert "| 14 |" in printed and "peak RSS" in printed
    f = load(out)
    assert len(f.layers) == 14 and all(q.rank == 8 and q.per_row_alpha for q in f.layers.values())
    assert "lm_head.weight" in f.tensors and f.tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert f.config["model_type"] == "llama" and "tokenizer.json" in f.tokenizer_files

    # the rebuilt model equals the original with the same decompositions put in place
    model, tokenizer = load_model(out)
    assert sum(isinstance(m, LoRTLinear) for m in model.modules()) == 14
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir / "single").eval()
    for name, q in f.layers.items():
        module = ref.get_submodule(name[:-len(".weight")])
        with torch.no_grad():
            module.weight.copy_(q.dequantize().float())
    for name, t in f.tensors.items():
        with torch.no_grad():
            ref.get_parameter(name).copy_(t.float())
    ids = torch.tensor([[2, 5, 9, 3, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)

    text = str(model_dir / "text.txt")
    code, printed, _ = _run(infer.main, [out, "--prompt", "It was the", "--new-tokens", "4", "--text", text,
                                         "--tokens", "128", "--window", "64", "--bench"], capsys)
    assert code == 0, printed
    assert "14 LoRT layers" in printed and "perplexity" in printed and "tokens/s" in printed
    assert "| q_proj | 2 | 64x64 | 8 |" in printed


def test_shards_found_through_the_index_give_the_same_file(model_dir, tmp_path, capsys):
    assert len([f for f in os.listdir(model_dir / "sharded") if f.endswith(".safetensors")]) > 2
    a, b = str(tmp_path / "a.lort"), str(tmp_path / "b.lort")
    for src, out in (("single", a), ("sharded", b)):
        code, printed, err = _run(compress.main, ["-m", str(model_dir / src), "-o", out, "--min-dim", "32",
                                                  "--max-bits", "6", "--iters", "2", "--quiet"], capsys)
        assert code == 0, err
    fa, fb = load(a), load(b)
    assert sorted(fa.layers) == sorted(fb.layers) and sorted(fa.tensors) == sorted(fb.tensors)
    for name in fa.layers:
        assert torch.equal(fa.layers[name].dequantize(), fb.layers[name].dequantize())
        assert fa.layers[name].avg_bits <= 6.0
    # without the index, the shards are still found as a complete set
    bare = tmp_path / "bare"
    shutil.copytree(model_dir / "sharded", bare)
    os.remove(bare / "model.safetensors.index.json")
    assert _run(compress.main, ["-m", str(bare), "-o", str(tmp_path / "c.lort"), "--min-dim", "32", "--rank", "2",
                                "--iters", "1", "--quiet"], capsys)[0] == 0
    # a safetensors file alone compresses; without a config it cannot be rebuilt, and says so
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(model_dir / "single" / "model.safetensors", lone / "weights.safetensors")
    out = str(tmp_path / "lone.lort")
    assert _run(compress.main, ["-m", str(lone / "weights.safetensors"), "-o", out, "--min-dim", "32",
                                "--rank", "2", "--iters", "1", "--quiet"], capsys)[0] == 0
    code, _, err = _run(infer.main, [out], capsys)
    assert code == 2 and "holds no model config" in err


def test_bad_input_exits_2_names_it_and_leaves_no_file(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.lort"
    broken = tmp_path / "missing_shard"
    shutil.copytree(model_dir / "sharded", broken)
    shard = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[1]
    os.remove(broken / shard)
    empty = tmp_path / "empty"
    empty.mkdir()
    ints = tmp_path / "ints"
    ints.mkdir()
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.ones(256, 256, dtype=torch.int32)}, str(ints / "model.safetensors"))
    cases = [
        (["-m", str(tmp_path / "nope")], "does not exist"),
        (["-m", str(empty)], "holds no model.safetensors"),
        (["-m", str(broken)], f"shard '{shard}' listed in .* is missing"),
        (["-m", str(ints)], "'layer.weight' is a torch.int32 linear weight"),
        (["-m", str(model_dir / "single"), "--min-dim", "32", "--rank", "100"],
         "layer 'model.layers.0.* 'rank' 100 is larger than a \\[64, \\d+\\] matrix allows"),
        (["-m", str(model_dir / "single"), "--min-dim", "512"], "no linear weight"),
    ]
    for argv, message in cases:
        code, _, err = _run(compress.main, argv + ["-o", str(out), "--quiet"], capsys)
        assert code == 2 and err.startswith("lort-compress: error:") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
        assert not out.exists()
    code, _, err = _run(compress.main, ["-m", str(model_dir / "single"), "-o", str(tmp_path / "no" / "x.lort"),
                                        "--min-dim", "32", "--rank", "2", "--iters", "1", "--quiet"], capsys)
    assert code == 2 and "does not exist" in err
    # a hub id while the hub is unreachable: a clear error, quickly
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, _, err = _run(compress.main, ["-m", "HuggingFaceTB/SmolLM2-135M", "-o", str(out), "--quiet"], capsys)
    assert code == 2 and "Hugging Face hub" in err and time.perf_counter() - start < 30
    assert sorted(os.listdir(tmp_path)) == sorted(["missing_shard", "empty", "ints"])
    code, _, err = _run(infer.main, [str(tmp_path / "none.lort")], capsys)
    assert code == 2 and "is not a file" in err


def test_console_scripts_are_installed():
    for script in ("lort-compress", "lort-infer"):
        exe = shutil.which(script) or os.path.join(os.path.dirname(sys.executable), script)
        result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.slow
def test_compress_embedded_smollm2_and_generate(tmp_path, capsys):
    """The default: no --model compresses the embedded SmolLM2-135M."""
    out = str(tmp_path / "smol.lort")
    code, printed, err = _run(compress.main, ["-o", out, "--max-bits", "4.5", "--iters", "2", "--quiet"], capsys)
    assert code == 0, err
    assert "| 210 |" in printed
    code, printed, err = _run(infer.main, [out, "--prompt", "The capital of France is", "--new-tokens", "8"], capsys)
    assert code == 0 and "tokens/s" in printed, err


def test_infer_without_tokenizer_refuses_the_default_action_in_one_line(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(model_dir / "single"):
        if not name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(model_dir / "single" / name, bare / name)
    out = str(tmp_path / "bare.lort")
    assert _run(compress.main, ["-m", str(bare), "-o", out, "--min-dim", "32", "--rank", "2", "--iters", "1",
                                "--quiet"], capsys)[0] == 0
    code, _, err = _run(infer.main, [out], capsys)   # the default action generates text
    assert code == 2 and err.startswith("lort-infer: error:") and err.count("\n") == 1
    assert "holds no tokenizer: only --bench can run" in err
    code, printed, _ = _run(infer.main, [out, "--bench", "--threads", "1"], capsys)
    assert code == 0 and "| q_proj |" in printed


def test_device_and_output_are_checked_before_the_work(model_dir, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was opened before the arguments were checked")
    monkeypatch.setattr(compress, "open_model", no_work)
    single = str(model_dir / "single")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        (["--device", "cuda"], "'--device' is 'cuda', but this machine has no usable CUDA GPU"),
        (["--device", "tpu"], "'--device' must be a device such as 'cpu', 'cuda' or 'cuda:1', got 'tpu'"),
        (["--device", "meta"], "'--device' must be cpu, cuda, cuda:N or auto, got 'meta'"),
        (["-o", str(tmp_path)], f"cannot write {str(tmp_path)!r}: it is a folder; give a file name"),
        (["-o", str(tmp_path / "no" / "x.lort")], "does not exist"),
    ]
    for argv, message in cases:
        code, _, err = _run(compress.main, ["-m", single, "--quiet"] + argv, capsys)
        assert code == 2 and err.startswith("lort-compress: error:") and err.count("\n") == 1, err
        assert message in err, (message, err)
    assert os.listdir(tmp_path) == []


def test_calibrate_decomposes_for_the_output_error(model_dir, tmp_path, capsys):
    """--calibrate TEXT: each layer is decomposed with its H (measured block by block); the first
    block's q_proj, whose inputs the float and both decomposed models share, has a lower output
    error tr(E H E^T) on the calibration tokens than plain lort-compress gives it."""
    import memboost
    from memboost.cli import token_windows

    text = str(model_dir / "text.txt")
    plain, calibrated = str(tmp_path / "plain.lort"), str(tmp_path / "calibrated.lort")
    common = ["-m", str(model_dir / "single"), "--min-dim", "32", "--rank", "4", "--iters", "3", "--quiet",
              "--threads", "1"]
    assert _run(compress.main, common + ["-o", plain], capsys)[0] == 0
    code, printed, err = _run(compress.main, common + ["-o", calibrated, "--calibrate", text, "--calib-tokens",
                                                       "128", "--calib-window", "32"], capsys)
    assert code == 0, err
    assert "| 14 |" in printed
    f = load(calibrated)
    assert len(f.layers) == 14 and f.meta["info"]["calibrated"] is True

    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(model_dir / "single").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "single")
    windows = token_windows(tokenizer, TEXT, 128, window=32)
    name = "model.layers.0.self_attn.q_proj"
    h = memboost.calibrate(ref, windows, hessian=True, progress=False)[name]
    w = ref.get_submodule(name).weight.detach()

    def output_error(path):
        e = w - load(path).layers[name + ".weight"].dequantize().float()
        return float(torch.trace(e @ h @ e.T))

    assert output_error(calibrated) < 0.9 * output_error(plain)
    model, _ = load_model(calibrated)
    with torch.no_grad():
        assert bool(torch.isfinite(model(windows[0]).logits).all())
