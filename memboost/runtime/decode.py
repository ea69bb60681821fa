"""A lean greedy decode loop with a static KV cache, for the Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2 families of
transformers.

transformers' model classes stay the source of truth for the architecture:
the loop calls the model's own embedding, norms, MLPs, projections (memboost's
quantized layers included), rotary embedding and its modeling module's
apply_rotary_pos_emb, and reads every size from the model's config. What it
replaces is the per-token machinery around them (cache objects, mask
building, keyword plumbing, output dataclasses, the generation utilities):
the keys and values go into tensors allocated once per Decoder, the rotary
cos/sin for every position are computed once, and the attention reads views
of the cache up to the current length (the same shapes transformers' dynamic
cache gives, so batch-1 tokens equal eager `generate`).

Several prompts decode at once, left-padded: each row keeps its own positions,
and a key mask (allocated with the cache) hides the padding.

What differs between the families is said in one table, _LAYOUTS: which norms
a layer applies around its attention and MLP, and its q/k norms. Fused
q/k/v projections (Phi-3's qkv_proj), sliding-window layers, attention
logit soft-capping (Gemma 2), per-layer-type rotary tables (Gemma 3) and
the final logit soft-capping are read from the modules and the config.
"""

import dataclasses
import sys
import weakref
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import MemboostError, MemboostTypeError
from ..nn import QuantizedLinear


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a family's decoder layer normalizes (module names on the layer; None: no such norm):
    h += attn_out(attention(attn_in(h))); h += mlp_out(mlp(mlp_in(h))). qk_norm: the attention's
    q_norm/k_norm applied before the rotation, over each head ("head") or over the whole projection ("full")."""
    attn_in: Optional[str] = "input_layernorm"
    attn_out: Optional[str] = None
    mlp_in: Optional[str] = "post_attention_layernorm"
    mlp_out: Optional[str] = None
    qk_norm: Optional[str] = None


_PRE_NORM = _Layout()
_SANDWICH = _Layout(attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm",
                    mlp_out="post_feedforward_layernorm")
# model_type -> layout. Gemma's norms multiply by 1 + weight and its embedding scales by sqrt(hidden): both inside
# the modules; Phi-3's fused qkv_proj and gate_up_proj are found on the modules.
_LAYOUTS = {
    "llama": _PRE_NORM, "mistral": _PRE_NORM, "qwen2": _PRE_NORM, "gemma": _PRE_NORM, "phi3": _PRE_NORM,
    "qwen3": _Layout(qk_norm="head"),
    "gemma2": _SANDWICH,
    "gemma3_text": dataclasses.replace(_SANDWICH, qk_norm="head"),
    "olmo2": _Layout(attn_in=None, attn_out="post_attention_layernorm", mlp_in=None,
                     mlp_out="post_feedforward_layernorm", qk_norm="full"),
}
SUPPORTED_FAMILIES = tuple(_LAYOUTS)
# Families whose every layer attends through config.sliding_window (the others say it per layer on the attention).
_WINDOW_FROM_CONFIG = ("mistral", "phi3")
# RoPE types whose inverse frequencies do not depend on the sequence length, so a table computed once is exact.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass
class _LayerStep:
    """One decoder layer as the loop runs it: bound callables (None: not in this family) and its attention's
    constants."""
    attn_in: object
    project: object      # x -> (q, k, v), each [batch, q, heads * head_dim]
    q_norm: object
    k_norm: object
    o_proj: object
    attn_out: object
    mlp_in: object
    mlp: object
    mlp_out: object
    scaling: float
    softcap: Optional[float]  # attention logit soft-capping (Gemma 2)
    window: Optional[int]     # sliding window (keys at distance < window), None for full attention
    rope: str                 # key of the rotary table (the layer type where the model has one per type)


def _family(model) -> str:
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES or not hasattr(getattr(model, "model", None), "layers"):
        raise MemboostError(f"'model' must be a causal LM of the {', '.join(SUPPORTED_FAMILIES)} families "
                            f"(transformers' *ForCausalLM), got {type(model).__name__} "
                            f"(model_type {family!r}); use model.generate for it")
    return family


class Decoder:
    """Greedy decoding of `model` with a static KV cache for up to `max_batch`
    prompts of up to `max_length` tokens (prompt plus generated), allocated
    once here and reused by every `generate` call.

    The cache has the model's dtype (its embedding's) on its device."""

    def __init__(self, model, max_batch: int = 1, max_length: int = 512):
        self.family = _family(model)
        self.layout = _LAYOUTS[self.family]
        for name, value in (("max_batch", max_batch), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemboostError(f"'{name}' must be a positive int, got {value!r}")
        config = model.config
        inner = model.model
        if config.max_position_embeddings and max_length > config.max_position_embeddings:
            raise MemboostError(f"'max_length' ({max_length}) exceeds the model's max_position_embeddings "
                                f"({config.max_position_embeddings})")
        if getattr(config, "use_bidirectional_attention", False):
            raise MemboostError(f"the model's config (model_type {self.family!r}) sets use_bidirectional_attention, "
                                "which the decode loop does not implement; use model.generate for it")
        rotary = inner.rotary_emb
        rope_types = rotary.rope_type if isinstance(getattr(rotary, "rope_type", None), dict) else {
            "": getattr(rotary, "rope_type", "default")}
        for rope_type in rope_types.values():
            if rope_type not in _STATIC_ROPE_TYPES:
                raise MemboostError(f"the model's rope_type {rope_type!r} (model_type {self.family!r}) is not supported "
                                    f"by the decode loop (supported: {', '.join(_STATIC_ROPE_TYPES)}); "
                                    "use model.generate for it")
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

        # Weakly: the Decoder kept per model (generate's cache) must not keep its model alive.
        self._model = weakref.ref(model)
        self.max_batch, self.max_length = max_batch, max_length
        self._bind(model)
        # The modeling module's own rotation, so a change there is followed here.
        self._apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        embed = inner.embed_tokens
        device, dtype = embed.weight.device, embed.weight.dtype
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        kv_heads = config.num_key_value_heads
        shape = (max_batch, kv_heads, max_length, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.key_valid = torch.zeros(max_batch, max_length, dtype=torch.bool, device=device)
        # The rotary cos/sin of every position, [max_length, rotary dim]: one table, or one per layer type where
        # the model rotates each type with its own frequencies (Gemma 3).
        self.rope_tables = {}
        with torch.no_grad():
            positions = torch.arange(max_length, device=device).unsqueeze(0)
            for key in {step.rope for step in self._steps}:
                args = (key,) if key else ()
                cos, sin = rotary(torch.empty(0, dtype=dtype, device=device), positions, *args)
                self.rope_tables[key] = (cos[0], sin[0])
        self._group = config.num_attention_heads // kv_heads
        # Decode steps (one new token per row) through memboost's decode_attention op where it reproduces
        # the attention above (full attention within reach of every key, no soft-capping, the whole head
        # rotated); prompts always take the modules' path.
        plain = all(step.softcap is None and (step.window is None or step.window >= max_length)
                    and cos.shape[-1] == self.head_dim for step in self._steps
                    for cos, _ in [self.rope_tables[step.rope]])
        self.fused_attention = plain and self._fused_attention_matches()

    def _layer_modules(self, layer) -> dict:
        """The modules of one decoder layer the loop calls, by role (absent roles left out)."""
        attn, layout = layer.self_attn, self.layout
        found = {"o_proj": attn.o_proj, "mlp": layer.mlp}
        fused = getattr(attn, "qkv_proj", None)
        if isinstance(fused, nn.Module):
            found["qkv_proj"] = fused
        else:
            found.update(q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj)
        if layout.qk_norm:
            found.update(q_norm=attn.q_norm, k_norm=attn.k_norm)
        for role in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            name = getattr(layout, role)
            if name is not None:
                found[role] = getattr(layer, name)
        return found

    def _modules(self, model) -> list:
        """Every module the bound callables depend on."""
        inner = model.model
        modules = [inner.embed_tokens, inner.norm, model.lm_head]
        for layer in inner.layers[: model.config.num_hidden_layers]:
            modules += list(self._layer_modules(layer).values())
            mlp = layer.mlp
            modules += [getattr(mlp, name) for name in _GATED_MLP if isinstance(getattr(mlp, name, None), nn.Module)]
        return modules

    def _bind(self, model) -> None:
        """Per layer, the callables the loop runs: each module's forward itself (skipping nn.Module.__call__'s
        hook machinery, a good part of the per-token Python) unless it has hooks, and for memboost's
        quantized layers their op with the weight bound (QuantizedLinear.linear_bound)."""
        inner, config = model.model, model.config
        dtype = inner.embed_tokens.weight.dtype
        self.layers = list(inner.layers[: config.num_hidden_layers])
        layer_types = getattr(config, "layer_types", None)
        per_type_rope = isinstance(getattr(inner.rotary_emb, "rope_type", None), dict)
        self._steps = []
        for i, layer in enumerate(self.layers):
            attn, found = layer.self_attn, self._layer_modules(layer)

            def norm(role):
                return _norm_callable(found[role], dtype) if role in found else None

            if "qkv_proj" in found:
                q_size = config.num_attention_heads * attn.head_dim
                project = _split_projection(_linear_callable(found["qkv_proj"], dtype), q_size,
                                            config.num_key_value_heads * attn.head_dim)
            else:
                project = _separate_projections(*(_linear_callable(found[n], dtype) for n in ("q_proj", "k_proj",
                                                                                                "v_proj")))
            window = (getattr(config, "sliding_window", None) if self.family in _WINDOW_FROM_CONFIG
                      else getattr(attn, "sliding_window", None))
            self._steps.append(_LayerStep(
                attn_in=norm("attn_in"), project=project, q_norm=norm("q_norm"), k_norm=norm("k_norm"),
                o_proj=_linear_callable(attn.o_proj, dtype), attn_out=norm("attn_out"), mlp_in=norm("mlp_in"),
                mlp=_mlp_callable(layer.mlp, dtype), mlp_out=norm("mlp_out"), scaling=attn.scaling,
                softcap=getattr(attn, "attn_logit_softcapping", None), window=window,
                rope=layer_types[i] if per_type_rope else ""))
        self._embed, self._norm, self._lm_head = (_callable(inner.embed_tokens), _norm_callable(inner.norm, dtype),
                                                  _linear_callable(model.lm_head, dtype))
        self._bound = [_binding_key(m) for m in self._modules(model)]

    def _rebind_if_changed(self, model) -> None:
        """Binds the model's modules again if any was replaced (e.g. quantize_model after this was built),
        moved, or got hooks since."""
        if [_binding_key(m) for m in self._modules(model)] != self._bound:
            self._bind(model)

    @property
    def model(self):
        """The model this Decoder runs (None once it is gone)."""
        return self._model()

    def _fused_attention_matches(self) -> bool:
        """Whether memboost's decode_attention op reproduces this loop's attention step (the modeling module's
        apply_rotary_pos_emb, the cache writes, scaled_dot_product_attention) on a probe, within a few units in
        the last place of the cache dtype: the op computes in float32 and sums in another order."""
        cache, dtype = self.keys[0], self.keys[0].dtype
        kv_heads, dim = cache.shape[1], self.head_dim
        heads = kv_heads * self._group
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(shape, generator=g).to(cache.device, dtype)

        batch, length, start = 2, 6, 4
        q, k, v = rand(batch, 1, heads * dim), rand(batch, 1, kv_heads * dim), rand(batch, 1, kv_heads * dim)
        angles = torch.rand(batch, 1, dim // 2, generator=g).repeat(1, 1, 2) * 6
        cos, sin = angles.cos().to(cache.device, dtype), angles.sin().to(cache.device, dtype)
        keys, values = rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
        mask = torch.tensor([[True] * length, [False, True, True, True, True, True]], device=cache.device)
        scale = self._steps[0].scaling
        with torch.inference_mode():
            got = ops.decode_attention(q, k, v, cos, sin, keys.clone(), values.clone(), start, mask, scale)
            qs, ks = self._apply_rotary(q.view(batch, 1, heads, dim).transpose(1, 2),
                                        k.view(batch, 1, kv_heads, dim).transpose(1, 2), cos, sin)
            keys[:, :, start:start + 1], values[:, :, start:start + 1] = ks, v.view(batch, 1, kv_heads, dim).transpose(1, 2)
            want = F.scaled_dot_product_attention(qs, keys[:, :, :start + 1], values[:, :, :start + 1],
                                                  attn_mask=mask[:, None, None, :start + 1], scale=scale,
                                                  enable_gqa=True).transpose(1, 2).reshape(batch, 1, -1)
        tolerance = (16 if dtype == torch.float32 else 4) * torch.finfo(dtype).eps
        return bool(torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance * float(want.abs().max())))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(self._norm(h))
        if self.final_softcap is not None:  # as the model's forward: in the logits' dtype
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, start: int, padded: bool) -> torch.Tensor:
        """_forward for one new token per row through the fused decode_attention op: logits [batch, vocab]."""
        batch = ids.shape[0]
        tables = {key: (cos[positions], sin[positions]) for key, (cos, sin) in self.rope_tables.items()}
        mask = self.key_valid if padded else None
        attend = ops.decode_attention
        shape = (batch, 1, -1, self.head_dim)
        h = self._embed(ids)
        for step, key_cache, value_cache in zip(self._steps, self.keys, self.values):
            x = step.attn_in(h) if step.attn_in is not None else h
            q, k, v = step.project(x)
            if step.q_norm is not None:
                q, k = (_normed_heads(t, norm, self.layout.qk_norm, shape).reshape(batch, 1, -1)
                        for t, norm in ((q, step.q_norm), (k, step.k_norm)))
            cos, sin = tables[step.rope]
            a = step.o_proj(attend(q, k, v, cos, sin, key_cache, value_cache, start, mask, step.scaling))
            h = h + (step.attn_out(a) if step.attn_out is not None else a)
            m = step.mlp(step.mlp_in(h) if step.mlp_in is not None else h)
            h = h + (step.mlp_out(m) if step.mlp_out is not None else m)
        return self._logits(h[:, -1])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [batch, vocab] of the last position of `ids` [batch, q], its
        keys and values written to the cache at start..start+q. `mask`: which keys each query sees
        ([batch, 1, q, start+q], or None: causal); sliding-window layers add their window to it."""
        batch, q = ids.shape
        end = start + q
        tables = {key: (cos[positions], sin[positions]) for key, (cos, sin) in self.rope_tables.items()}
        causal = mask is None and q > 1
        windowed = {}  # window -> its mask, made when a layer's window can hide a key here
        shape = (batch, q, -1, self.head_dim)
        rotate, layout = self._apply_rotary, self.layout
        h = self._embed(ids)
        for step, key_cache, value_cache in zip(self._steps, self.keys, self.values):
            x = step.attn_in(h) if step.attn_in is not None else h
            q_flat, k_flat, v_flat = step.project(x)
            cos, sin = tables[step.rope]
            qs, ks = rotate(_normed_heads(q_flat, step.q_norm, layout.qk_norm, shape).transpose(1, 2),
                            _normed_heads(k_flat, step.k_norm, layout.qk_norm, shape).transpose(1, 2), cos, sin)
            key_cache[:batch, :, start:end] = ks
            value_cache[:batch, :, start:end] = v_flat.view(shape).transpose(1, 2)
            layer_mask, layer_causal = mask, causal
            if step.window is not None and end > step.window:
                if step.window not in windowed:
                    windowed[step.window] = _window_mask(mask, start, end, step.window, ids.device)
                layer_mask, layer_causal = windowed[step.window], False
            keys, values = key_cache[:batch, :, :end], value_cache[:batch, :, :end]
            if step.softcap is not None:
                out = _softcapped_attention(qs, keys, values, layer_mask, layer_causal, step.scaling, step.softcap)
            else:
                out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=layer_mask, is_causal=layer_causal,
                                                     scale=step.scaling, enable_gqa=True)
            a = step.o_proj(out.transpose(1, 2).reshape(batch, q, -1))
            h = h + (step.attn_out(a) if step.attn_out is not None else a)
            m = step.mlp(step.mlp_in(h) if step.mlp_in is not None else h)
            h = h + (step.mlp_out(m) if step.mlp_out is not None else m)
        return self._logits(h[:, -1])

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int = 32, eos_token_id=None,
                 pad_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy continuation of each prompt: LongTensor [batch, max_new_tokens].

        `prompts`: a LongTensor [batch, length] or [length] (with
        `attention_mask` of the same shape, its zeros mark padding, e.g. a
        tokenizer's padded output), or a list of 1-D token id sequences of any
        lengths (left-padded here). Rows that reach
        `eos_token_id` (an int or a list) continue with `pad_token_id` (default:
        the first eos id), as transformers' generate does; decoding stops when
        every row has ended."""
        rows = _as_rows(prompts, attention_mask)
        model = self.model
        if model is None:
            raise MemboostError("this Decoder's model is gone (the Decoder holds it weakly)")
        self._rebind_if_changed(model)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MemboostError(f"'max_new_tokens' must be a positive int, got {max_new_tokens!r}")
        batch = len(rows)
        if batch > self.max_batch:
            raise MemboostError(f"'prompts' holds {batch} prompts but this Decoder was allocated for "
                                f"max_batch={self.max_batch}")
        width = max(len(r) for r in rows)
        if width + max_new_tokens > self.max_length:
            raise MemboostError(f"the longest prompt ({width} tokens) plus 'max_new_tokens' ({max_new_tokens}) "
                                f"exceeds this Decoder's max_length={self.max_length}")
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        device = self.key_valid.device
        ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
        valid = self.key_valid[:batch]
        valid.zero_()
        for b, r in enumerate(rows):
            if len(r):
                ids[b, width - len(r):] = torch.as_tensor(r, dtype=torch.long, device=device)
            valid[b, width - len(r):width] = True
        padded = any(len(r) != width for r in rows)
        # Positions count real tokens only (transformers: cumsum of the attention mask - 1).
        positions = (valid[:, :width].long().cumsum(1) - 1).clamp_min(0)
        if padded:
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            mask = (causal & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
            mask = mask.unsqueeze(1)  # a padding query sees itself only: finite values, never read
        else:
            mask = None
        logits = self._forward(ids, positions, 0, mask)
        out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        next_pos = positions[:, -1:] + 1
        for t in range(max_new_tokens):
            token = logits.argmax(-1)
            if eos:
                token = torch.where(done, torch.full_like(token, pad), token)
                done |= torch.isin(token, torch.tensor(eos, device=device))
            out[:, t] = token
            if t + 1 == max_new_tokens or (eos and bool(done.all())):
                break
            cur = width + t
            valid[:, cur] = True
            if self.fused_attention:
                logits = self._step(token.unsqueeze(1), next_pos, cur, padded)
            else:
                step_mask = valid[:, None, None, :cur + 1] if padded else None
                logits = self._forward(token.unsqueeze(1), next_pos, cur, step_mask)
            next_pos = next_pos + 1
        return out


def _separate_projections(q_proj, k_proj, v_proj):
    def project(x):
        return q_proj(x), k_proj(x), v_proj(x)
    return project


def _split_projection(qkv_proj, q_size: int, kv_size: int):
    """x -> (q, k, v) from one fused projection whose rows are q's, then k's, then v's (Phi-3's qkv_proj)."""
    def project(x):
        qkv = qkv_proj(x)
        return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    return project


def _normed_heads(t: torch.Tensor, norm, mode: Optional[str], shape: tuple) -> torch.Tensor:
    """A q or k projection [batch, q, heads * head_dim] as [batch, q, heads, head_dim], through the layer's q/k
    norm if it has one: over each head (Qwen 3, Gemma 3) or over the whole projection (OLMo 2)."""
    if norm is None:
        return t.view(shape)
    return norm(t).view(shape) if mode == "full" else norm(t.view(shape))


def _window_mask(mask: Optional[torch.Tensor], start: int, end: int, window: int, device) -> torch.Tensor:
    """`mask` (None: causal) with the keys at distance `window` or more from their query hidden, as transformers'
    sliding-window masks do on cache positions: [batch or 1, 1, end - start, end]."""
    query = torch.arange(start, end, device=device)[:, None]
    key = torch.arange(end, device=device)[None, :]
    near = key > query - window
    if mask is None:
        return (near & (key <= query))[None, None]
    return mask & near


def _softcapped_attention(q, keys, values, mask, causal: bool, scaling: float, softcap: float) -> torch.Tensor:
    """Attention with soft-capped logits, softcap * tanh(logits / softcap), computed as transformers' eager
    attention does (Gemma 2; scaled_dot_product_attention has no soft-capping): [batch, heads, q, head_dim]."""
    group = q.shape[1] // keys.shape[1]
    if group > 1:
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    weights = torch.matmul(q, keys.transpose(2, 3)) * scaling
    weights = torch.tanh(weights / softcap) * softcap
    if causal:
        mask = torch.ones(q.shape[2], keys.shape[2], dtype=torch.bool, device=q.device).tril(keys.shape[2] - q.shape[2])
    if mask is not None:
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values)


def _binding_key(module) -> tuple:
    """What a bound callable depends on: the module, its hooks, and for a quantized layer the storage of its
    weight and bias (moved or replaced tensors must be bound again)."""
    key = (id(module), bool(module._forward_hooks or module._forward_pre_hooks), module.training)
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if isinstance(module, QuantizedLinear):
        tensors += list(module.weight.tensor().tensors.values())
    return key + tuple((t.data_ptr(), t.device, t.dtype) for t in tensors)


def _norm_callable(module, dtype: torch.dtype):
    """x -> module(x) through memboost's fused rms_norm op when the module is an RMSNorm it reproduces (the
    Llama family's rounding or Gemma's 1 + weight, told apart on a probe input; the op sums in another order,
    so agreement is within a few units in the last place of `dtype`), else _callable(module)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (_callable(module) is module or not isinstance(weight, torch.Tensor) or weight.dim() != 1
            or weight.dtype != dtype or not isinstance(eps, float) or dtype not in (torch.float32, torch.float16,
                                                                                     torch.bfloat16)):
        return _callable(module)
    probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)
    tolerance = (16 if dtype == torch.float32 else 2) * torch.finfo(dtype).eps  # as tests/test_rms_norm.py
    with torch.inference_mode():
        expected = module(probe)
        for offset in (False, True):
            got = ops.rms_norm(probe, weight, eps, offset)
            if got.dtype == expected.dtype and torch.allclose(got.float(), expected.float(), rtol=tolerance,
                                                             atol=tolerance * float(expected.abs().max())):
                return ops.rms_norm_bound(weight, eps, offset)
    return _callable(module)


