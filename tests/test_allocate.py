"""memboost.output_sensitivity and memboost.allocate_ratio_4bit: 4-bit groups
placed per layer at a budget of bits per weight."""

import pytest
import torch
from torch import nn

import memboost
from memboost.model.plan import _group_costs

from conftest import tiny_llama

pytest.importorskip("transformers")


def _tiny_llama():
    # Wider than the other tests' tiny Llama: rows of several groups of 32.
    return tiny_llama(hidden_size=128, intermediate_size=256)


def _batches():
    return [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _reference_sensitivity(model, batches, name):
    """E[(dL/dy)^2] per output channel of one layer, by adding a zero tensor
    to its output and taking the loss's gradient with respect to it."""
    layer = model.get_submodule(name)
    total, tokens = 0.0, 0
    for batch in batches:
        delta = torch.zeros(*batch.shape, layer.out_features, requires_grad=True)
        handle = layer.register_forward_hook(lambda m, a, out: out + delta)
        try:
            loss = model(batch, labels=batch).loss * (batch.numel() - batch.shape[0])
            (g,) = torch.autograd.grad(loss, [delta])
        finally:
            handle.remove()
        total = total + g.reshape(-1, layer.out_features).square().sum(0)
        tokens += batch.numel() - batch.shape[0]
    return total / tokens


def test_output_sensitivity_is_the_mean_square_gradient_of_each_output():
    model = _tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # flags come back as they were
    got = memboost.output_sensitivity(model, _batches())
    assert "lm_head" not in got and len(got) == 14
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(got[name], _reference_sensitivity(model, _batches(), name), rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.model.layers[0].mlp.gate_proj.weight.requires_grad


def test_output_sensitivity_needs_a_loss():
    with pytest.raises(memboost.MemboostError, match="no scalar loss"):
        memboost.output_sensitivity(nn.Sequential(nn.Linear(8, 8)), [{"input": torch.randn(2, 8)}])
    with pytest.raises(memboost.MemboostTypeError, match="batches"):
        memboost.output_sensitivity(_tiny_llama(), torch.zeros(1, 4, dtype=torch.long))


def test_group_costs_fall_with_every_4bit_group_and_bits_rise():
    w = torch.randn(32, 256)
    costs, stored = _group_costs(w, torch.rand(256) + 0.1, torch.rand(32), 64, 0.002)
    assert len(costs) == len(stored) == 5
    assert all(a >= b for a, b in zip(costs, costs[1:])) and costs[-1] < 0.2 * costs[0]
    assert all(a < b for a, b in zip(stored, stored[1:]))
    # The ends are the quantizer's own: all-2-bit and all-4-bit storage.
    assert stored[0] == 8 * memboost.quantize(w, ratio_4bit=0.0).nbytes
    assert stored[-1] == 8 * memboost.quantize(w, ratio_4bit=1.0).nbytes


@pytest.mark.parametrize("bits", [3.5, 4.0])
def test_plan_meets_the_budget_and_costs_less_than_uniform(bits):
    model, batches = _tiny_llama(), _batches()
    stats = memboost.calibrate(model, batches)
    sens = memboost.output_sensitivity(model, batches)
    plan = memboost.allocate_ratio_4bit(model, batches, bits=bits, calibration=stats, sensitivity=sens,
                                        group_size=32)
    assert len(plan) == 14 and len(set(plan.values())) > 1  # layers differ
    report = memboost.quantize_model(model, "mixed", ratio_4bit=plan, group_size=32, calibration=stats,
                                     progress=False)
    assert bits - 0.15 < report.bits_per_weight <= bits
    for layer in report.replaced:
        assert layer.details["ratio_4bit"] == pytest.approx(plan[layer.name], abs=1e-6)

    # Against the same ratio everywhere at no fewer bits, by the estimate the plan minimises.
    fresh = _tiny_llama()
    linears = {n: m for n, m in fresh.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    table = {n: _group_costs(m.weight, stats[n], sens[n], 32, 0.002) for n, m in linears.items()}
    weights = sum(m.weight.numel() for m in linears.values())

    def total(choice):
        return (sum(table[n][0][i] for n, i in choice.items()),
                sum(table[n][1][i] for n, i in choice.items()) / weights)

    planned_cost, planned_bits = total({n: round(plan[n] * 4) for n in linears})
    uniform = [total({n: i for n in linears}) for i in range(5)]
    cost_at_budget = min(c for c, b in uniform if b <= bits)
    assert planned_bits <= bits and planned_cost < cost_at_budget


def test_plan_comes_back_from_a_saved_checkpoint(tmp_path):
    model, batches = _tiny_llama(), _batches()
    plan = memboost.allocate_ratio_4bit(model, batches, bits=3.5, group_size=32)
    memboost.quantize_model(model, "mixed", ratio_4bit=plan, group_size=32, progress=False)
    memboost.save_quantized(model, str(tmp_path / "m"))
    reloaded = memboost.load_quantized(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(reloaded(batches[0]).logits, model(batches[0]).logits)
    assert reloaded.model.layers[1].mlp.down_proj.weight.tensor().ratio_4bit == pytest.approx(
        plan["model.layers.1.mlp.down_proj"])


def test_bad_budgets_and_partial_plans_are_named():
    model, batches = _tiny_llama(), _batches()
    with pytest.raises(memboost.MemboostError, match="'bits'"):
        memboost.allocate_ratio_4bit(model, batches, bits=1.0, group_size=32)
    with pytest.raises(memboost.MemboostError, match="'bits'"):
        memboost.allocate_ratio_4bit(model, batches, bits=float("nan"))
    with pytest.raises(memboost.MemboostError, match="'ratio_4bit' is given per layer but has no value for layer"):
        memboost.quantize_model(model, "mixed", ratio_4bit={"model.layers.0.mlp.up_proj": 0.5}, group_size=32)
