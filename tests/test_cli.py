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
    assert "output layer lm_head int8" in printed  # the default --lm-head int8
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))

    assert cli.main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | mixed | 64x128 |" in printed and "15 quantized layers" in printed
    assert "| lm_head | int8 | 64x64 |" in printed

    assert cli.main(["eval", str(out), "--text", text, "--tokens", "128", "--window", "64", "--new-tokens", "4",
                     "--baseline", str(model_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"| {out} |" in printed and f"| {model_dir} |" in printed and "perplexity on 128 tokens" in printed


def test_lm_head_float_keeps_the_output_layer(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(model_dir), str(out), "--lm-head", "float", "--quiet"]) == 0
    assert "output layer" not in capsys.readouterr().out
    assert cli.main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "14 quantized layers" in printed and "lm_head" not in printed
    reloaded = memboost.load_quantized(out)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line error
        cli.main(["quantize", str(model_dir), str(out), "--lm-head", "int4"])
    assert exc.value.code == 2 and "--lm-head: invalid choice: 'int4'" in capsys.readouterr().err


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
    out = " ".join(out.split())   # argparse wraps lines at the terminal's width
    assert "(default: 1.0: with groups of 32" in out and "(default: 32)" in out and "--calibrate TEXT" in out
    assert "(default: None)" not in out


def _no_model_load(monkeypatch):
    """Makes loading a model fail the test: what is refused must be refused before the model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--param", "foo=1"], "method 'mixed' takes no parameter 'foo'; its parameters are ratio_4bit, group_size"),
    (["--method", "nf4", "--ratio-4bit", "0.5"], "--ratio-4bit applies to --method mixed only; give nf4's own "
                                                 "arguments with --param NAME=VALUE"),
    (["--method", "ternary", "--group-size", "32", "--outlier-fraction", "0"],
     "--group-size, --outlier-fraction apply to --method mixed only"),
    (["--method", "nf4", "--calibrate", "fortunes"], "method 'nf4' does not use calibration statistics"),
    (["--method", "nf4", "--param", "group_size=32"], "method 'nf4' takes no parameter 'group_size'; its "
                                                      "parameters are block_size, double_quant"),
    (["--hessian"], "--hessian needs --calibrate TEXT"),
    (["--bits", "3.5", "--ratio-4bit", "0.5", "--calibrate", "fortunes"], "give --ratio-4bit (the same in every layer) or --bits"),
    (["--calibrate", "/no/such/text"], "text '/no/such/text' is not a file"),
    (["--method", "nf4", "--plan", "uniform"], "--plan applies to --method mixed only"),
    (["--plan", "weights", "--calibrate", "fortunes"], "--plan spreads the 4-bit groups without calibration"),
])
def test_options_that_do_not_apply_are_refused_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch,
                                                                      argv, message):
    _no_model_load(monkeypatch)
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memboost quantize: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_output_path_is_checked_before_the_work(model_dir, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "no" / "dir" / "out")]) == 2
    assert "folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "file")]) == 2
    assert "it exists and is not a folder" in capsys.readouterr().err


def _error_line(err: str) -> str:
    """What the command printed after transformers' loading bar (a line redrawn with carriage returns)."""
    return err.rsplit("\r", 1)[-1].split("\n", 1)[-1] if "\r" in err else err


def test_a_group_size_that_fits_no_layer_is_refused_with_the_sizes_that_fit(model_dir, tmp_path, capsys):
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "out"), "--group-size", "100", "--quiet"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("memboost quantize: error: ") and err.count("\n") == 1 and "fits none of the 14 layers" in err
    assert "group sizes that fit every layer: 16, 32, 48, 64" not in err   # 48 divides neither 64 nor 128
    assert "group sizes that fit every layer: 16, 32, 64\n" in err and not (tmp_path / "out").exists()


def test_default_keeps_every_group_4bit_and_warns_about_low_bit_settings(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(model_dir), str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    import json
    call = json.load(open(out / "config.json"))["quantization_config"]["quantize_calls"][0]
    assert call["method"] == "mixed" and call["params"] == {**cli.MIXED_DEFAULTS, "ratio_4bit": 1.0, "group_size": 32}
    assert "warning" not in printed
    layers = [m.weight.tensor() for m in memboost.load_quantized(str(out)).modules()
              if isinstance(m, memboost.nn.MixedLinear)]
    assert len(layers) == 14 and all(q.ratio_4bit == 1.0 and q.group_size == 32 for q in layers)
    assert cli.main(["quantize", str(model_dir), str(out), "--ratio-4bit", "0.1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "warning: mixed with 0% of the groups in 4 bits" in printed and "no calibration usually damages" in printed
    assert cli.main(["quantize", str(model_dir), str(out), "--method", "ternary", "--quiet"]) == 0
    assert "warning: ternary weights of a model trained in float" in capsys.readouterr().out


def test_calibrated_quantization_probes_perplexity_and_warns_when_it_rises(model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    text = str(model_dir.parent / "text.txt")
    argv = ["quantize", str(model_dir), str(tmp_path / "q"), "--calibrate", text, "--calib-tokens", "100", "--quiet",
            "--in-memory"]
    monkeypatch.setattr(cli, "PROBE_MAX_RATIO", 1e9)
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"perplexity probe on {cli.PROBE_TOKENS} tokens of {text} after the calibration tokens" in printed
    before, after = (float(printed.split(" float, ")[0].rsplit(" ", 1)[1]),
                     float(printed.split(" quantized (")[0].rsplit(" ", 1)[1]))
    assert 1.0 < before and 1.0 < after and "warning" not in printed
    # the probe scores the quantized model: a threshold under its ratio warns
    monkeypatch.setattr(cli, "PROBE_MAX_RATIO", 0.5 * after / before)
    assert cli.main(argv) == 0
    assert "warning: the quick perplexity probe rose" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--method", "nf4"], ["--ratio-4bit", "0.5"], ["--calibrate", "TEXT", "--calib-tokens", "100", "--hessian",
                                                       "--sequential", "--ratio-4bit", "0.5"],
                                  ["--calibrate", "TEXT", "--calib-tokens", "100", "--hessian", "--bits", "5.0",
                                   "--group-size", "32"]])
def test_a_model_folder_is_quantized_block_by_block(model_dir, tmp_path, capsys, argv):
    """The streamed path (the default for a folder) writes what --in-memory writes, and says what it took."""
    from memboost.io.checkpoint import load_state

    argv = [str(model_dir.parent / "text.txt") if a == "TEXT" else a for a in argv] + ["--quiet"]
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "whole"), "--in-memory"] + argv) == 0
    whole = capsys.readouterr().out
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "streamed")] + argv) == 0
    printed = capsys.readouterr().out
    assert "| streamed | block by block" in printed and "| peak resident memory |" in printed
    assert "| bits per weight |" in printed and "| time |" in printed
    assert ("bits plan (two passes) included" in printed) == ("--bits" in argv)
    # without calibration, the weights plan spreads the 4-bit groups as it does in memory
    assert ("| 4-bit groups | weights: " in printed) == ("--calibrate" not in argv and "nf4" not in argv)
    summary = [[line for line in out.splitlines() if line.startswith("memboost ")] for out in (whole, printed)]
    assert summary[0] == summary[1] and len(summary[0]) == 1   # the same summary line
    a, b = load_state(tmp_path / "whole"), load_state(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "streamed"))


