"""GGUF export: the quantizers against the gguf package's decoder, the file's
metadata read back with gguf.GGUFReader, and the exported files run by
llama.cpp itself (llama-cpp-python) against our PyTorch model with the
exported weights dequantized. No downloads: tiny random Llama / Qwen2 models
and a byte-level BPE tokenizer trained here on Debian's fortunes.

Tolerances of llama.cpp vs PyTorch (relative RMS of the logits over a
16-token sequence, random weights of std 0.08 so that the two layers carry
real signal). llama.cpp computes differently from PyTorch in known ways, and
each type's bound sits about 2x above what that costs here:
- F32, F16: the KV cache is F16 (2^-11 relative rounding per value):
  measured about 7e-4 and 1e-3; bound 3e-3.
- BF16: matrix products convert the activations to BF16 (2^-8 relative):
  measured about 7e-3; bound 2e-2.
- Q4_0, Q8_0, IQ4_NL: the activations are rounded to Q8_0 (8-bit, a scale
  per 32) for the integer dot products: measured 1.8e-2 to 2.4e-2; bound 5e-2.
- Q2_K, Q3_K, Q4_K, TQ1_0, TQ2_0: activations in Q8_K (8-bit, a scale per
  256, coarser): measured 2.1e-2 to 3.5e-2; bound 7e-2.
Every 4-bit-or-less bound is several times below the distance between the
exported weights and the source (0.3 to 1.2 here), so passing shows llama.cpp
runs *the exported* weights, q/k rows in its rope order included.
"""

import copy
import math
import os

import numpy as np
import pytest
import torch

import memboost
import memboost.cli
from memboost import gguf_quants
from memboost.io.gguf.export import GGUFExportReport, export_gguf, gguf_state_dict, gguf_type_for

from conftest import tiny_causal_lm

gguf = pytest.importorskip("gguf", reason="the hf extra (gguf) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (test extra) is not installed")

TOLERANCE = {"F32": 3e-3, "F16": 3e-3, "BF16": 2e-2, "Q4_0": 5e-2, "Q5_0": 5e-2, "Q8_0": 5e-2, "IQ4_NL": 5e-2,
             "Q2_K": 7e-2, "Q3_K": 7e-2, "Q4_K": 7e-2, "Q5_K": 7e-2, "TQ1_0": 7e-2, "TQ2_0": 7e-2}
# Relative RMS error bounds of each quantizer on Gaussian weights (llama.cpp's
# published figures for these types are of the same order); a wrong byte
# layout gives errors near 1.4.
QUANT_ERROR = {"Q4_0": 0.095, "Q5_0": 0.045, "Q8_0": 0.006, "IQ4_NL": 0.085, "TQ1_0": 0.47, "TQ2_0": 0.47,
               "Q2_K": 0.3, "Q3_K": 0.16, "Q4_K": 0.08, "Q5_K": 0.045}
SENTENCE = "The moon is a harsh mistress, said the old man to the sea."


