import io
import os

import pytest
import torch
from torch import nn

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
    assert f"ratio_4bit={layer.weight.tensor().ratio_4bit:.3f}" in text
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
    with pytest.raises(TypeError, match="'linear' must be an nn.Linear"):
        MixedLinear.from_linear(nn.Conv1d(3, 3, 1))
