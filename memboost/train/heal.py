"""Healing a quantized model: low-rank correctors distilled from the float model.

    report = memboost.heal(model, teacher, batches, rank=16, steps=200, lr=1e-3)

Every quantized linear of `model` (mixed, ternary, NF4; not the int8 output
layer) gets a corrector A @ B.T, part of its weight (QuantizedTensor's
`corrector_A` / `corrector_B`: counted in avg_bits, saved, reloaded, applied by
linear, linear_bound and the decode loop); a LoRT layer trains its own factors
A, B and its alpha instead. The codes never change. The correctors start at
the best rank-r fit of the layer's error W_teacher - W_quantized (truncated
SVD, LoftQ's start: healing with steps=0 is that closed form alone) and are
then trained, with the model's norm weights, to match the teacher (the float
model) on the batches, as RILQ does: KL divergence of the logits plus the
mean squared error of every layer's hidden state (each normalised by the
teacher's mean square), the teacher's outputs computed on the fly, one batch
at a time.

Gradients reach the input of every quantized product through
_FrozenCodesLinear: forward is the format's fused kernel, backward multiplies
by the dequantized weight (rebuilt in backward, never kept), which is the
reference path of every format (NF4's nf4_linear has its own autograd; the
mixed and ternary ops have none). The factors are trained in float32 through
their storage rounding (float16, or int8 with per-row scales: a
straight-through estimate), so the stored corrector is the trained one.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress_bar
from ..errors import MemboostError, MemboostTypeError
from ..formats.lort import LoRTQuantizedTensor
from ..formats.tensor import CORRECTOR_BITS, QuantizedTensor
from ..nn import QuantizedLinear

# Formats healed by a corrector (int8 is the output layer's near-lossless format: left as it is).
SKIPPED_FORMATS = ("int8",)


@dataclass
class HealReport:
    """What heal did: the layers given a corrector (or whose LoRT factors
    were trained), the loss at the start and the end, tokens seen, time."""

    layers: List[str] = field(default_factory=list)
    rank: int = 0
    bits: int = 16
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: List[float] = field(default_factory=list)
    bits_before: float = 0.0
    bits_after: float = 0.0

    def summary(self) -> str:
        loss = (f"; loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else "")
        return (f"memboost heal: {len(self.layers)} layers, rank {self.rank} ({self.bits}-bit factors), "
                f"{self.steps} steps on {self.tokens} tokens in {self.seconds:.1f} s{loss}; "
                f"{self.bits_before:.3f} -> {self.bits_after:.3f} bits per weight")


class _FrozenCodesLinear(torch.autograd.Function):
    """x @ W_codes.T with a gradient for x only: the format's kernel forward,
    the dequantized weight (rebuilt here, not saved) backward."""

    @staticmethod
    def forward(ctx, x, qtensor):
        ctx.qtensor = qtensor
        return qtensor.linear(x)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.qtensor.dequantize().to(grad.dtype)
        return grad @ w, None


def _fake_round(t: torch.Tensor, bits: int) -> torch.Tensor:
    """t as the corrector stores it (float16, or int8 with a scale per row),
    with a straight-through gradient."""
    if bits == 16:
        stored = t.clamp(-65504, 65504).half().float()
    else:
        scale = (t.detach().abs().amax(1, keepdim=True) / 127).clamp_min(2 ** -24).half().float()
        stored = (t / scale).round().clamp(-127, 127) * scale
    return t + (stored - t).detach()


class _HealingLinear(nn.Module):
    """A QuantizedLinear while it heals: frozen codes + trainable factors
    (and, for LoRT, its alpha)."""

    def __init__(self, layer: QuantizedLinear, a: torch.Tensor, b: torch.Tensor, bits: int):
        super().__init__()
        q = layer.weight.tensor().without_corrector()
        self.layer, self.bits = layer, bits
        self.lort = isinstance(q, LoRTQuantizedTensor)
        if self.lort:
            # the ternary part alone (rank 0, alpha 1): alpha and the factors are trained here
            t = q.tensors
            self.alpha = nn.Parameter(t["alpha"].float().clone())
            q = LoRTQuantizedTensor._wrap({"packed": t["packed"], "alpha": torch.ones_like(t["alpha"]),
                                           "A": t["A"][:, :0], "B": t["B"][:, :0]}, q.meta)
        self.codes = q
        self.A = nn.Parameter(a.float().clone())
        self.B = nn.Parameter(b.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        xc = x.to(dtype)
        y = _FrozenCodesLinear.apply(xc, self.codes.to(dtype) if self.codes.dtype != dtype else self.codes)
        if self.lort:
            alpha = self.alpha.to(dtype)
            y = y * (alpha.view(1, -1) if alpha.shape[0] > 1 else alpha.view(()))
            a, b = self.A.clamp(-65504, 65504), self.B.clamp(-65504, 65504)
            a, b = a + (a.half().float() - a).detach(), b + (b.half().float() - b).detach()
        else:
            a, b = _fake_round(self.A, self.bits), _fake_round(self.B, self.bits)
        y = y + (xc @ b.to(dtype)) @ a.to(dtype).T
        if self.layer.bias is not None:
            y = y + self.layer.bias.to(dtype)
        return y.to(x.dtype)

    def healed(self) -> QuantizedTensor:
        """The layer's weight with the trained factors, as it is stored."""
        q = self.layer.weight.tensor().without_corrector()
        if not self.lort:
            return q.with_corrector(self.A.detach(), self.B.detach(), self.bits)
        t = dict(q.tensors, alpha=self.alpha.detach().float().contiguous(),
                 A=self.A.detach().clamp(-65504, 65504).half(), B=self.B.detach().clamp(-65504, 65504).half())
        return LoRTQuantizedTensor(t, q.meta)


