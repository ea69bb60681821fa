"""int8 weights (llama.cpp's Q8_0 layout): the rounding equals the GGUF Q8_0
quantizer's, kernels vs reference on every device and forced CPU
instruction set, opcheck, files, and the output layer quantize_model makes
int8 by default (tied embedding kept float and untied, save/load, GGUF)."""

import pytest
import torch

import memboost
import memboost.formats.int8 as int8
from memboost import reference
from memboost.io.gguf import quants as gguf_quants
from memboost.nn import Int8Linear

from conftest import llm_like_weight, rel_err, tiny_llama, tiny_llama_with_tokenizer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["portable", "avx2", "avx512"]


def _state(q):
    return q.tensors["values"], q.tensors["scales"]


def test_rounding_is_the_gguf_q8_0_quantizer_and_lossless():
    w = llm_like_weight(48, 256)
    q = int8.quantize(w)
    values, scales = _state(q)
    assert values.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (48, 8)
    # the GGUF Q8_0 bytes of the float weight are the int8 weight's own numbers
    assert torch.equal(gguf_quants.quantize(w, "Q8_0"), gguf_quants.pack_q8_0(values, scales))
    # re-quantizing the dequantized weight returns them (a Q8_0 export loses nothing)
    again = int8.quantize(q.dequantize())
    assert torch.equal(again.tensors["values"], values) and torch.equal(again.tensors["scales"], scales)
    gguf = pytest.importorskip("gguf", reason="the gguf package is in the hf extra")
    decoded = gguf.quants.dequantize(gguf_quants.pack_q8_0(values, scales).numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(torch.from_numpy(decoded.copy()).reshape(48, 256), q.dequantize())
    # d = fp16(absmax / 127), round half to even, an all-zero block stays zero
    block = torch.tensor([[0.5, -1.0, 0.25] + [0.0] * 29, [0.0] * 32])
    d, codes = reference.q8_0_blocks(block)
    assert d[0] == torch.tensor(1.0 / 127).half().float() and d[1] == 0
    assert codes[0, :3].tolist() == [64, -127, 32] and not codes[1].any()
    assert rel_err(q.dequantize(), w) < 0.01


def test_kernels_match_reference(device):
    for dtype in DTYPES:
        q = int8.quantize(llm_like_weight(40, 96, dtype=dtype).to(device))
        want = reference.int8_dequantize(*_state(q), dtype)
        got = q.dequantize()
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(64, 256), (30, 96), (2048, 576)])  # the last: several parallel tasks
def test_linear_every_isa(monkeypatch, isa, shape):
    monkeypatch.setenv("MEMBOOST_CPU_ISA", isa)
    n, k = shape
    q = int8.quantize(llm_like_weight(n, k))
    bias = torch.randn(n)
    for m in (1, 3, 6, 40):
        x = torch.randn(m, k)
        x[:, 5] *= 30  # a huge channel: spoils only its own activation block
        exact = reference.int8_linear(x, *_state(q), bias, 0)
        assert rel_err(q.linear(x, bias), exact) < 2e-6
        assert rel_err(q.linear(x, bias), torch.nn.functional.linear(x, q.dequantize(), bias)) < 2e-6
        y8 = q.linear(x, bias, act_bits=8)
        # exact integer block products: equal to the reference up to float summation order
        assert rel_err(y8, reference.int8_linear(x, *_state(q), bias, 8)) < 1e-5
        assert rel_err(y8, exact) < 0.02  # the int8 rounding of x (about 1% on Gaussian x)