def _linear_callable(module, dtype: torch.dtype):
    """x -> module(x) for inputs of `dtype` under inference mode: a quantized layer's bound op where it has
    no work of its own (QuantizedLinear.linear_bound), else as _callable."""
    from torch.nn.modules import module as torch_module

    if isinstance(module, QuantizedLinear) and not any(
            (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
             getattr(torch_module, "_global_forward_hooks_always_called", {}))):
        return module.linear_bound(dtype)
    return _callable(module)


# The gated MLP every supported family uses: down_proj(act_fn(gate_proj(x)) * up_proj(x)).
_GATED_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _mlp_callable(mlp, dtype: torch.dtype):
    """mlp's forward with its projections bound (_linear_callable) when it is the gated MLP and the bound
    version gives exactly what the module gives on a probe input; else _callable(mlp). The module stays the
    source of truth: a family whose MLP differs keeps its own forward."""
    if _callable(mlp) is mlp or not all(hasattr(mlp, name) for name in _GATED_MLP):
        return _callable(mlp)
    gate, up, down = (_linear_callable(getattr(mlp, name), dtype) for name in _GATED_MLP[:3])
    act = _callable(mlp.act_fn) if isinstance(mlp.act_fn, nn.Module) else mlp.act_fn

    def run(x: torch.Tensor) -> torch.Tensor:
        return down(act(gate(x)) * up(x))

    weight = next((p for p in mlp.parameters()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    hidden = mlp.gate_proj.in_features
    probe = torch.randn(2, 1, hidden, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    with torch.inference_mode():
        if not torch.equal(run(probe), mlp(probe)):
            return _callable(mlp)
    return run


def _callable(module):
    """module.forward where calling the module would only add nn.Module's hook handling, else the module."""
    from torch.nn.modules import module as torch_module

    hooks = (module._forward_hooks, module._forward_pre_hooks, torch_module._global_forward_hooks,
             torch_module._global_forward_pre_hooks, getattr(torch_module, "_global_forward_hooks_always_called", {}))
    return module if any(hooks) or module.training else module.forward


def _as_rows(prompts, attention_mask: Optional[torch.Tensor] = None) -> List[Sequence[int]]:
    if attention_mask is not None and (not isinstance(prompts, torch.Tensor) or not isinstance(
            attention_mask, torch.Tensor) or attention_mask.shape != prompts.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise MemboostError(f"'attention_mask' must be a tensor of the shape of 'prompts' (a tensor), got {got}")
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype not in (torch.int32, torch.int64) or prompts.dim() not in (1, 2):
            raise MemboostTypeError(f"'prompts' must be an integer tensor [length] or [batch, length], "
                                    f"got {prompts.dtype} of shape {tuple(prompts.shape)}")
        if attention_mask is not None:
            keep = attention_mask.bool().reshape(-1, prompts.shape[-1])
            rows = [r[k].tolist() for r, k in zip(prompts.reshape(-1, prompts.shape[-1]), keep)]
        else:
            rows = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        rows = [list(prompts)]
    elif isinstance(prompts, (list, tuple)) and prompts:
        rows = []
        for r in prompts:
            if isinstance(r, torch.Tensor):
                if r.dim() != 1:
                    raise MemboostTypeError(f"each prompt in 'prompts' must be 1-D, got shape {tuple(r.shape)}")
                r = r.tolist()
            if not isinstance(r, (list, tuple)) or not all(isinstance(t, int) for t in r):
                raise MemboostTypeError("'prompts' must hold token id sequences (lists of ints or 1-D tensors)")
            rows.append(r)
    else:
        raise MemboostTypeError(f"'prompts' must be a token id tensor or a non-empty list of token id "
                                f"sequences, got {type(prompts).__name__}")
    if any(len(r) == 0 for r in rows):
        raise MemboostError("'prompts' holds an empty prompt; every prompt needs at least one token")
    return rows


# One Decoder per model, grown when a call needs more room (weakly held: it goes with the model).
_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _round_up(n: int, step: int = 128) -> int:
    return -(-n // step) * step


def generate(model, prompts, max_new_tokens: int = 32, *, tokenizer=None, eos_token_id=None,
             attention_mask: Optional[torch.Tensor] = None, decoder: Optional[Decoder] = None):
    """Greedy generation through the decode loop (memboost.runtime.Decoder).

    `prompts`: a string or a list of strings (then `tokenizer` is needed and
    the completions come back as a string or a list of strings), or token ids
    as Decoder.generate takes them (then a LongTensor [batch, max_new_tokens]
    comes back; `attention_mask` marks padding in a [batch, length] tensor).
    `eos_token_id` defaults to the tokenizer's, else none: every row gets
    max_new_tokens tokens. Without `decoder`, one kept per model is
    reused and reallocated larger when a call needs more room."""
    texts = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                         and all(isinstance(p, str) for p in prompts))
    if texts:
        if tokenizer is None:
            raise MemboostError("'tokenizer' is needed when 'prompts' are strings")
        single = isinstance(prompts, str)
        rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in ([prompts] if single else prompts)]
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    else:
        rows = _as_rows(prompts, attention_mask)
    if decoder is None:
        width = max(len(r) for r in rows) + (max_new_tokens if isinstance(max_new_tokens, int) else 0)
        decoder = _decoders.get(model)
        if decoder is None or decoder.max_batch < len(rows) or decoder.max_length < width:
            limit = getattr(model.config, "max_position_embeddings", None) or width
            old = (decoder.max_batch, decoder.max_length) if decoder is not None else (1, 0)
            decoder = None  # freed before the larger one is allocated
            decoder = Decoder(model, max_batch=max(len(rows), old[0]),
                              max_length=min(max(_round_up(width), old[1]), max(limit, width)))
            _decoders[model] = decoder
    elif not isinstance(decoder, Decoder):
        raise MemboostTypeError(f"'decoder' must be a memboost.runtime.Decoder, got {type(decoder).__name__}")
    elif decoder.model is not model:
        raise MemboostError("'decoder' was built for another model")
    out = decoder.generate(rows, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None) if texts else None)
    if not texts:
        return out
    completions = [tokenizer.decode(until_eos(r, eos_token_id), skip_special_tokens=True) for r in out.tolist()]
    return completions[0] if single else completions


def until_eos(tokens: List[int], eos_token_id) -> List[int]:
    """The tokens up to and including the first eos."""
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens
