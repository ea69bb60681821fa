"""A lean greedy decode loop with a static KV cache, for the Llama, Mistral,
Qwen2 and Gemma families of transformers.

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
"""

import functools
import sys
import weakref
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import MemboostError, MemboostTypeError
from ..nn import QuantizedLinear

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
# RoPE types whose inverse frequencies do not depend on the sequence length, so a table computed once is exact.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
        for name, value in (("max_batch", max_batch), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemboostError(f"'{name}' must be a positive int, got {value!r}")
        config = model.config
        inner = model.model
        if config.max_position_embeddings and max_length > config.max_position_embeddings:
            raise MemboostError(f"'max_length' ({max_length}) exceeds the model's max_position_embeddings "
                                f"({config.max_position_embeddings})")
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if window is not None and (self.family == "mistral" or any(t != "full_attention" for t in layer_types)):
            if max_length > window:
                raise MemboostError(f"'max_length' ({max_length}) exceeds the model's sliding_window ({window}); "
                                    "sliding-window attention is not implemented in the decode loop")
        rope_type = getattr(inner.rotary_emb, "rope_type", "default")
        if rope_type not in _STATIC_ROPE_TYPES:
            raise MemboostError(f"the model's rope_type {rope_type!r} is not supported by the decode loop "
                                f"(supported: {', '.join(_STATIC_ROPE_TYPES)})")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, name, None) is not None:
                raise MemboostError(f"the model's config sets {name}, which the decode loop does not implement")

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
        with torch.no_grad():
            positions = torch.arange(max_length, device=device).unsqueeze(0)
            cos, sin = inner.rotary_emb(torch.empty(0, dtype=dtype, device=device), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_length, head_dim]
        self._group = config.num_attention_heads // kv_heads
        # Decode steps (one new token per row) through memboost's decode_attention op where it reproduces
        # the attention above; prompts always take the modules' path.
        self.fused_attention = self._fused_attention_matches()

    @staticmethod
    def _modules(model) -> list:
        """Every module the bound callables depend on."""
        inner = model.model
        modules = [inner.embed_tokens, inner.norm, model.lm_head]
        for layer in inner.layers[: model.config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            modules += [layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                        layer.post_attention_layernorm, mlp]
            modules += [getattr(mlp, name) for name in _GATED_MLP if isinstance(getattr(mlp, name, None), nn.Module)]
        return modules

    def _bind(self, model) -> None:
        """Per layer, the callables the loop runs: each module's forward itself (skipping nn.Module.__call__'s
        hook machinery, a good part of the per-token Python) unless it has hooks, and for memboost's
        quantized layers their op with the weight bound (QuantizedLinear.linear_bound)."""
        inner = model.model
        dtype = inner.embed_tokens.weight.dtype
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        self._steps = []
        for layer in self.layers:
            attn = layer.self_attn
            self._steps.append((_norm_callable(layer.input_layernorm, dtype),
                                *(_linear_callable(m, dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                                        attn.o_proj)),
                                _norm_callable(layer.post_attention_layernorm, dtype), _mlp_callable(layer.mlp, dtype),
                                attn.scaling))
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
        scale = self._steps[0][-1]
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

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, start: int, padded: bool) -> torch.Tensor:
        """_forward for one new token per row through the fused decode_attention op: logits [batch, vocab]."""
        batch = ids.shape[0]
        cos, sin = self.cos[positions], self.sin[positions]
        mask = self.key_valid if padded else None
        attend = ops.decode_attention
        h = self._embed(ids)
        for (norm1, q_proj, k_proj, v_proj, o_proj, norm2, mlp, scaling), key_cache, value_cache in zip(
                self._steps, self.keys, self.values):
            x = norm1(h)
            h = h + o_proj(attend(q_proj(x), k_proj(x), v_proj(x), cos, sin, key_cache, value_cache, start, mask,
                                  scaling))
            h = h + mlp(norm2(h))
        return self._lm_head(self._norm(h[:, -1])).float()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [batch, vocab] of the last position of `ids` [batch, q], its
        keys and values written to the cache at start..start+q."""
        batch, q = ids.shape
        end = start + q
        cos, sin = self.cos[positions], self.sin[positions]
        causal = mask is None and q > 1
        shape = (batch, q, -1, self.head_dim)
        rotate, sdpa = self._apply_rotary, F.scaled_dot_product_attention
        h = self._embed(ids)
        for (norm1, q_proj, k_proj, v_proj, o_proj, norm2, mlp, scaling), key_cache, value_cache in zip(
                self._steps, self.keys, self.values):
            x = norm1(h)
            qs, ks = rotate(q_proj(x).view(shape).transpose(1, 2), k_proj(x).view(shape).transpose(1, 2), cos, sin)
            key_cache[:batch, :, start:end] = ks
            value_cache[:batch, :, start:end] = v_proj(x).view(shape).transpose(1, 2)
            out = sdpa(qs, key_cache[:batch, :, :end], value_cache[:batch, :, :end], attn_mask=mask,
                       is_causal=causal, scale=scaling, enable_gqa=True)
            h = h + o_proj(out.transpose(1, 2).reshape(batch, q, -1))
            h = h + mlp(norm2(h))
        return self._lm_head(self._norm(h[:, -1])).float()

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
                return functools.partial(ops.rms_norm, weight=weight, eps=eps, weight_offset=offset)
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
