"""memboost.heal: low-rank correctors distilled from the float model, on tiny
random models: the KL to the teacher falls on held-out batches, the codes stay,
and a healed model is the same model in every path (save and reload, the
decode loop, torch.compile, the command line)."""

import copy

import pytest
import torch
from torch import nn

import memboost
from memboost import cli
from memboost.formats.tensor import CORRECTOR_NAMES
from memboost.nn import QuantizedLinear
from memboost.runtime import Decoder
from memboost.train.heal import kl_to_teacher

from conftest import TINY_TEXT as TEXT, tiny_llama, tiny_llama_with_tokenizer

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

FORMATS = {
    "mixed": dict(ratio_4bit=0.0, group_size=32),
    "ternary": dict(),
    "nf4": dict(block_size=64),
    "lort": dict(rank=4, iters=2),
}


def batches(seed: int, count: int, batch: int = 2, length: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, length), generator=g) for _ in range(count)]


def quantized(fmt: str, teacher=None):
    teacher = tiny_llama() if teacher is None else teacher
    model = copy.deepcopy(teacher)
    memboost.quantize_model(model, fmt, progress=False, **FORMATS[fmt])
    return teacher, model


def codes(model):
    """Every quantized layer's code tensors (what healing must not touch)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            q = m.weight.tensor()
            for key in q.tensor_names:
                if not (q.format == "lort" and key in ("A", "B", "alpha")):  # LoRT's factors are trained
                    out[f"{name}.{key}"] = q.tensors[key].clone()
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=() if f == "mixed" else pytest.mark.slow) for f in FORMATS])
def test_healing_lowers_the_kl_on_held_out_batches_and_keeps_the_codes(fmt):
    teacher, model = quantized(fmt)
    train, held_out = batches(1, 4), batches(2, 2)
    before_codes, before_kl = codes(model), kl_to_teacher(model, teacher, held_out)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    report = memboost.heal(model, teacher, train, rank=4, steps=12, lr=3e-3, progress=False)
    after_kl = kl_to_teacher(model, teacher, held_out)
    assert after_kl < 0.85 * before_kl, (before_kl, after_kl)
    after_codes = codes(model)
    assert after_codes.keys() == before_codes.keys()
    assert all(torch.equal(after_codes[k], v) for k, v in before_codes.items())
    assert report.steps == 12 and report.tokens == 12 * 2 * 32 and len(report.losses) == 12
    assert len(report.layers) == 14 and "lm_head" not in report.layers  # the int8 output layer is left alone
    if fmt == "lort":  # its own factors: no bits added
        assert report.bits_after == report.bits_before
    else:  # rank 4 in float16 on 64x64 .. 64x128 layers, counted
        assert report.bits_after > report.bits_before + 1.0
        layer = model.model.layers[0].mlp.down_proj.weight.tensor()
        assert layer.corrector_rank == 4 and layer.corrector_bits == 16
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags  # restored as they were


def test_zero_steps_is_the_svd_start_and_int8_factors_cost_fewer_bits():
    teacher, model = quantized("mixed")
    held_out = batches(2, 2)
    before = kl_to_teacher(model, teacher, held_out)
    r16 = memboost.heal(copy.deepcopy(model), teacher, batches(1, 1), rank=8, steps=0, bits=16, progress=False)
    healed8 = copy.deepcopy(model)
    r8 = memboost.heal(healed8, teacher, batches(1, 1), rank=8, steps=0, bits=8, progress=False)
    assert r16.steps == 0 and r16.tokens == 0
    assert r8.bits_before < r8.bits_after < r16.bits_after
    assert kl_to_teacher(healed8, teacher, held_out) < before
    q = healed8.model.layers[1].self_attn.o_proj.weight.tensor()
    assert q.corrector_bits == 8 and q.tensors["corrector_A"].dtype == torch.int8


@pytest.mark.parametrize("fmt", ["mixed", "lort"])
def test_a_healed_model_reloads_with_identical_logits(fmt, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, model = quantized(fmt)
    memboost.heal(model, teacher, batches(1, 2), rank=4, steps=2, progress=False)
    ids = batches(3, 1)[0]
    want = logits(model, ids)
    memboost.save_quantized(model, tmp_path / "healed", max_shard_size="30KB", dtype=None)
    assert torch.equal(logits(memboost.load_quantized(tmp_path / "healed"), ids), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval(), ids), want)
    fresh = tiny_llama()  # the state_dict path: plain linears become the saved format's layers, correctors included
    memboost.save_safetensors(model.state_dict(), str(tmp_path / "model.safetensors"))
    memboost.load_quantized_(fresh, memboost.load_safetensors(str(tmp_path / "model.safetensors")))
    assert torch.equal(logits(fresh.eval(), ids), want)


def test_decode_loop_tokens_equal_eager_generate_on_a_healed_model():
    teacher, model = quantized("mixed")
    model.generation_config.eos_token_id = None
    memboost.heal(model, teacher, batches(1, 2), rank=4, steps=2, progress=False)
    ids = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model.generate(ids[None], attention_mask=torch.ones(1, 9, dtype=torch.long), max_new_tokens=24,
                             do_sample=False)[0, 9:]
    out = Decoder(model, max_batch=1, max_length=48).generate(ids, max_new_tokens=24)[0]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("fmt", ["mixed", "ternary", "nf4", "lort"])
def test_the_corrector_is_part_of_the_weight_in_every_path(fmt, bits):
    torch.manual_seed(0)
    layer = QuantizedLinear.for_format(fmt).from_linear(nn.Linear(256, 64), **(
        dict(rank=4) if fmt == "lort" else dict(group_size=32) if fmt == "mixed" else {}))
    q = layer.weight.tensor()
    a, b = torch.randn(64, 6) * 0.1, torch.randn(256, 6) * 0.1
    healed = q.with_corrector(a, b, bits)
    qa, qb = healed.corrector()
    assert (qa @ qb.T - a @ b.T).abs().max() < (2e-3 if bits == 8 else 1e-4)
    x = torch.randn(5, 256)
    want = x @ q.dequantize().float().T + (x @ qb) @ qa.T
    torch.testing.assert_close(healed.linear(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ healed.dequantize().float().T, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(healed.linear_bound()(x), want, rtol=1e-5, atol=1e-5)
    # counted: rank 6 on 64x256, float16 (or int8 with a float16 scale per row)
    extra = 6 * (64 + 256) * (2 if bits == 16 else 1) + (0 if bits == 16 else 2 * (64 + 256))
    assert healed.nbytes - q.nbytes == extra
    again = memboost.QuantizedTensor.from_state_dict(healed.state_dict())
    assert torch.equal(again.linear(x), healed.linear(x)) and again.corrector_bits == bits
    assert healed.without_corrector().corrector_rank == 0
    # the layer: forward and the decode loop's binding
    layer.weight._set(healed)
    torch.testing.assert_close(layer(x), want + layer.bias, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer.linear_bound(torch.float32)(x), want + layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_of_a_healed_layer_equals_eager():
    torch.manual_seed(0)
    layer = QuantizedLinear.for_format("mixed").from_linear(nn.Linear(256, 64), group_size=32)
    layer.weight._set(layer.weight.tensor().with_corrector(torch.randn(64, 4), torch.randn(256, 4)))
    x = torch.randn(3, 256)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_corrector_tensors_are_refused_by_name():
    q = memboost.quantize(torch.randn(64, 128), group_size=32)
    healed = q.with_corrector(torch.randn(64, 2), torch.randn(128, 2))
    state = healed.state_dict()
    with pytest.raises(memboost.MemboostError, match="corrector_A"):
        memboost.QuantizedTensor.from_state_dict({k: v for k, v in state.items() if k != "corrector_A"})
    with pytest.raises(memboost.MemboostError, match=r"corrector factors must be A \[64, r\]"):
        memboost.QuantizedTensor.from_state_dict(dict(state, corrector_B=torch.zeros(100, 2, dtype=torch.float16)))
    with pytest.raises(memboost.MemboostError, match="corrector_A_scale"):
        memboost.QuantizedTensor.from_state_dict(dict(state, corrector_A=state["corrector_A"].to(torch.int8),
                                                      corrector_B=state["corrector_B"].to(torch.int8)))
    with pytest.raises(memboost.MemboostError, match="'bits'"):
        q.with_corrector(torch.randn(64, 2), torch.randn(128, 2), bits=4)


def test_bad_arguments_name_the_argument():
    teacher, model = quantized("mixed")
    train = batches(1, 1)
    for kwargs, match in [(dict(rank=0), "'rank'"), (dict(rank=65), "'rank' 65 is larger than layer"),
                          (dict(steps=-1), "'steps'"), (dict(lr=0.0), "'lr'"), (dict(bits=4), "'bits'"),
                          (dict(hidden_weight=-1.0), "'hidden_weight'")]:
        with pytest.raises(memboost.MemboostError, match=match):
            memboost.heal(model, teacher, train, progress=False, **kwargs)
    with pytest.raises(memboost.MemboostError, match="'batches' is empty"):
        memboost.heal(model, teacher, [], progress=False)
    with pytest.raises(memboost.MemboostTypeError, match="'batches'"):
        memboost.heal(model, teacher, train[0], progress=False)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(memboost.MemboostError, match="'teacher' has a vocabulary of 80 tokens"):
        memboost.heal(model, other, train, progress=False)
    with pytest.raises(memboost.MemboostError, match="no quantized linear layer"):
        memboost.heal(tiny_llama(), teacher, train, progress=False)
    assert codes(model).keys() and all(  # nothing was changed by the refused calls
        m.weight.tensor().corrector_rank == 0 for m in model.modules() if isinstance(m, QuantizedLinear))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model, tokenizer = tiny_llama_with_tokenizer()
    root = tmp_path_factory.mktemp("heal")
    model.save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    (root / "text.txt").write_text(TEXT)
    assert cli.main(["quantize", str(root / "float"), str(root / "q"), "--ratio-4bit", "0", "--group-size", "32",
                     "--quiet"]) == 0
    return root


def test_cli_heal_writes_a_healed_folder(folders, tmp_path, capsys):
    out = tmp_path / "healed"
    text = str(folders / "text.txt")
    capsys.readouterr()
    assert cli.main(["heal", str(folders / "q"), str(out), "--teacher", str(folders / "float"), "--calibrate", text,
                     "--calib-tokens", "256", "--calib-window", "32", "--steps", "3", "--rank", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "memboost heal: 14 layers, rank 4" in printed and "3 steps" in printed
    healed = memboost.load_quantized(out)
    assert healed.model.layers[0].self_attn.q_proj.weight.tensor().corrector_rank == 4
    assert cli.main(["info", str(out)]) == 0
    assert "corrector_rank=4" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--steps", "-1"], "'steps'"), (["--rank", "0"], "'rank'"), ([], "--calibrate TEXT is required")])
def test_cli_heal_errors_are_one_line(folders, tmp_path, capsys, argv, match):
    text = ["--calibrate", str(folders / "text.txt"), "--calib-tokens", "128", "--calib-window", "32"]
    if match.startswith("--calibrate"):
        text = []
    assert cli.main(["heal", str(folders / "q"), str(tmp_path / "o"), "--teacher", str(folders / "float"),
                     "--quiet"] + text + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert cli.main(["heal", str(folders / "float"), str(tmp_path / "o"), "--calibrate", "fortunes"]) == 2
    assert "not a folder saved by memboost" in capsys.readouterr().err


def test_lort_compress_heal(tmp_path, capsys):
    from lort import compress
    from lort.fileformat import load

    model, tokenizer = tiny_llama_with_tokenizer(tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "text.txt").write_text(TEXT)
    out = str(tmp_path / "tiny.lort")
    argv = ["-m", str(tmp_path / "float"), "-o", out, "--min-dim", "32", "--rank", "4", "--iters", "2", "--quiet"]
    assert compress.main(argv) == 0
    before = load(out)
    assert compress.main(argv + ["--heal", "3", "--heal-text", str(tmp_path / "text.txt"),
                                 "--heal-tokens", "256"]) == 0
    assert "healed: 3 steps" in capsys.readouterr().out
    after = load(out)
    assert after.meta["info"]["heal"]["steps"] == 3
    for name, q in before.layers.items():
        assert torch.equal(after.layers[name].tensors["packed"], q.tensors["packed"])  # the trits stay
    assert any(not torch.equal(after.layers[n].tensors["A"], q.tensors["A"]) for n, q in before.layers.items())


def test_correctors_as_a_llama_cpp_lora_adapter(tmp_path):
    """The base exported without its correctors (ternary trits copied into TQ2_0) plus the correctors as a
    llama.cpp LoRA adapter: llama.cpp with lora_path computes the healed model."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf", reason="the hf extra (gguf) is not installed")
    llama_cpp = pytest.importorskip("llama_cpp", reason="the test extra (llama-cpp-python) is not installed")
    from memboost.io.gguf import export_gguf, export_lora_adapter, gguf_state_dict

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    teacher = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model = copy.deepcopy(teacher)
    memboost.quantize_model(model, "ternary", progress=False)
    memboost.heal(model, teacher, [torch.randint(0, 400, (1, 16))], rank=8, steps=0, progress=False)
    with pytest.raises(memboost.MemboostError, match="no low-rank corrector"):
        export_lora_adapter(teacher, tmp_path / "none.gguf")

    base, adapter = tmp_path / "base.gguf", tmp_path / "heal-lora.gguf"
    report = export_gguf(model, base, "TQ2_0", verbose=False, correctors="adapter")
    assert next(r for r in report.rows if r.name == "blk.0.ffn_down.weight").note.startswith("same trits")
    assert export_lora_adapter(model, adapter) == 14
    fields = gguf.GGUFReader(str(adapter)).fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"

    # PyTorch on what the files hold: the base's weights, each plus its corrector
    exported = transformers.LlamaForCausalLM(config).eval()
    exported.load_state_dict(gguf_state_dict(base, model), strict=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantizedLinear) and m.weight.tensor().corrector_rank:
                a, b = m.weight.tensor().corrector()
                exported.get_submodule(name).weight += a @ b.T
    ids = [5, 17, 42, 99, 3, 250, 7, 11]
    with torch.no_grad():
        want = exported(torch.tensor([ids])).logits[0].numpy()

    def llama_cpp_logits(**kwargs):
        llm = llama_cpp.Llama(model_path=str(base), logits_all=True, n_ctx=64, n_threads=2, verbose=False, **kwargs)
        try:
            llm.eval(ids)
            return np.array(llm.scores[:len(ids)])
        finally:
            llm.close()

    def rel(got):
        return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2)))

    with_adapter, without = rel(llama_cpp_logits(lora_path=str(adapter))), rel(llama_cpp_logits())
    assert with_adapter < 7e-2 and with_adapter < without / 3, (with_adapter, without)