def test_plan_weights_by_default_uniform_on_request(model_dir, tmp_path, capsys):
    """Below ratio_4bit 1 without calibration the layers' ratios differ (the weights plan), averaging the ratio
    asked for within its bits; --plan uniform keeps it in every layer; the closing lines say which."""
    def ratios(out):
        return {name: m.weight.tensor().ratio_4bit for name, m in memboost.load_quantized(str(out)).named_modules()
                if isinstance(m, memboost.nn.MixedLinear)}

    argv = ["--ratio-4bit", "0.5", "--in-memory", "--quiet"]
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "planned")] + argv) == 0
    planned = capsys.readouterr().out
    assert cli.main(["quantize", str(model_dir), str(tmp_path / "uniform"), "--plan", "uniform"] + argv) == 0
    uniform = capsys.readouterr().out
    assert set(ratios(tmp_path / "uniform").values()) == {0.5}
    assert "4-bit groups: uniform: ratio_4bit 0.5 in every layer (--plan uniform)" in uniform
    assert len(set(ratios(tmp_path / "planned").values())) > 1
    assert "4-bit groups: weights: " in planned and "weights plan (no calibration): " in planned

    def bits(printed):
        return float(printed.split(" bits per weight")[0].rsplit(" ", 1)[1])
    assert bits(uniform) - 0.1 <= bits(planned) <= bits(uniform) + 1e-3


def test_a_model_folder_without_tokenizer_quantizes_and_refuses_only_text_steps(model_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(model_dir):
        if not name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(model_dir / name, bare / name)
    assert cli.main(["quantize", str(bare), str(tmp_path / "q"), "--quiet"]) == 0
    assert "14 layers replaced" in capsys.readouterr().out
    assert cli.main(["gguf", str(bare), str(tmp_path / "m.gguf"), "--quiet"]) == 0
    capsys.readouterr()
    text = str(model_dir.parent / "text.txt")
    for argv in (["quantize", str(bare), str(tmp_path / "q2"), "--calibrate", text],
                 ["eval", str(tmp_path / "q"), "--text", text, "--tokens", "64"]):
        assert cli.main(argv) == 2
        err = _error_line(capsys.readouterr().err)
        assert err.count("\n") == 1 and "needs the model's tokenizer, and" in err and "has none that loads" in err


@pytest.mark.slow
def test_default_keeps_smollm2_within_1_3x_of_float_perplexity_on_both_texts(tmp_path, capsys):
    """`memboost quantize smollm2 OUT` with no options keeps the model (issue
    21): within 1.3x of float32's perplexity on the fortunes and on GPL-3
    (measured 39.8 and 34.5 against 32.2 and 28.4)."""
    from memboost import testbed

    gpl3 = "/usr/share/common-licenses/GPL-3"
    assert cli.main(["quantize", "smollm2", str(tmp_path / "q"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().out
    float_model, tokenizer = testbed.load_smollm2()
    quantized, _ = cli.load_model(str(tmp_path / "q"))
    for text in (testbed.english_text(), open(gpl3).read()):
        base = testbed.perplexity(float_model, tokenizer, text, context=256, max_tokens=2048)
        ppl = testbed.perplexity(quantized, tokenizer, text, context=256, max_tokens=2048)
        assert ppl < 1.3 * base, (ppl, base)
