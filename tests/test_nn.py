import io
import os

import pytest
import torch
from torch import nn

import memboost
from memboost.nn import MixedLinear

from conftest import rel_err


def _linear(device, dtype, bias=True, in_f=256, out_f=96):
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_linear_on_dequantized_weight(device, dtype, bias):
    lin = _linear(device, dtype, bias)
    layer = MixedLinear.from_linear(lin, ratio_4bit=0.25)
    x = torch.randn(4, 7, 256, device=device, dtype=dtype)
    w_hat = layer.weight.dequantize()
    want = nn.functional.linear(x.float(), w_hat.float(), None if lin.bias is None else lin.bias.float())
    y = layer(x)
    assert y.shape == (4, 7, 96) and y.dtype == dtype
    assert rel_err(y, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    # and the quantized layer approximates the original one
    assert rel_err(y, lin(x)) < 0.4


def test_state_dict_save_load(device, tmp_path):
    lin = _linear(device, torch.float16)
    layer = MixedLinear.from_linear(lin, ratio_4bit=0.1)
    sd = layer.state_dict()
    assert set(sd) >= {"weight.plane2", "weight.format_info", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = MixedLinear(256, 96, dtype=torch.float16, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 256, device=device, dtype=torch.float16)
    assert torch.equal(fresh(x), layer(x))

    from safetensors.torch import load_file, save_file
    path = os.path.join(tmp_path, "layer.safetensors")
    save_file(sd, path)
    fresh2 = MixedLinear(256, 96, dtype=torch.float16, device=device)
    fresh2.load_state_dict(load_file(path))
    assert fresh2.weight.device.type == device
    assert torch.equal(fresh2(x), layer(x))


def test_load_errors_are_named():
    layer = MixedLinear.from_linear(_linear("cpu", torch.float32), ratio_4bit=0.1)
    sd = layer.state_dict()
    wrong = MixedLinear(128, 96, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="does not fit a layer of shape"):
        wrong.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.extra"):
        MixedLinear(256, 96).load_state_dict({**sd, "weight.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="weight.mask"):
        MixedLinear(256, 96).load_state_dict({k: v for k, v in sd.items() if k != "weight.mask"})


def test_extra_repr_and_to(device):
    layer = MixedLinear.from_linear(_linear("cpu", torch.float32), ratio_4bit=0.1).to(device)
    text = repr(layer)
    assert "avg_bits=" in text and "in_features=256" in text
    assert f"ratio_4bit={round(layer.weight.tensor().ratio_4bit, 4)}" in text
    assert layer.weight.device.type == device and layer.weight.shape == (96, 256)
    assert layer(torch.randn(2, 256, device=device)).device.type == device


def test_gradient_flows_to_input(device):
    layer = MixedLinear.from_linear(_linear(device, torch.float32), ratio_4bit=0.25)
    x = torch.randn(5, 256, device=device, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.weight.dequantize()
    y = x.detach() @ w.T + layer.bias
    torch.testing.assert_close(x.grad, (2 * y) @ w, rtol=1e-4, atol=1e-4)


def test_from_linear_rejects_non_linear():
    with pytest.raises(memboost.MemboostTypeError, match="'linear' must be an nn.Linear"):
        MixedLinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("cast", ["half", "float", "double", "bfloat16", "to_bf16"])
def test_model_casts_leave_the_packed_weight_alone(device, cast):
    # model.half()/.float()/.double()/.to(dtype) cast floating tensors only:
    # the packed buffers (scales, outlier values included) must keep their bits.
    model = nn.Sequential(MixedLinear.from_linear(_linear("cpu", torch.float32), ratio_4bit=0.25,
                                                  outlier_fraction=0.01), nn.ReLU()).to(device)
    layer = model[0]
    before = {k: v.clone() for k, v in layer.weight.tensor().tensors.items()}
    x = torch.randn(3, 256, device=device)
    y_float = model(x)
    dtype = {"half": torch.float16, "float": torch.float32, "double": torch.float64, "bfloat16": torch.bfloat16,
             "to_bf16": torch.bfloat16}[cast]
    if cast == "to_bf16":
        model.to(torch.bfloat16)
    else:
        getattr(model, cast)()
    after = layer.weight.tensor().tensors
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    assert layer.weight.tensor().dtype == torch.float32  # what dequantize returns is the original dtype
    y = model(x.to(dtype))
    assert y.dtype == dtype and layer.bias.dtype == dtype
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    assert rel_err(y, y_float) < tol
    # the state_dict still holds the format's own dtypes, and loads into a fresh layer
    sd = layer.state_dict()
    assert sd["weight.row_scale"].dtype == torch.float32 and sd["weight.outlier_vals"].dtype == torch.float16
    fresh = MixedLinear(256, 96, dtype=torch.float32, device=device)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight.tensor().tensors["row_scale"], before["row_scale"])


def test_compute_dtype_casts_input_and_output_back(device):
    lin = _linear(device, torch.float32)
    layer = MixedLinear.from_quantized(memboost.quantize(lin.weight.detach(), ratio_4bit=0.25), lin.bias,
                                       compute_dtype=torch.bfloat16)
    x = torch.randn(2, 256, device=device)
    y = layer(x)
    want = nn.functional.linear(x.to(torch.bfloat16).float(), layer.weight.dequantize().float(),
                                lin.bias.to(torch.bfloat16).float())
    assert y.dtype == torch.float32 and rel_err(y, want) < 1e-2
    with pytest.raises(TypeError, match="'compute_dtype' must be torch.float16"):
        MixedLinear.from_quantized(layer.weight.tensor(), compute_dtype=torch.int8)


def test_repr_states_each_layer_once_and_briefly():
    model = nn.Sequential(*[MixedLinear.from_linear(_linear("cpu", torch.float32), ratio_4bit=0.25)
                            for _ in range(3)])
    text = repr(model)
    assert text.count("avg_bits=") == 3 and text.count("ratio_4bit=") == 3
    assert max(len(line) for line in text.splitlines()) < 200


def _every_format_layer():
    from memboost.nn import QuantizedLinear

    torch.manual_seed(0)
    return [pytest.param(name, id=name) for name in sorted(QuantizedLinear._layers)]


@pytest.mark.parametrize("fmt", _every_format_layer())
def test_no_graph_break_inside_quantized_layers(fmt):
    # The ops have fake kernels, so dynamo traces a quantized model in one graph.
    from memboost.nn import QuantizedLinear

    torch.manual_seed(0)
    cls = QuantizedLinear.for_format(fmt)
    model = nn.Sequential(cls.from_linear(nn.Linear(256, 128)), nn.ReLU(), cls.from_linear(nn.Linear(128, 64)))
    explanation = torch._dynamo.explain(model)(torch.randn(3, 256))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("fmt", _every_format_layer())
def test_torch_compile_fullgraph_equals_eager(fmt):
    from memboost.nn import QuantizedLinear

    torch.manual_seed(0)
    cls = QuantizedLinear.for_format(fmt)
    model = nn.Sequential(cls.from_linear(nn.Linear(256, 128)), nn.ReLU(), cls.from_linear(nn.Linear(128, 64)))
    x = torch.randn(3, 256)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", _every_format_layer())
def test_forward_sees_replaced_weight_buffers(fmt):
    # forward keeps the QuantizedTensor view of the buffers between calls: a
    # weight loaded with load_state_dict, or written into _buffers directly
    # (as accelerate's loaders do), must be what the next call uses.
    from memboost.nn import QuantizedLinear

    cls = QuantizedLinear.for_format(fmt)
    torch.manual_seed(0)
    a, b, c = (cls.from_linear(nn.Linear(256, 128)) for _ in range(3))
    x = torch.randn(3, 256)
    ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() > 1e-3
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), yb, rtol=0, atol=0)
    c(x)
    for name, t in b.weight._buffers.items():
        c.weight._buffers[name] = t
    c.bias = b.bias
    torch.testing.assert_close(c(x), yb, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", _every_format_layer())
@pytest.mark.parametrize("act_bits", [None, 8])
def test_call_without_grad_equals_call_with_grad(fmt, act_bits):
    # Without a gradient to track, the ops are called below the autograd
    # layer (its Python kernel costs more than a small layer's product):
    # the same values, no graph; with one, the graph as before.
    from memboost.nn import QuantizedLinear

    cls = QuantizedLinear.for_format(fmt)
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(256, 128), act_bits=act_bits)
    x = torch.randn(3, 256)
    with torch.no_grad():
        y_no_grad = layer(x)
    with torch.inference_mode():
        y_inference = layer(x)
    y_plain = layer(x)
    xg = x.clone().requires_grad_()
    y_grad = layer(xg)
    assert y_no_grad.grad_fn is None and y_plain.grad_fn is None and y_grad.grad_fn is not None
    for y in (y_inference, y_plain, y_grad):
        torch.testing.assert_close(y.detach(), y_no_grad, rtol=0, atol=0)
    y_grad.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape and xg.grad.abs().sum() > 0


def _every_format_weight(w):
    from memboost import lort, nf4, ternary
    from memboost.formats import mixed
    return {"mixed": mixed.quantize(w), "nf4": nf4.quantize(w), "ternary": ternary.quantize(w),
            "lort": lort.decompose(w, rank=4, iters=1)[0]}


def test_every_format_names_x_and_in_features_for_a_wrong_input():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for fmt, q in _every_format_weight(w).items():
        with pytest.raises(memboost.MemboostError, match=r"^'x' must have last dimension in_features=128, got "
                                                         r"shape \[4, 500\]$"):
            q.linear(torch.randn(4, 500))
        layer = memboost.nn.QuantizedLinear.for_format(fmt).from_quantized(q)
        with pytest.raises(memboost.MemboostError, match=r"'x' must have last dimension in_features=128"):
            layer(torch.randn(2, 3, 500))


def test_formats_compute_float64_in_float32_and_return_float64():
    """One behaviour for a float64 input: q.linear and the layers compute in
    float32 and return float64 (bitsandbytes' Linear4bit casts to its compute
    dtype and back the same way)."""
    g = torch.Generator().manual_seed(1)
    w, x, bias = torch.randn(64, 128, generator=g), torch.randn(3, 128, generator=g), torch.randn(64, generator=g)
    for fmt, q in _every_format_weight(w).items():
        expected = q.linear(x, bias)
        y = q.linear(x.double(), bias.double())
        assert y.dtype == torch.float64 and torch.equal(y, expected.double()), fmt
        layer = memboost.nn.QuantizedLinear.for_format(fmt).from_quantized(q, bias)
        y = layer(x.double())
        assert y.dtype == torch.float64 and torch.equal(y, expected.double()), fmt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_half_inputs_compute_in_float32_and_round_the_result_once(dtype, act_bits):
    """A bf16 or fp16 x is widened to float32 and the float32 result rounded
    to x's dtype once, exactly as x.float() and .to(dtype) would (the CPU ops
    convert in their own loops, not through ATen), for a contiguous x of any
    rank and for a strided one."""
    from memboost.formats import int8

    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(64, 128, generator=g), torch.randn(2, 3, 128, generator=g).to(dtype)
    weights = _every_format_weight(w)
    weights["int8"] = int8.quantize(w)
    for fmt, q in weights.items():
        for xi in (x, x[0], x.transpose(0, 1)):
            want = q.linear(xi.float(), act_bits=act_bits).to(dtype)
            y = q.linear(xi, act_bits=act_bits)
            assert y.dtype == dtype and y.shape == want.shape and torch.equal(y, want), (fmt, xi.shape)