def _low_rank_start(error: torch.Tensor, rank: int):
    """(A, B) with A @ B.T the best rank-`rank` fit of `error` (each factor
    carrying the square root of the singular values)."""
    e = error.float()
    if min(e.shape) <= 2048:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        u, s, v = torch.svd_lowrank(e, q=min(rank + 16, min(e.shape)), niter=4)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    return u * root, v * root


def _vocab_size(model: nn.Module) -> Optional[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return int(getattr(head, "out_features", head.weight.shape[0]))
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _inputs(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return dict(batch)
    raise MemboostTypeError(f"each of 'batches' must be a token-id tensor [batch, seq] or a dict with "
                            f"'input_ids', got {type(batch).__name__}")


def _check(model, teacher, batches, rank, steps, lr, bits, hidden_weight) -> list:
    if not isinstance(model, nn.Module):
        raise MemboostTypeError(f"'model' must be an nn.Module, got {type(model).__name__}")
    if not isinstance(teacher, nn.Module):
        raise MemboostTypeError(f"'teacher' must be an nn.Module (the float model), got {type(teacher).__name__}")
    if teacher is model:
        raise MemboostError("'teacher' must be the float model, not the quantized model itself")
    if type(rank) is not int or rank <= 0:
        raise MemboostError(f"'rank' must be a positive int, got {rank!r}")
    if type(steps) is not int or steps < 0:
        raise MemboostError(f"'steps' must be an int >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise MemboostError(f"'lr' must be a positive number, got {lr!r}")
    if bits not in CORRECTOR_BITS:
        raise MemboostError(f"'bits' must be one of {CORRECTOR_BITS} (the corrector's storage), got {bits!r}")
    if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) or not hidden_weight >= 0:
        raise MemboostError(f"'hidden_weight' must be a number >= 0, got {hidden_weight!r}")
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)):
        raise MemboostTypeError(f"'batches' must be a list of batches (token-id tensors [batch, seq] or dicts of "
                                f"model inputs), got a single {type(batches).__name__}: wrap it in a list")
    try:
        batches = [_inputs(b) for b in batches]
    except TypeError:
        raise MemboostTypeError(f"'batches' must be an iterable of batches, got {type(batches).__name__}") from None
    if not batches:
        raise MemboostError("'batches' is empty: healing needs calibration text (token-id batches)")
    vs, vt = _vocab_size(model), _vocab_size(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise MemboostError(f"'teacher' has a vocabulary of {vt} tokens, the model {vs}: the teacher must be the "
                            "float model the quantized one was made from")
    return batches


def _targets(model: nn.Module, teacher: nn.Module, rank: int) -> Dict[str, QuantizedLinear]:
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, QuantizedLinear) and m.format not in SKIPPED_FORMATS}
    if not layers:
        raise MemboostError("'model' has no quantized linear layer to heal (quantize it with "
                            "memboost.quantize_model first)")
    for name, layer in layers.items():
        q = layer.weight.tensor()
        if isinstance(q, LoRTQuantizedTensor) and q.rank:
            continue  # its own factors are trained
        if rank > min(layer.in_features, layer.out_features):
            raise MemboostError(f"'rank' {rank} is larger than layer {name!r} allows "
                                f"(min(out, in) = {min(layer.in_features, layer.out_features)})")
    return layers


def _teacher_weight(teacher: nn.Module, name: str, shape) -> Optional[torch.Tensor]:
    try:
        m = teacher.get_submodule(name)
    except AttributeError:
        return None
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(shape) or not w.is_floating_point():
        return None
    return w.detach()


def _norms(model: nn.Module) -> List[nn.Parameter]:
    params = []
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            params += [p for p in m.parameters(recurse=False) if p.is_floating_point()]
    return params


def _quantized_bits(model: nn.Module) -> float:
    """Stored bits per weight of the layers heal works on (correctors included)."""
    nbytes = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m.format not in SKIPPED_FORMATS:
            q = m.weight.tensor()
            nbytes += q.nbytes
            weights += q.numel()
    return 8.0 * nbytes / weights if weights else 0.0