def test_linear_batch_shapes_dtypes_and_autograd(device):
    q = int8.quantize(llm_like_weight(32, 128).to(device))
    for dtype in DTYPES:
        x = torch.randn(2, 3, 128, device=device, dtype=dtype)
        for act_bits in (None, 8):
            y = q.linear(x, act_bits=act_bits)
            assert y.shape == (2, 3, 32) and y.dtype == dtype
            tol = (1e-5 if dtype == torch.float32 else 2e-2) if act_bits is None else 2e-2
            assert rel_err(y, x.float() @ q.dequantize().float().T) < tol
    x = torch.randn(4, 128, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    q.linear(x, bias).square().sum().backward()
    w = q.dequantize()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5 and rel_err(bias.grad, b2.grad) < 1e-5


def test_opcheck(device):
    q = int8.quantize(llm_like_weight(24, 128).to(device))
    values, scales = _state(q)
    torch.library.opcheck(torch.ops.memboost.int8_dequantize.default, (values, scales, torch.float16))
    x = torch.randn(3, 128, device=device)
    for act_bits in (0, 8):
        torch.library.opcheck(torch.ops.memboost.int8_linear.default,
                              (x, values, scales, torch.randn(24, device=device), act_bits))
    torch.library.opcheck(torch.ops.memboost.int8_linear.default, (x.requires_grad_(), values, scales, None, 0))


def test_bad_input_is_refused_by_name():
    with pytest.raises(memboost.MemboostError, match="multiple of 32"):
        int8.quantize(torch.randn(4, 40))
    q = int8.quantize(torch.randn(4, 64))
    values, scales = _state(q)
    with pytest.raises(ValueError, match="'scales' must have shape"):
        memboost.ops.int8_linear(torch.randn(2, 64), values, scales[:, :1])
    with pytest.raises(ValueError, match="'values' must have dtype torch.int8"):
        memboost.ops.int8_dequantize(values.to(torch.uint8), scales, torch.float32)
    with pytest.raises(ValueError, match="act_bits"):
        memboost.ops.int8_linear(torch.randn(2, 64), values, scales, None, 4)
    with pytest.raises(memboost.MemboostError, match="in_features=64"):
        q.linear(torch.randn(2, 32))
    state = q.state_dict()
    with pytest.raises(memboost.MemboostError, match="'scales' must have dtype torch.float16"):
        memboost.QuantizedTensor.from_state_dict({**state, "scales": scales.float()})
    with pytest.raises(memboost.MemboostError, match="'values' must have shape"):
        memboost.QuantizedTensor.from_state_dict({**state, "values": values[:2]})


def test_state_dict_file_and_layer(tmp_path):
    w = llm_like_weight(64, 96)
    q = int8.quantize(w)
    assert abs(q.avg_bits - 8.5) < 0.2
    path = tmp_path / "w.safetensors"
    memboost.save_safetensors(q.state_dict(), str(path))
    q2 = memboost.QuantizedTensor.from_state_dict(memboost.load_safetensors(str(path)))
    assert isinstance(q2, memboost.Int8QuantizedTensor) and torch.equal(q2.dequantize(), q.dequantize())
    lin = torch.nn.Linear(96, 64)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(5, 96)
    assert rel_err(layer(x), lin(x)) < 0.01
    fresh = Int8Linear(96, 64)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


def _tied_llama():
    model, tokenizer = tiny_llama_with_tokenizer(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, tokenizer


def test_quantize_model_makes_the_output_layer_int8_and_keeps_the_embedding():
    model, _ = _tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report = memboost.quantize_model(model, "nf4", progress=False)
    assert isinstance(model.lm_head, Int8Linear) and not isinstance(model.model.embed_tokens.weight, Int8Linear)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # exact float, untouched
    assert model.config.tie_word_embeddings is False
    assert report.output_layer is not None and report.output_layer.name == "lm_head"
    assert "lm_head" not in [r.name for r in report.replaced] and "lm_head int8" in report.summary()
    assert "int8 (output layer)" in report.table()
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 0.1
    # opting out keeps it float (and tied)
    plain, _ = _tied_llama()
    memboost.quantize_model(plain, "nf4", lm_head=None, progress=False)
    assert type(plain.lm_head) is torch.nn.Linear and plain.lm_head.weight is plain.model.embed_tokens.weight
    with pytest.raises(memboost.MemboostError, match="'lm_head' must be 'int8'"):
        memboost.quantize_model(tiny_llama(), "nf4", lm_head="int4", progress=False)


def test_output_layer_follows_act_bits_and_survives_save_load(tmp_path):
    model, tokenizer = _tied_llama()
    memboost.quantize_model(model, "nf4", act_bits=8, progress=False)
    assert model.lm_head.act_bits == 8
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    memboost.save_quantized(model, tmp_path / "m", tokenizer=tokenizer)
    state = memboost.io.checkpoint.load_state(tmp_path / "m")
    assert "lm_head.weight.values" in state and "lm_head.weight" not in state  # the float embedding is stored once
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    loaded = memboost.load_quantized(tmp_path / "m")
    assert isinstance(loaded.lm_head, Int8Linear) and loaded.lm_head.act_bits == 8
    assert type(loaded.model.embed_tokens.weight) is torch.nn.Parameter
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_gguf_export_writes_the_int8_output_layer_as_q8_0_unchanged(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is in the hf extra")
    model, tokenizer = _tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    memboost.quantize_model(model, "nf4", progress=False)
    path = tmp_path / "m.gguf"
    memboost.export_gguf(model, path, "Q5_0", verbose=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = tensors["output.weight"]
    assert out.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = gguf_quants.pack_q8_0(*_state(model.lm_head.weight.tensor()))
    assert torch.equal(torch.from_numpy(out.data.copy()).reshape(want.shape), want)
    emb = tensors["token_embd.weight"]  # the float embedding at the output type, as when tied
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert torch.equal(torch.from_numpy(emb.data.copy()).reshape(64, -1), gguf_quants.quantize(embedding, "Q8_0"))


def test_quantize_in_row_slices_gives_the_same_bytes(monkeypatch):
    """int8.quantize works a slice of rows at a time (an 8B model's 128256 x 4096 output layer would otherwise
    need 2 GiB float32 copies): the same values and scales as one reference call, the last slice short."""
    from memboost import _slices
    from memboost.formats import int8 as int8_format

    w = llm_like_weight(100, 64, seed=3, dtype=torch.bfloat16)
    monkeypatch.setattr(_slices, "SLICE_ELEMENTS", 7 * 64)   # slices of 7 rows: 14 full ones and 2 rows
    q = int8_format.quantize(w)
    values, scales = reference.int8_quantize(w)
    assert torch.equal(q.tensors["values"], values) and torch.equal(q.tensors["scales"], scales)


def test_finite_check_in_slices_finds_a_late_nan(monkeypatch):
    """check_float_weight checks a slice at a time: a NaN in the last slice, or in a non-contiguous weight, is
    still found."""
    from memboost import _slices, errors

    monkeypatch.setattr(_slices, "SLICE_ELEMENTS", 100)
    w = torch.randn(33, 32)
    w[-1, -1] = float("nan")
    with pytest.raises(memboost.MemboostError, match="'w' contains NaN"):
        errors.check_float_weight(w)
    with pytest.raises(memboost.MemboostError, match="'w' contains NaN"):
        errors.check_float_weight(w.t())
    errors.check_float_weight(torch.randn(33, 32).t())