def _rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of 384 tokens trained on fortunes (GPT-2 style, like SmolLM2's)."""
    return _byte_level_tokenizer()


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([memboost.testbed.english_text(100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (BPE with byte fallback, "▁" for spaces, byte tokens <0x00>..<0xFF>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([memboost.testbed.english_text(100_000)],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _randomize(model, std=0.08):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    return _randomize(LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return _randomize(Qwen2ForCausalLM(config))


def _llama_cpp_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)]), llm.tokenize(SENTENCE.encode(), add_bos=False, special=False)
    finally:
        llm.close()


def _check_llama_cpp(model, tokenizer, path, qtype, **kwargs):
    """Exports, runs llama.cpp, and compares with PyTorch on the exported weights."""
    report = export_gguf(model, path, qtype, tokenizer, verbose=False, **kwargs)
    ids = tokenizer(SENTENCE)["input_ids"][:16]
    exported = type(model)(model.config).eval()
    missing, unexpected = exported.load_state_dict(gguf_state_dict(path, model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        want = exported(torch.tensor([ids])).logits[0].numpy()
        source = model(torch.tensor([ids])).logits[0].float().numpy()
    got, tokens = _llama_cpp_logits(path, ids)
    assert tokens == tokenizer(SENTENCE)["input_ids"]          # llama.cpp tokenizes as the HF tokenizer does
    err = _rms(got - want) / _rms(want)
    assert err < TOLERANCE[qtype], f"{qtype}: llama.cpp vs PyTorch on the exported weights {err:.2e}"
    return report, err, _rms(source - want) / _rms(want)


# -- quantizers ---------------------------------------------------------------------
def _gaussian(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 7] = 0.4                     # an outlier
    w[5] = 0                          # an all-zero row
    w[6, :256] = 1e-6                 # a nearly constant block
    return w


def _decode(data: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", gguf_quants.QUANT_TYPES)
def test_quantizer_layout_and_error(qtype):
    w = _gaussian()
    data = gguf_quants.quantize(w, qtype)
    assert data.dtype == torch.uint8
    assert tuple(data.shape) == (48, gguf_quants.row_bytes(qtype, 512))
    back = _decode(data, qtype)
    assert back.shape == w.shape and torch.isfinite(back).all()
    err = float((back - w).norm() / w.norm())
    assert err < QUANT_ERROR[qtype], f"{qtype}: relative error {err:.3f}"
    assert torch.equal(back[5], torch.zeros(512))          # zero rows stay exactly zero
    if qtype in ("Q4_0", "Q8_0", "TQ1_0", "TQ2_0"):        # gguf has a quantizer: ours is no worse
        ref = _decode(torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])), qtype)
        assert err <= float((ref - w).norm() / w.norm()) * 1.001


def _on_grid(levels, blocks, block, seed=0):
    """Values d * levels[code] with an fp16 scale per block and both extreme levels present."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor(levels, dtype=torch.float32)
    codes = torch.randint(0, len(levels), (blocks, block), generator=g)
    codes[:, 0], codes[:, 1] = 0, len(levels) - 1
    d = (torch.rand(blocks, generator=g) * 0.01 + 1e-3).half().float()
    return d[:, None] * levels[codes]


@pytest.mark.parametrize("qtype,levels", [("Q4_0", list(range(-8, 8))), ("Q8_0", list(range(-127, 128))),
                                          ("TQ1_0", [-1, 0, 1]), ("TQ2_0", [-1, 0, 1])])
def test_bytes_equal_gguf_quantizer_on_its_grid(qtype, levels):
    """Where gguf has a quantizer and a block's values lie on the type's grid
    with the extreme level present, the scale is unique: the bytes must be
    identical to gguf's, bit for bit."""
    block = gguf_quants.BLOCK[qtype][0]
    if qtype == "Q4_0":       # gguf's Q4_0 maps the largest magnitude to -8
        x = _on_grid(levels, 64, block)
        x = torch.where(x.abs().amax(1, keepdim=True) == -x.amin(1, keepdim=True), x, -x)
    else:
        x = _on_grid(levels, 64, block)
    w = x.reshape(8, -1)
    ours = gguf_quants.quantize(w, qtype)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("qtype,levels", [("IQ4_NL", list(gguf_quants.IQ4_NL_VALUES)),
                                          ("Q4_0", list(range(-8, 8)))])
def test_grid_values_come_back_exactly(qtype, levels):
    """Values already on the grid are found again exactly (decoded by gguf bit for bit)."""
    x = _on_grid(levels, 64, 32).reshape(8, -1)
    assert torch.equal(_decode(gguf_quants.quantize(x, qtype), qtype), x)


def test_q8_0_bits_equal_gguf():
    w = _gaussian()
    w[6] = 0.01   # (a block of 1e-6 has a scale below fp16's range: both decode it to 0, with different codes)
    ours = gguf_quants.quantize(w, "Q8_0")
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    # the same scales, bit for bit; the codes are the nearest for the stored
    # (fp16) scale, where gguf rounds against the float32 one: never farther
    assert np.array_equal(ours.numpy().reshape(-1, 34)[:, :2], theirs.reshape(-1, 34)[:, :2])
    err_ours = (_decode(ours, "Q8_0") - w).abs()
    err_theirs = (_decode(torch.from_numpy(theirs), "Q8_0") - w).abs()
    assert bool((err_ours <= err_theirs + 1e-12).all())


def _llama_cpp_quantize(src, dst, qtype):
    """llama.cpp's own quantizer on one of our files, every matrix in `qtype` (pure)."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = 1
    params.pure = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("qtype", ["IQ4_NL", "Q4_0"])
def test_no_worse_than_llama_cpp_quantizer(llama, tokenizer, tmp_path, qtype):
    """Against llama.cpp's own quantizer on the same (F16) weights, matrix by
    matrix: IQ4_NL runs llama.cpp's search, so the blocks come out the same
    bytes (a few differ in the last bit of a sum taken in another order);
    Q4_0's least-squares scales must beat llama.cpp's largest-value-to--8
    rule on every matrix."""
    f16, theirs_path = tmp_path / "f16.gguf", tmp_path / f"llama-{qtype}.gguf"
    export_gguf(llama, f16, "F16", tokenizer, verbose=False)
    _llama_cpp_quantize(f16, theirs_path, qtype)
    src = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
    checked = 0
    for t in gguf.GGUFReader(str(theirs_path)).tensors:
        if t.tensor_type.name != qtype:
            continue
        w = torch.from_numpy(np.array(src[t.name].data)).float()      # [rows, cols] as stored
        ours = gguf_quants.quantize(w, qtype)
        theirs = torch.from_numpy(np.array(t.data)).reshape(ours.shape)
        err_ours = float((_decode(ours, qtype).reshape(w.shape) - w).norm())
        err_theirs = float((_decode(theirs, qtype).reshape(w.shape) - w).norm())
        if qtype == "IQ4_NL":
            same = (ours.reshape(-1, 18) == theirs.reshape(-1, 18)).all(1).float().mean()
            assert same > 0.99, f"{t.name}: {float(same):.4f} of the blocks equal llama.cpp's"
            assert err_ours <= err_theirs * 1.002, f"{t.name}: {err_ours:.5g} vs llama.cpp {err_theirs:.5g}"
        else:
            assert err_ours < err_theirs, f"{t.name}: {err_ours:.5g} vs llama.cpp {err_theirs:.5g}"
        checked += 1
    assert checked >= 14           # every decoder matrix of the 2-layer model


@pytest.mark.parametrize("qtype", gguf_quants.IMPORTANCE_TYPES)
def test_importance_lowers_the_weighted_error(qtype):
    """With an importance matrix (activations' mean square per input channel)
    the error the layer's outputs see, sum_j imp_j (w_ij - q_ij)^2, drops."""
    w = _gaussian()
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(512, generator=g) ** 4 * 100 + 0.01       # a few channels dominate
    def weighted(data):
        return float(((_decode(data, qtype) - w) ** 2 * importance).sum())
    plain, calibrated = gguf_quants.quantize(w, qtype), gguf_quants.quantize(w, qtype, importance)
    assert weighted(calibrated) < 0.95 * weighted(plain)
    for bad in (importance[:-1], -importance, importance * float("nan")):
        with pytest.raises(ValueError, match="importance"):
            gguf_quants.quantize(w, qtype, bad)


def test_export_with_calibration(llama, tokenizer, tmp_path):
    model = copy.deepcopy(llama)
    batches = [torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = memboost.calibrate(model, batches)
    report = export_gguf(model, tmp_path / "cal.gguf", "IQ4_NL", tokenizer, calibration=stats, verbose=False)
    notes = {r.name: r.note for r in report.rows}
    assert "calibration-weighted" in notes["blk.0.ffn_down.weight"]
    assert "calibration-weighted" not in notes.get("token_embd.weight", "")
    plain = export_gguf(model, tmp_path / "plain.gguf", "IQ4_NL", tokenizer, verbose=False)
    assert sorted(r.name for r in plain.rows) == sorted(notes)
    name = "model.layers.0.mlp.down_proj"
    for bad, match in (({"model.nope": stats[name]}, "not a weight matrix"),
                       ({name: stats[name][:-1]}, "input features"),
                       ({name: -stats[name]}, "non-negative"), ([1, 2], "dict")):
        with pytest.raises(memboost.MemboostError, match=match):
            export_gguf(model, tmp_path / "bad.gguf", "IQ4_NL", calibration=bad, verbose=False)
    assert not (tmp_path / "bad.gguf").exists()


def test_ternary_copy_is_exact():
    """A ternary weight becomes TQ2_0 / TQ1_0 with the very same trits; TQ2_0's bytes are memboost's packed bytes."""
    w = _gaussian(cols=768)
    for q in (memboost.ternary.quantize(w), memboost.ternary.quantize(w, group_size=256),
              memboost.ternary.quantize(w, per_row=False)):
        for qtype in ("TQ2_0", "TQ1_0"):
            assert gguf_type_for("ternary", qtype, 768, True)[1] == "copy"
            from memboost.io.gguf.export import _ternary_copy
            data = _ternary_copy(q, qtype)
            back = _decode(data, qtype)
            scales_f16 = q.tensors["scales"].half().float()
            want = q.trits().float() * (scales_f16.repeat_interleave(max(1, q.group_size), 1)[:, :768]
                                         if q.group_size else scales_f16)
            assert torch.equal(back, want)
            if qtype == "TQ2_0":
                assert torch.equal(data.reshape(48, 3, 66)[:, :, :64].reshape(48, -1), q.tensors["packed"])


def test_type_rule():
    assert gguf_type_for("float", "F16", 576) == ("F16", "cast", "")
    assert gguf_type_for("nf4", "F32", 576)[2] == "nf4 dequantized"
    assert gguf_type_for("nf4", "IQ4_NL", 576)[:2] == ("IQ4_NL", "quantize")
    assert gguf_type_for("ternary", "TQ2_0", 512, exact_ternary=False)[1] == "quantize"
    qtype, how, note = gguf_type_for("mixed", "Q4_K", 576)
    assert qtype == "IQ4_NL" and "576" in note and "256" in note and "mixed dequantized" in note
    assert gguf_type_for("ternary", "TQ1_0", 576)[0] == "Q4_0"
    assert gguf_type_for("lort", "Q3_K", 1536)[:2] == ("Q3_K", "quantize")   # any format: re-quantized
    with pytest.raises(memboost.MemboostError, match="multiple of 32.*rows of 48"):
        gguf_type_for("float", "Q4_0", 48)
    with pytest.raises(memboost.MemboostError, match="weight_type"):
        gguf_type_for("float", "Q6_K", 256)
    assert gguf_type_for("nf4", "Q5_0", 576)[:2] == ("Q5_0", "quantize")
    assert gguf_type_for("float", "Q5_K", 576)[0] == "Q5_0"                 # the same 5.5 bits
    with pytest.raises(memboost.MemboostError, match="multiple of 32.*rows of 48"):
        gguf_type_for("nf4", "Q5_0", 48)


# -- the file --------------------------------------------------------------------
def test_metadata_reads_back(llama, tokenizer, tmp_path):
    path = tmp_path / "tiny.gguf"
    report = export_gguf(llama, path, "Q4_0", tokenizer, verbose=False)
    assert isinstance(report, GGUFExportReport) and report.file_bytes == os.path.getsize(path)
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items()}
    c = llama.config
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 2 and f["llama.context_length"] == 256
    assert f["llama.embedding_length"] == 256 and f["llama.feed_forward_length"] == 256
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.freq_base"] == c.rope_parameters["rope_theta"]
    assert f["llama.rope.dimension_count"] == 64 and f["llama.vocab_size"] == 400
    assert math.isclose(f["llama.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 400 and tokens[:2] == ["<s>", "</s>"] and tokens[-1] == "[PAD399]"
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert types[399] == gguf.TokenType.UNUSED
    assert len(f["tokenizer.ggml.merges"]) > 100
    assert f["tokenizer.ggml.bos_token_id"] == 0 and f["tokenizer.ggml.eos_token_id"] == 1
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 9 + 3
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_0 and list(q.shape) == [256, 256]
    ffn_down = tensors["blk.0.ffn_down.weight"]
    assert list(ffn_down.shape) == [256, 256]
    assert list(tensors["token_embd.weight"].shape) == [256, 400]   # reversed: [in, out]
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0   # output kept at 8 bits
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert all(t.data_offset % 32 == 0 for t in r.tensors)           # aligned tensor data
    # the table: every tensor, its source, type and error
    assert [row.name for row in report.rows] == [t.name for t in r.tensors]
    row = next(x for x in report.rows if x.name == "blk.0.attn_q.weight")
    assert row.gguf_type == "Q4_0" and row.bits_per_weight == 4.5 and 0.05 < row.rel_error < 0.1


# Q5_K is checked against gguf's decoder only: llama-cpp-python 0.3.36 dies
# (SIGSEGV) running any Q5_K file on this machine's Xeon, one written by
# llama.cpp's own quantizer included.
@pytest.mark.parametrize("qtype", [t for t in memboost.gguf.WEIGHT_TYPES if t != "Q5_K"])
def test_llama_cpp_runs_every_type(llama, tokenizer, tmp_path, qtype):
    report, err, distance = _check_llama_cpp(llama, tokenizer, tmp_path / "m.gguf", qtype)
    if gguf_quants.bits_per_weight(qtype) < 5:
        assert err < distance / 4, "llama.cpp must run the exported weights, not something near the source"
    types = {r.gguf_type for r in report.rows if r.name.startswith("blk.") and r.name.endswith("_q.weight")}
    assert types == {qtype}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "IQ4_NL", "Q4_K"])
def test_llama_cpp_runs_qwen2(qwen2, tokenizer, tmp_path, qtype):
    report, err, distance = _check_llama_cpp(qwen2, tokenizer, tmp_path / "q.gguf", qtype)
    names = {r.name for r in report.rows}
    assert "blk.0.attn_q.bias" in names and "output.weight" not in names     # q/k/v biases; tied output


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
def test_llama_cpp_runs_mistral(tokenizer, tmp_path, qtype):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=400, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                           sliding_window=None, tie_word_embeddings=False)
    report, err, distance = _check_llama_cpp(_randomize(MistralForCausalLM(config)), tokenizer,
                                             tmp_path / "m.gguf", qtype)
    assert report.architecture == "llama"                # llama.cpp runs Mistral as "llama"


def test_llama_cpp_runs_llama3_rope_scaling(tokenizer, tmp_path):
    """Llama 3's rope scaling goes in as llama.cpp's rope_freqs tensor: with
    an original context of 8 tokens most frequencies are rescaled inside the
    16-token sequence, so llama.cpp agrees with PyTorch only if it applies them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    kw = dict(vocab_size=400, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    model = _randomize(LlamaForCausalLM(LlamaConfig(rope_scaling=scaling, **kw)))
    plain = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([tokenizer(SENTENCE)["input_ids"][:16]])
    with torch.no_grad():
        scaled, unscaled = model(ids).logits.numpy(), plain(ids).logits.numpy()
    assert _rms(scaled - unscaled) / _rms(scaled) > 10 * TOLERANCE["F32"]    # the scaling matters here
    report, _, _ = _check_llama_cpp(model, tokenizer, tmp_path / "l3.gguf", "F32")
    assert "rope_freqs.weight" in {r.name for r in report.rows}
    broken = copy.deepcopy(model)
    broken.config.rope_parameters = {k: v for k, v in broken.config.rope_parameters.items() if k != "low_freq_factor"}
    with pytest.raises(memboost.MemboostError, match="low_freq_factor"):
        export_gguf(broken, tmp_path / "x.gguf", "F32", verbose=False)


def test_llama_cpp_runs_a_file_without_tokenizer(llama, tmp_path):
    """tokenizer=None: no vocabulary in the file; llama.cpp still loads it and runs token ids."""
    report = export_gguf(llama, tmp_path / "bare.gguf", "Q8_0", verbose=False)
    fields = gguf.GGUFReader(str(tmp_path / "bare.gguf")).fields
    assert [name for name in fields if name.startswith("tokenizer.")] == ["tokenizer.ggml.model"]   # "none"
    ids = [5, 17, 42, 99, 3, 250, 7]
    exported = type(llama)(llama.config).eval()
    exported.load_state_dict(gguf_state_dict(tmp_path / "bare.gguf", llama), strict=False)
    with torch.no_grad():
        want = exported(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "bare.gguf"), logits_all=True, n_ctx=64, n_threads=2,
                          verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    assert _rms(got - want) / _rms(want) < TOLERANCE["Q8_0"] and report.architecture == "llama"


def test_llama_cpp_sentencepiece_tokenizer(sentencepiece_tokenizer, tmp_path):
    """A SentencePiece-style vocabulary: scores, byte tokens, the space prefix; llama.cpp tokenizes as HF does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    path = tmp_path / "spm.gguf"
    _check_llama_cpp(_randomize(LlamaForCausalLM(config)), sentencepiece_tokenizer, path, "F32")
    f = {k: v.contents() for k, v in gguf.GGUFReader(str(path)).fields.items()}
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.ggml.token_type"][3] == gguf.TokenType.BYTE and f["tokenizer.ggml.tokens"][3] == "<0x00>"
    assert f["tokenizer.ggml.token_type"][0] == gguf.TokenType.UNKNOWN
    assert f["tokenizer.ggml.scores"][400] == -400.0
    text = memboost.testbed.english_text(3000) + " café → 42"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False) == sentencepiece_tokenizer(text)["input_ids"]
    finally:
        llm.close()


@pytest.mark.parametrize("method,params,qtype,expect", [
    ("ternary", {}, "TQ2_0", "same trits"),
    ("ternary", {}, "TQ1_0", "same trits"),
    ("ternary", {"group_size": 128}, "TQ2_0", "re-quantized"),
    ("nf4", {}, "IQ4_NL", "NF4 values mapped"),
    ("mixed", {"ratio_4bit": 0.5}, "Q4_K", "mixed dequantized"),
    ("lort", {"rank": 8, "iters": 2, "per_row_alpha": True}, "Q8_0", "lort dequantized"),
])
def test_llama_cpp_runs_quantized_models(llama, tokenizer, tmp_path, method, params, qtype, expect):
    model = copy.deepcopy(llama)
    memboost.quantize_model(model, method, progress=False, **params)
    report, err, distance = _check_llama_cpp(model, tokenizer, tmp_path / "m.gguf", qtype)
    row = next(r for r in report.rows if r.name == "blk.1.ffn_down.weight")
    assert row.source == method and row.gguf_type == qtype and expect in row.note
    if row.note.startswith("same trits"):
        assert row.rel_error < 1e-3                      # only the fp16 rounding of the scales


def test_nf4_export_q5_0_keeps_the_nf4_model_closer_than_iq4_nl(llama, tokenizer, tmp_path):
    """An NF4 model exported as Q5_0 (5.5 bits) runs in llama.cpp closer to
    the NF4 model's own logits than the IQ4_NL export (4.5 bits), whose grid
    does not nest with NF4's."""
    model = copy.deepcopy(llama)
    memboost.quantize_model(model, "nf4", progress=False)
    ids = tokenizer(SENTENCE)["input_ids"][:16]
    with torch.no_grad():
        nf4_logits = model(torch.tensor([ids])).logits[0].float().numpy()
    distance = {}
    for qtype in ("IQ4_NL", "Q5_0"):
        path = tmp_path / f"{qtype}.gguf"
        report = export_gguf(model, path, qtype, tokenizer, verbose=False)
        rows = [r for r in report.rows if r.name.startswith("blk.") and r.source == "nf4"]
        assert rows and all(r.gguf_type == qtype for r in rows)
        assert all(r.bits_per_weight <= 5.5 for r in rows)
        got, _ = _llama_cpp_logits(path, ids)
        distance[qtype] = _rms(got - nf4_logits) / _rms(nf4_logits)
    assert distance["Q5_0"] < 0.7 * distance["IQ4_NL"], distance


def _nf4_model_and_calibration(llama):
    model = copy.deepcopy(llama)
    memboost.quantize_model(model, "nf4", progress=False)
    batches = [torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, batches


def test_calibrate_measures_quantized_layers(llama):
    """calibrate(quantized=True) measures an NF4 model's own (QuantizedLinear)
    layers: the activations export_gguf weighs the NF4 -> Q5_0 scales by."""
    model, batches = _nf4_model_and_calibration(llama)
    float_stats = memboost.calibrate(llama, batches)
    with pytest.raises(memboost.MemboostError, match="no input"):
        memboost.calibrate(model, batches)             # every layer quantized, lm_head skipped
    stats = memboost.calibrate(model, batches, quantized=True)
    assert set(stats) == set(float_stats)
    first, last = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(stats[first], float_stats[first])   # reads the input before any NF4 layer
    assert not torch.allclose(stats[last], float_stats[last])      # reads what the NF4 layers computed
    assert set(memboost.calibrate(model, batches, quantized=True, skip=("lm_head", "mlp"))) == {
        n for n in stats if ".mlp." not in n}


def test_nf4_export_q5_0_calibrated(llama, tokenizer, tmp_path):
    """The export that keeps an NF4 model's behaviour (README: within 5% of its
    perplexity on SmolLM2): every NF4 matrix in Q5_0, 5.5 bits per weight,
    each 32-block's scale chosen for the least activation-weighted error of
    the NF4 values, the activations measured on the NF4 model itself."""
    model, batches = _nf4_model_and_calibration(llama)
    stats = memboost.calibrate(model, batches, quantized=True)
    report, _, _ = _check_llama_cpp(model, tokenizer, tmp_path / "cal.gguf", "Q5_0", calibration=stats)
    rows = [r for r in report.rows if r.source == "nf4"]
    assert len(rows) == 14 and all(r.gguf_type == "Q5_0" and "calibration-weighted" in r.note for r in rows)
    assert sum(8 * r.nbytes for r in rows) / sum(r.numel for r in rows) <= 5.5
    plain = tmp_path / "plain.gguf"
    export_gguf(model, plain, "Q5_0", tokenizer, verbose=False)
    nf4_weights = {n: v.dequantize().float() for n, v in
                   ((f"{name}.weight", m.weight.tensor()) for name, m in model.named_modules()
                    if isinstance(m, memboost.nn.QuantizedLinear) and m.weight.tensor().format == "nf4")}

    def weighted_error(path):
        back = gguf_state_dict(path, model)
        return sum(float(((back[n] - w) ** 2 * stats[n[:-len(".weight")]]).sum()) for n, w in nf4_weights.items())

    # measured 0.97 here: a random-weight model's activations are nearly even
    # across channels (SmolLM2's are not: README, 42.6 -> 40.9 perplexity)
    assert weighted_error(tmp_path / "cal.gguf") < 0.98 * weighted_error(plain)


def test_cli_nf4_calibrated(llama, tokenizer, tmp_path, capsys):
    """`memboost gguf` of a saved NF4 model with --calibrate: the calibration
    runs on the NF4 model's own layers and weighs the Q5_0 scales."""
    model = copy.deepcopy(llama)
    memboost.quantize_model(model, "nf4", progress=False)
    folder = tmp_path / "nf4"
    memboost.save_quantized(model, str(folder), tokenizer=tokenizer)
    out = tmp_path / "m.gguf"
    assert memboost.cli.main(["gguf", str(folder), str(out), "--type", "Q5_0", "--quiet", "--verbose",
                              "--calibrate", "fortunes", "--calib-tokens", "64"]) == 0
    table = capsys.readouterr().out
    assert "| blk.0.ffn_down.weight | nf4 | Q5_0 | 5.5 |" in table and "calibration-weighted" in table


def test_fallback_is_reported(tokenizer, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=400, hidden_size=160, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = _randomize(LlamaForCausalLM(config))
    report = export_gguf(model, tmp_path / "f.gguf", "Q4_K", tokenizer)
    rows = {r.name: r for r in report.rows}
    assert rows["blk.0.attn_q.weight"].gguf_type == "IQ4_NL"          # rows of 160
    assert "Q4_K -> IQ4_NL: rows of 160 are not a multiple of 256" in rows["blk.0.attn_q.weight"].note
    assert rows["blk.0.ffn_down.weight"].gguf_type == "Q4_K"          # rows of 512
    out = capsys.readouterr().out
    assert "| blk.0.ffn_down.weight | float | Q4_K | 4.5 |" in out and "fell back" in out


# -- the other families --------------------------------------------------------------
# llama.cpp's layer patterns: Gemma 2 alternates local and global layers starting local, Gemma 3 has five local
# layers to a global one (six layers here so that both kinds, and both rotary bases, run).
GGUF_FAMILIES = {"qwen3": {}, "gemma": {}, "gemma2": {}, "gemma3": {"num_hidden_layers": 6, "layer_types": None},
                 "phi3": {}, "olmo2": {}}


def _family_model(family, **overrides):
    """conftest's tiny model of `family`, 256 wide (for the 256-blocks), random weights of std 0.08 and norm
    weights spread around their neutral value (so that a norm stored without Gemma's + 1, or a q/k norm left
    out, shows)."""
    model = _randomize(tiny_causal_lm(family, vocab_size=400, hidden_size=256, intermediate_size=256,
                                      **{**GGUF_FAMILIES[family], **overrides}))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.2)
    return model


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_llama_cpp_runs_every_family(family, tokenizer, tmp_path, qtype):
    model = _family_model(family)
    # (named: llama.cpp looks up Phi-3's own special tokens in a model whose name says phi3)
    report, err, distance = _check_llama_cpp(model, tokenizer, tmp_path / "f.gguf", qtype, name=f"tiny-{qtype}")
    if qtype == "Q4_0":
        assert err < distance / 4, "llama.cpp must run the exported weights, not something near the source"
    reader = gguf.GGUFReader(str(tmp_path / "f.gguf"))
    fields = {k: v.contents() for k, v in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    arch = fields["general.architecture"]
    assert arch == {"gemma3": "gemma3"}.get(family, family) == report.architecture
    config = model.config
    if family == "phi3":          # fused, as llama.cpp's phi3 takes them
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= set(tensors)
        assert "blk.0.attn_q.weight" not in tensors and "blk.0.ffn_gate.weight" not in tensors
        assert list(tensors["blk.0.ffn_up.weight"].shape) == [256, 512]
    if family in ("qwen3", "gemma3", "olmo2"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(tensors)
    if family.startswith("gemma"):  # norms stored as 1 + weight; the output tied to the embedding
        norm = torch.from_numpy(np.array(tensors["blk.0.attn_norm.weight"].data))
        torch.testing.assert_close(norm, model.model.layers[0].input_layernorm.weight.detach() + 1)
        assert "output.weight" not in tensors
    if family in ("gemma2", "gemma3"):
        assert fields[f"{arch}.attention.sliding_window"] == config.sliding_window == 8
        assert "blk.0.post_ffw_norm.weight" in tensors
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == config.attn_logit_softcapping
        assert fields["gemma2.final_logit_softcapping"] == config.final_logit_softcapping
    if family == "gemma3":
        assert fields["gemma3.rope.freq_base"] == config.rope_parameters["full_attention"]["rope_theta"]


def test_llama_cpp_runs_phi3_partial_rotary(tokenizer, tmp_path):
    """Phi-3 with half of each head rotated (Phi-4-mini's kind): rope.dimension_count says how much, and llama.cpp
    agrees with PyTorch only if it rotates exactly those dimensions."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    model = _family_model("phi3", rope_parameters=rope)
    _check_llama_cpp(model, tokenizer, tmp_path / "p.gguf", "F32", name="tiny")
    fields = {k: v.contents() for k, v in gguf.GGUFReader(str(tmp_path / "p.gguf")).fields.items()}
    assert fields["phi3.rope.dimension_count"] == model.model.layers[0].self_attn.head_dim // 2


@pytest.mark.parametrize("family,method,params,qtype", [
    ("gemma2", "nf4", {}, "Q5_0"),
    ("phi3", "ternary", {}, "TQ2_0"),
    ("qwen3", "mixed", {"ratio_4bit": 0.5, "group_size": 32}, "Q4_K"),
])
def test_llama_cpp_runs_quantized_families(family, method, params, qtype, tokenizer, tmp_path):
    """memboost-quantized models of the other families, the int8 output layer included (untied from Gemma's
    embedding by quantize_model: then written as output.weight)."""
    model = _family_model(family)
    memboost.quantize_model(model, method, progress=False, **params)
    report, err, distance = _check_llama_cpp(model, tokenizer, tmp_path / "q.gguf", qtype, name="tiny")
    rows = {r.name: r for r in report.rows}
    if family == "gemma2":  # llama.cpp's gemma2 always computes the logits with token_embd: lm_head not written
        assert "output.weight" not in rows and rows["token_embd.weight"].gguf_type == "Q8_0"
        untied = copy.deepcopy(model)
        with torch.no_grad():
            untied.model.embed_tokens.weight.mul_(-1)
        with pytest.raises(memboost.MemboostError, match="'gemma2' always computes the logits with the token"):
            export_gguf(untied, tmp_path / "x.gguf", qtype, verbose=False)
    else:
        assert rows["output.weight"].gguf_type == "Q8_0" and rows["output.weight"].source == "int8"
    down = rows["blk.1.ffn_down.weight"]
    assert down.source == method and down.gguf_type == qtype


def test_family_settings_llama_cpp_does_not_run_are_refused(tmp_path):
    cases = [
        ("gemma3", {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, "sliding-window"),
        ("olmo2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
    ]
    for family, overrides, match in cases:
        model = tiny_causal_lm(family, **{**GGUF_FAMILIES[family], **overrides})
        with pytest.raises(memboost.MemboostError, match=f"{model.config.model_type}.*{match}"):
            export_gguf(model, tmp_path / "x.gguf", "F32", verbose=False)
    with pytest.raises(memboost.MemboostError, match="<\\|endoftext\\|>.*a Phi-3 name"):
        export_gguf(tiny_causal_lm("phi3", vocab_size=400), tmp_path / "x.gguf", "F32", _byte_level_tokenizer(),
                    verbose=False)
    assert os.listdir(tmp_path) == []


# -- bad input -------------------------------------------------------------------
def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(memboost.MemboostError, match="'gpt2'"):
        export_gguf(model, tmp_path / "x.gguf", "F16")
    assert os.listdir(tmp_path) == []


def test_row_length_not_allowed(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    with pytest.raises(memboost.MemboostError, match=r"model.embed_tokens.weight.*Q4_0.*multiple of 32.*rows of 48"):
        export_gguf(LlamaForCausalLM(config), tmp_path / "x.gguf", "Q4_0", tokenizer, output_type="Q4_0")
    assert os.listdir(tmp_path) == []


def test_missing_hyper_parameter(llama, tmp_path):
    from types import SimpleNamespace

    model = copy.deepcopy(llama)
    fields = model.config.to_dict()
    del fields["rms_norm_eps"]
    model.config = SimpleNamespace(**fields)
    with pytest.raises(memboost.MemboostError, match="rms_norm_eps"):
        export_gguf(model, tmp_path / "x.gguf", "F16")
    assert os.listdir(tmp_path) == []


def test_bad_type_and_path(llama, tmp_path):
    with pytest.raises(memboost.MemboostError, match="'weight_type' must be one of"):
        export_gguf(llama, tmp_path / "x.gguf", "Q7_X")
    with pytest.raises(memboost.MemboostTypeError):
        export_gguf(llama, tmp_path / "x.gguf", 4)
    with pytest.raises(memboost.MemboostError, match="does not exist"):
        export_gguf(llama, tmp_path / "no" / "x.gguf", "F16")


def test_failed_write_leaves_nothing(llama, tokenizer, tmp_path, monkeypatch):
    """An error while the file is being written leaves neither it nor a temporary file, and an old file intact."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(memboost.MemboostError, match="No space left"):
        export_gguf(llama, path, "Q8_0", tokenizer, verbose=False)
    assert os.listdir(tmp_path) == ["m.gguf"] and path.read_bytes() == b"old"


def test_cli(llama, tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "m.gguf"
    assert memboost.cli.main(["gguf", str(folder), str(out), "--type", "IQ4_NL", "--quiet"]) == 0
    assert "bits per weight (mostly IQ4_NL)" in capsys.readouterr().out
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
    assert memboost.cli.main(["gguf", str(folder), str(tmp_path / "b.gguf"), "--type", "Q9"]) == 2
    assert "weight_type" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()
    calibrated = tmp_path / "c.gguf"
    assert memboost.cli.main(["gguf", str(folder), str(calibrated), "--type", "IQ4_NL", "--quiet", "--calibrate",
                              "fortunes", "--calib-tokens", "64"]) == 0
    name = "blk.0.ffn_down.weight"
    plain, cal = ({t.name: np.array(t.data) for t in gguf.GGUFReader(str(f)).tensors}[name] for f in (out, calibrated))
    assert plain.shape == cal.shape and not np.array_equal(plain, cal)     # the calibration moved the scales


# -- the real model ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "IQ4_NL", "Q4_0"])
def test_smollm2_in_llama_cpp(tmp_path, qtype):
    """SmolLM2-135M: llama.cpp's logits equal PyTorch's on the exported weights,
    and llama.cpp tokenizes English exactly as the Hugging Face tokenizer does."""
    model, tokenizer = memboost.testbed.load_smollm2()
    path = tmp_path / "smollm2.gguf"
    export_gguf(model, path, qtype, tokenizer, verbose=False)
    exported = copy.deepcopy(model)
    exported.load_state_dict(gguf_state_dict(path, model), strict=False)
    text = memboost.testbed.english_text(6000)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        window = ids[:64]
        llm.eval(window)
        got = np.array(llm.scores[:64])
    finally:
        llm.close()
    with torch.no_grad():
        want = exported(torch.tensor([window])).logits[0].numpy()
    err = _rms(got - want) / _rms(want)
    assert err < TOLERANCE[qtype], f"{qtype}: {err:.2e}"
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9