def distillation_loss(student_out, teacher_out, hidden_weight: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, per token, plus
    `hidden_weight` times the mean over layers of each hidden state's squared
    error divided by the teacher's mean square."""
    vocab = teacher_out.logits.shape[-1]
    log_s = F.log_softmax(student_out.logits.float().reshape(-1, vocab), -1)
    log_t = F.log_softmax(teacher_out.logits.float().reshape(-1, vocab), -1)
    loss = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    if hidden_weight and getattr(student_out, "hidden_states", None) is not None:
        pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))
        mse = sum(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12) for s, t in pairs)
        loss = loss + hidden_weight * mse / max(1, len(pairs))
    return loss


def kl_to_teacher(model: nn.Module, teacher: nn.Module, batches: Iterable) -> float:
    """Mean per-token KL(teacher || model) of the next-token distributions over `batches`."""
    total = tokens = 0.0
    with torch.inference_mode():
        for batch in batches:
            inputs = _inputs(batch)
            s, t = model(**inputs).logits.float(), teacher(**inputs).logits.float()
            vocab = t.shape[-1]
            total += float(F.kl_div(F.log_softmax(s.reshape(-1, vocab), -1), F.log_softmax(t.reshape(-1, vocab), -1),
                                    log_target=True, reduction="sum"))
            tokens += s.shape[0] * s.shape[1]
    return total / max(tokens, 1)


def heal(model: nn.Module, teacher: nn.Module, batches: Iterable, rank: int = 16, steps: int = 100,
         lr: float = 1e-3, *, bits: int = 16, hidden_weight: float = 1.0, train_norms: bool = True,
         progress: Optional[bool] = None) -> HealReport:
    """Heals a quantized `model` in place against `teacher` (the float model it
    was quantized from) on `batches` (token-id tensors [batch, seq], or dicts
    of model inputs; cycled through for `steps` optimizer steps).

    rank: the corrector's rank for every quantized layer (a LoRT layer trains
    its own factors, whatever its rank). bits: 16 stores A, B in float16, 8
    in int8 with a float16 scale per row (about half the bits). lr: AdamW's
    learning rate (cosine decay). hidden_weight: the weight of the hidden
    states' error beside the logits' KL. train_norms: the norm weights are
    trained too (float tensors the model stores anyway: no bits added).
    steps=0 only sets the correctors to the SVD of each layer's error; a layer
    healed before with the same rank goes on from its corrector.
    Returns a HealReport."""
    batches = _check(model, teacher, batches, rank, steps, lr, bits, hidden_weight)
    layers = _targets(model, teacher, rank)
    start = time.perf_counter()
    report = HealReport(rank=rank, bits=bits, bits_before=_quantized_bits(model))

    healing: Dict[str, _HealingLinear] = {}
    for name, layer in layers.items():
        q = layer.weight.tensor()
        if isinstance(q, LoRTQuantizedTensor) and q.rank:
            a, b = q.tensors["A"].float(), q.tensors["B"].float()
        elif q.corrector_rank == rank:  # healed before: go on from there
            a, b = q.corrector(torch.float32)
        else:
            w = _teacher_weight(teacher, name, q.shape)
            if w is not None:
                a, b = _low_rank_start(w.float() - q.without_corrector().dequantize().float(), rank)
            else:  # no float weight to start from: LoRA's start, the product at zero
                a = torch.zeros(q.shape[0], rank, device=q.device)
                b = torch.randn(q.shape[1], rank, device=q.device) / math.sqrt(q.shape[1])
        healing[name] = _HealingLinear(layer, a, b, bits)
        report.layers.append(name)

    def swap(mapping):
        for name, module in mapping.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    swap(healing)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for h in healing.values() for p in h.parameters(recurse=False)]
        if train_norms:
            params += _norms(model)
        for p in params:
            p.requires_grad_(True)
        teacher.eval()
        model.eval()  # no dropout: the student must see what the teacher sees
        if steps:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            warmup = max(1, min(10, steps // 10))
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
            bar = progress_bar(range(steps), "heal", unit="step", progress=progress)
            for step in bar:
                inputs = batches[step % len(batches)]
                with torch.no_grad():
                    target = teacher(**inputs, output_hidden_states=bool(hidden_weight))
                out = model(**inputs, output_hidden_states=bool(hidden_weight))
                loss = distillation_loss(out, target, hidden_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                report.losses.append(loss.item())
                report.tokens += int(inputs["input_ids"].numel())
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
            report.steps = steps
        with torch.no_grad():
            for name, h in healing.items():
                h.layer.weight._set(h.healed())
    finally:
        swap({name: h.layer for name, h in healing.items()})
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
    report.bits_after = _quantized_bits(model)
    report.seconds = time.perf_counter() - start
    return report
