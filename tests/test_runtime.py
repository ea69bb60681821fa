"""memboost.runtime: the static-cache decode loop gives transformers' eager
greedy tokens, for every format and family, one prompt or many at once."""

import pytest
import torch

import memboost
from memboost.runtime import Decoder

from conftest import FAMILIES, tiny_causal_lm, tiny_llama_with_tokenizer

VOCAB = 64
# Every format on every family, the quantizer arguments sized for 64-wide layers.
FORMATS = {
    "float": None,
    "mixed": dict(ratio_4bit=0.5, group_size=32),
    "mixed-act8": dict(ratio_4bit=0.5, group_size=32, act_bits=8),
    "nf4": dict(block_size=64),
    "ternary": dict(),
    "lort": dict(rank=8, iters=2),
}


def tiny_model(family: str, seed: int = 0):
    """A tiny random model of `family` (conftest.tiny_causal_lm, seeded) that generates exactly max_new_tokens."""
    model = tiny_causal_lm(family, vocab_size=VOCAB, seed=seed)
    model.generation_config.eos_token_id = None  # no end of sequence: exactly max_new_tokens from generate
    if family == "qwen2":  # its q/k/v biases start at zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def quantized(family: str, fmt: str):
    model = tiny_model(family)
    params = FORMATS[fmt]
    if params is not None:
        method = fmt.split("-")[0]
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        report = memboost.quantize_model(model, method, progress=False, **params)
        assert len(report.replaced) == linears - 1, report.summary()  # all but lm_head (int8, reported apart)
    return model


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def eager(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' eager greedy generate, one prompt, new_tokens tokens (the models here have no eos)."""
    with torch.inference_mode():
        out = model.generate(ids.unsqueeze(0), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == len(ids) + new_tokens
    return out[0, len(ids):]


# Every format on the first four families; on the others (whose differences are in the attention and norms, not
# in the quantized projections the formats change) float and NF4, and a quantized batch below.
FAMILY_FORMATS = [(family, fmt) for family in FAMILIES for fmt in FORMATS
                  if family in ("llama", "mistral", "qwen2", "gemma") or fmt in ("float", "nf4")]


@pytest.mark.parametrize("family,fmt", FAMILY_FORMATS)
def test_tokens_equal_eager_generate(family, fmt):
    model = quantized(family, fmt)
    decoder = Decoder(model, max_batch=1, max_length=96)
    for seed, length in ((1, 7), (2, 12)):
        ids = prompt(length, seed)
        ref = eager(model, ids, 64)
        out = decoder.generate(ids, max_new_tokens=64)
        assert out.shape == (1, 64)
        assert torch.equal(out[0], ref), (family, fmt, seed)


@pytest.mark.parametrize("batch", [8, 16])
@pytest.mark.parametrize("family,fmt", [("llama", "mixed"), ("qwen2", "float"), ("gemma", "nf4"), ("gemma2", "float"),
                                        ("gemma3", "ternary")])
def test_batch_equals_eager_per_prompt(family, fmt, batch):
    model = quantized(family, fmt)
    decoder = Decoder(model, max_batch=16, max_length=64)
    prompts = [prompt(1 + (5 * i) % 13, 100 + i) for i in range(batch)]  # lengths 1..13, left-padded
    out = decoder.generate(prompts, max_new_tokens=24)
    assert out.shape == (batch, 24)
    for i, ids in enumerate(prompts):
        assert torch.equal(out[i], eager(model, ids, 24)), (family, fmt, i, len(ids))


def _prompt_logits(model, decoder, ids):
    """The decode loop's logits of the last prompt position (its prompt pass) and transformers' forward's."""
    with torch.inference_mode():
        got = decoder._forward(ids[None], torch.arange(len(ids))[None], 0, None)
        want = model(ids[None]).logits[:, -1].float()
    return got, want


@pytest.mark.parametrize("family,setting,changed", [
    ("gemma2", {"attn_logit_softcapping": 0.5}, "attention soft-capping"),
    ("gemma2", {"final_logit_softcapping": 0.5}, "final soft-capping"),
    ("gemma2", {"sliding_window": 4}, "sliding window"),
    ("gemma3", {"sliding_window": 4}, "sliding window"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, "sliding window"),
    ("mistral", {"sliding_window": 4}, "sliding window"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial rotary"),
])
def test_family_details_follow_the_model(family, setting, changed):
    """Each family detail the loop implements gives transformers' logits where it changes them: q/k weights
    scaled up so that the attention logits are large enough for soft-capping to bite, prompts longer than the
    window."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "lm_head.weight")):
                p.mul_(40)
    plain = tiny_causal_lm(family, vocab_size=VOCAB).eval()
    plain.load_state_dict(model.state_dict())
    detailed = tiny_causal_lm(family, vocab_size=VOCAB, **setting).eval()
    detailed.load_state_dict(model.state_dict())
    ids = prompt(20, 41)
    got, want = _prompt_logits(detailed, Decoder(detailed, max_length=32), ids)
    _, without = _prompt_logits(plain, Decoder(plain, max_length=32), ids)
    assert (want - without).abs().max() > 100 * (got - want).abs().max(), f"{changed} does not matter here"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    out = Decoder(detailed, max_length=64).generate(ids, max_new_tokens=24)[0]
    detailed.generation_config.eos_token_id = None
    assert torch.equal(out, eager(detailed, ids, 24)), changed


# Phi-3's long-context rope: its frequencies depend on the sequence length, which the loop's one table cannot follow.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64}


def test_cli_speed_falls_back_to_transformers_generate_where_the_loop_refuses():
    from memboost.cli import generation_speed
    from memboost.runtime import until_eos

    _, tokenizer = tiny_llama_with_tokenizer()
    phi3 = tiny_causal_lm("phi3", vocab_size=VOCAB, rope_parameters=LONGROPE)
    text, speed = generation_speed(phi3, tokenizer, "It was the best of", 8)
    inputs = tokenizer("It was the best of", return_tensors="pt")
    with torch.inference_mode():
        ref = phi3.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert text == tokenizer.decode(until_eos(new, tokenizer.eos_token_id), skip_special_tokens=True) and speed > 0


def test_unsupported_settings_are_refused_by_name():
    gemma3 = tiny_causal_lm("gemma3", vocab_size=VOCAB, use_bidirectional_attention=True)
    with pytest.raises(memboost.MemboostError, match="'gemma3_text'.*use_bidirectional_attention.*model.generate"):
        Decoder(gemma3, max_length=32)
    phi3 = tiny_causal_lm("phi3", vocab_size=VOCAB, rope_parameters=LONGROPE)
    with pytest.raises(memboost.MemboostError, match="rope_type 'longrope' \\(model_type 'phi3'\\)"):
        Decoder(phi3, max_length=32)


def test_static_cache_reused_across_prompt_lengths():
    model = quantized("llama", "mixed")
    decoder = Decoder(model, max_batch=2, max_length=48)
    pointers = [t.data_ptr() for t in decoder.keys + decoder.values]
    # long, short, long again, then a batch: stale keys of a longer earlier prompt must never be attended
    for ids in (prompt(20, 5), prompt(3, 6), prompt(20, 7)):
        assert torch.equal(decoder.generate(ids, max_new_tokens=28)[0], eager(model, ids, 28))
    pair = [prompt(4, 8), prompt(11, 9)]
    out = decoder.generate(pair, max_new_tokens=20)
    for i, ids in enumerate(pair):
        assert torch.equal(out[i], eager(model, ids, 20))
    assert decoder.generate(prompt(3, 6), max_new_tokens=28).tolist() == [eager(model, prompt(3, 6), 28).tolist()]
    assert [t.data_ptr() for t in decoder.keys + decoder.values] == pointers


def test_generate_strings_with_eos_like_transformers():
    model, tokenizer = tiny_llama_with_tokenizer()
    memboost.quantize_model(model, "mixed", ratio_4bit=0.5, group_size=32, progress=False)
    texts = ["It was the best of", "the age of wisdom, it was the age of foolishness", "times"]
    completions = memboost.generate(model, texts, max_new_tokens=20, tokenizer=tokenizer)
    for text, completion in zip(texts, completions):
        inputs = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            ref = model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert completion == tokenizer.decode(ref, skip_special_tokens=True)
    assert memboost.generate(model, texts[0], max_new_tokens=20, tokenizer=tokenizer) == completions[0]
    # ids in, ids out; the decoder kept for the model grows when a call needs more room
    ids = tokenizer(texts[1])["input_ids"]
    out = memboost.generate(model, [ids] * 3, max_new_tokens=100)
    assert out.shape == (3, 100)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=100, min_new_tokens=100, do_sample=False)
    assert torch.equal(out[0], ref[0, len(ids):]) and torch.equal(out[0], out[2])


def test_errors_name_the_argument():
    model = quantized("llama", "float")
    decoder = Decoder(model, max_batch=2, max_length=32)
    with pytest.raises(memboost.MemboostError, match="max_length=32"):
        decoder.generate(prompt(30, 1), max_new_tokens=8)
    with pytest.raises(memboost.MemboostError, match="'prompts' holds 3 prompts.*max_batch=2"):
        decoder.generate([prompt(3, 1)] * 3, max_new_tokens=4)
    with pytest.raises(memboost.MemboostError, match="'max_new_tokens'"):
        decoder.generate(prompt(3, 1), max_new_tokens=0)
    with pytest.raises(memboost.MemboostError, match="'prompts' holds an empty prompt"):
        decoder.generate([[]], max_new_tokens=4)
    with pytest.raises(memboost.MemboostTypeError, match="'prompts'"):
        decoder.generate(torch.zeros(1, 3), max_new_tokens=4)
    with pytest.raises(memboost.MemboostError, match="'max_length'.*max_position_embeddings"):
        Decoder(model, max_length=1000)
    with pytest.raises(memboost.MemboostError, match="'max_batch'"):
        Decoder(model, max_batch=0)
    with pytest.raises(memboost.MemboostError, match="'tokenizer'"):
        memboost.generate(model, "a prompt")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).eval()
    with pytest.raises(memboost.MemboostError, match="'model' must be a causal LM of the llama"):
        Decoder(gpt2)


def test_cli_generate_decodes_the_prompts_together(tmp_path, capsys):
    from memboost import cli

    model, tokenizer = tiny_llama_with_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = ["It was the best of", "the age of wisdom, it was", "times"]
    threads = torch.get_num_threads()
    try:
        argv = ["generate", str(tmp_path), "--new-tokens", "12", "--threads", "1"]
        assert cli.main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    expected = memboost.generate(model, prompts, max_new_tokens=12, tokenizer=tokenizer)
    assert printed == [f"{p!r} -> {c!r}" for p, c in zip(prompts, expected)]
    assert cli.main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_padded_tensor_with_attention_mask_and_the_kept_decoder_lets_the_model_go():
    import gc
    import weakref

    from memboost.runtime import decode

    model = quantized("mistral", "ternary")
    rows = [prompt(4, 21), prompt(9, 22)]
    padded = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding with token 0, which is also a real token id
        padded[i, 9 - len(r):], mask[i, 9 - len(r):] = r, 1
    out = memboost.generate(model, padded, max_new_tokens=16, attention_mask=mask)
    assert torch.equal(out, memboost.generate(model, rows, max_new_tokens=16))
    assert torch.equal(out[0], eager(model, rows[0], 16)) and torch.equal(out[1], eager(model, rows[1], 16))
    with pytest.raises(memboost.MemboostError, match="'attention_mask'"):
        memboost.generate(model, padded, max_new_tokens=4, attention_mask=mask[:, 1:])
    gone = weakref.ref(model)
    assert len(decode._decoders) >= 1
    del model
    gc.collect()
    assert gone() is None  # the Decoder kept for it (its KV cache) did not keep it alive


def test_decoder_follows_layers_replaced_after_it_was_built():
    model = tiny_model("llama")
    decoder = Decoder(model, max_length=40)
    ids = prompt(6, 31)
    float_tokens = decoder.generate(ids, max_new_tokens=24)[0]
    assert torch.equal(float_tokens, eager(model, ids, 24))
    memboost.quantize_model(model, "ternary", progress=False)  # replaces the projections in place
    quantized_tokens = decoder.generate(ids, max_new_tokens=24)[0]
    assert torch.equal(quantized_tokens, eager(model, ids, 24))
    assert not torch.equal(quantized_tokens, float_tokens)


@pytest.mark.parametrize("fmt", ["mixed", "mixed-act8", "nf4", "ternary", "lort"])
def test_bound_linear_equals_the_layer(fmt):
    """QuantizedLinear.linear_bound (the decode loop's call: the op with the weight bound) gives exactly
    what the layer gives, with and without bias, at batch 1 and 3."""
    from memboost.nn import QuantizedLinear

    model = quantized("qwen2", fmt)  # qwen2: q/k/v carry biases
    attn = model.model.layers[0].self_attn
    for layer in (attn.q_proj, attn.o_proj, model.lm_head):  # lm_head: the int8 output layer
        assert isinstance(layer, QuantizedLinear)
        assert not layer.training  # quantize_model keeps the replaced layer's mode (the model is in eval())
        bound = layer.linear_bound(torch.float32)
        assert bound is not layer
        for shape in ((1, 1, 64), (3, 2, 64)):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
            with torch.inference_mode():
                assert torch.equal(bound(x), layer(x))


def test_bound_linear_keeps_the_layer_where_it_has_work_of_its_own():
    from memboost.nn import QuantizedLinear

    model = quantized("llama", "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    layer.compute_dtype = torch.float32
    assert layer.linear_bound(torch.bfloat16) is layer  # bfloat16 x is cast to the layer's compute dtype
    layer.compute_dtype = None
    handle = layer.register_forward_hook(lambda *args: None)
    assert layer.linear_bound(torch.float32) is layer
    handle.remove()
    assert layer.linear_bound(torch.float32) is not layer


def _ternary_weight(rows: int = 24, cols: int = 128):
    from memboost.formats import ternary

    return ternary.quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(5)))


def test_bound_op_calls_the_op_through_the_dispatcher():
    """memboost._C.bind_op (what every linear_bound returns): the op's result, bit for bit, in and out of
    inference mode; the bound tensors kept alive by the binding; autograd and the profiler still see the op."""
    from memboost import _native, ops

    q = _ternary_weight()
    args = (q.tensors["packed"], q.tensors["scales"], torch.randn(24), 128, q.group_size, 0)
    bound = ops.ternary_linear_bound(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    assert isinstance(bound, _native.C.BoundOp) and "memboost::ternary_linear" in repr(bound)
    assert bound.name == "memboost::ternary_linear" and bound.args[3:] == (128, q.group_size, 0)
    x = torch.randn(3, 128)
    want = ops.ternary_linear(x, *args)
    import gc
    gc.collect()  # the clones' only references are the binding's
    with torch.inference_mode():
        assert torch.equal(bound(x), want)
    assert torch.equal(bound(x), want)
    x_bound, x_op = x.clone().requires_grad_(), x.clone().requires_grad_()
    bound(x_bound).square().sum().backward()  # through the op's autograd kernel, as ops.ternary_linear
    ops.ternary_linear(x_op, *args).square().sum().backward()
    assert torch.equal(x_bound.grad, x_op.grad)
    with torch.profiler.profile() as prof, torch.inference_mode():
        bound(x)
    assert any(e.name == "memboost::ternary_linear" for e in prof.events())


def test_bound_op_refuses_bad_arguments_by_name():
    from memboost import _native, ops

    q = _ternary_weight()
    packed, scales = q.tensors["packed"], q.tensors["scales"]
    bind = _native.C.bind_op
    with pytest.raises(ValueError, match="no operator named 'memboost::no_such_op'"):
        bind("memboost::no_such_op", ())
    with pytest.raises(ValueError, match="does not take a tensor and the 2 arguments given"):
        bind("memboost::ternary_linear", (packed, scales))
    with pytest.raises(TypeError, match="argument 'cols' must be int, got float"):
        bind("memboost::ternary_linear", (packed, scales, None, 128.0, q.group_size, 0))
    with pytest.raises(TypeError, match="argument 'scales' must be Tensor, got str"):
        bind("memboost::ternary_linear", (packed, "scales", None, 128, q.group_size, 0))
    with pytest.raises(TypeError, match="argument 'weight_offset' must be bool, got int"):
        bind("memboost::rms_norm", (torch.ones(128), 1e-6, 1))
    with pytest.raises(TypeError, match="argument 'eps' must be float, got str"):
        bind("memboost::rms_norm", (torch.ones(128), "1e-6", False))
    with pytest.raises(ValueError, match="'inner' must be a bound op or None"):
        bind("memboost::low_rank_linear", (torch.zeros(24, 2), torch.zeros(128, 2)), lambda x: x)
    bound = ops.ternary_linear_bound(packed, scales, None, 128, q.group_size, 0)
    for call in (lambda: bound(), lambda: bound(torch.zeros(1, 128), torch.zeros(1, 128)),
                 lambda: bound(x=torch.zeros(1, 128)), lambda: bound([0.0] * 128)):
        with pytest.raises(TypeError, match="a bound memboost::ternary_linear takes one tensor 'x'"):
            call()
    with pytest.raises(ValueError, match="memboost: "):  # the kernel's own check, as a ValueError
        bound(torch.zeros(1, 64))


def test_decoder_rebinds_a_moved_weight():
    """A bound call holds the weight's tensors: when they are replaced (as .to() does) the next generate binds
    the new ones."""
    from memboost.nn import TernaryLinear

    model = quantized("llama", "ternary")
    decoder = Decoder(model, max_length=32)
    ids = prompt(5, 3)
    before = decoder.generate(ids, max_new_tokens=8)[0]
    model._apply(lambda t: t.clone())  # new storage for every tensor, as a device move gives
    with torch.no_grad():  # then new values in the new storage only: a stale binding would miss them
        for module in model.modules():
            if isinstance(module, TernaryLinear):
                module.weight._buffers["scales"].view(torch.float32).mul_(25)
    after = decoder.generate(ids, max_new_tokens=8)[0]
    assert torch.equal(after, eager(model, ids, 8))
    assert not torch.equal(after, before)
