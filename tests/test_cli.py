"""The memboost command on a tiny model folder built here (no downloads)."""

import os
import subprocess
import sys

import pytest
import torch

import memboost
from memboost import cli

from conftest import TINY_TEXT as TEXT, tiny_llama_with_tokenizer

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    model, tokenizer = tiny_llama_with_tokenizer()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = folder.parent / "text.txt"
    text.write_text(TEXT)
    return folder


def test_quantize_info_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    text = str(model_dir.parent / "text.txt")
    assert cli.main(["quantize", str(model_dir), str(out), "--ratio-4bit", "0.5", "--calibrate", text,
                     "--calib-tokens", "100", "--quiet", "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert "14 layers replaced" in printed and "| model.layers.0.self_attn.q_proj |" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))

    assert cli.main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | mixed | 64x128 |" in printed and "14 quantized layers" in printed

    assert cli.main(["eval", str(out), "--text", text, "--tokens", "128", "--window", "64", "--new-tokens", "4",
                     "--baseline", str(model_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"| {out} |" in printed and f"| {model_dir} |" in printed and "perplexity on 128 tokens" in printed


def test_errors_exit_2_with_one_line(model_dir, tmp_path, capsys):
    assert cli.main(["quantize", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "memboost quantize: error: model" in err and "not found" in err and not (tmp_path / "out").exists()
    assert cli.main(["info", str(model_dir)]) == 2
    assert "holds no memboost-quantized tensor" in capsys.readouterr().err
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out"), "--calibrate",
                     str(tmp_path / "none.txt")]) == 2
    assert "is not a file" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("It was")
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out"), "--calibrate", str(short)]) == 2
    assert "calibration text has 2 tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_params_and_hessian(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    text = str(model_dir.parent / "text.txt")
    assert cli.main(["quantize", str(model_dir), str(out), "--param", "act_bits=8", "--param", "exact_zero=false",
                     "--calibrate", text, "--calib-tokens", "100", "--hessian", "--quiet"]) == 0
    import json
    call = json.load(open(out / "config.json"))["quantization_config"]["quantize_calls"][0]
    assert call["params"]["act_bits"] == 8 and call["params"]["exact_zero"] is False and call["calibrated"]
    assert cli.main(["quantize", str(model_dir), str(out), "--param", "oops"]) == 2
    assert "--param must look like NAME=VALUE" in capsys.readouterr().err


def test_sequential(model_dir, tmp_path, capsys):
    out = tmp_path / "seq"
    text = str(model_dir.parent / "text.txt")
    assert cli.main(["quantize", str(model_dir), str(out), "--calibrate", text, "--calib-tokens", "100",
                     "--sequential", "--quiet"]) == 0
    assert "calibration included" in capsys.readouterr().out
    import json
    assert json.load(open(out / "config.json"))["quantization_config"]["quantize_calls"][0]["calibrated"]
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "x"), "--sequential"]) == 2
    assert "--sequential needs --calibrate" in capsys.readouterr().err


def test_bits_chooses_the_ratio_per_layer(model_dir, tmp_path, capsys):
    out = tmp_path / "bits"
    text = str(model_dir.parent / "text.txt")
    assert cli.main(["quantize", str(model_dir), str(out), "--bits", "5.0", "--group-size", "32", "--calibrate",
                     text, "--calib-tokens", "100", "--quiet"]) == 0
    printed = capsys.readouterr().out
    bits = float(printed.split(" bits per weight")[0].rsplit(" ", 1)[1])
    assert 4.5 < bits <= 5.0
    ratios = {m.weight.tensor().ratio_4bit for m in memboost.load_quantized(str(out)).modules()
              if isinstance(m, memboost.nn.MixedLinear)}
    assert len(ratios) > 1
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "x"), "--bits", "3"]) == 2
    assert "--bits chooses the mixed format's ratio_4bit per layer" in capsys.readouterr().err


def test_help_shows_defaults():
    out = subprocess.run([sys.executable, "-m", "memboost", "quantize", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "(default: 0.1)" in out and "--calibrate TEXT" in out
