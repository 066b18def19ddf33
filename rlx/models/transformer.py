"""Decoder-only transformer covering Llama-3 / Qwen2 / Qwen2.5 checkpoints.

Pre-norm blocks: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)); final RMSNorm.
Attention is grouped-query with rotary embeddings and optional q/k/v bias.

Parameter paths (stable; sharding rules and checkpoint conversion are written against
them), for the policy ``CausalLM``:
  trunk/embed/embedding [V, D]
  trunk/layers/{i}/input_norm/scale [D]
  trunk/layers/{i}/attn/{q,k,v}_proj/kernel [D, H·Dh | K·Dh]   (+ /bias when qkv_bias)
  trunk/layers/{i}/attn/o_proj/kernel [H·Dh, D]
  trunk/layers/{i}/post_attn_norm/scale [D]
  trunk/layers/{i}/mlp/{gate,up}_proj/kernel [D, F]; .../mlp/down_proj/kernel [F, D]
  trunk/final_norm/scale [D]
  lm_head/kernel [D, V]                                  (untied embeddings only)
Value and reward models share the ``trunk/`` paths and add ``head/{kernel,bias}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlx.models import attention as attn_lib
from rlx.models import cache as cache_lib
from rlx.models.cache import KVCache
from rlx.models.config import ModelConfig
from rlx.models.rope import apply_rope, inverse_frequencies

_INIT = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, normalised in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return xf.astype(self.dtype) * self.scale.value.astype(self.dtype)


def _linear(din, dout, *, bias, cfg, rngs):
    return nnx.Linear(din, dout, use_bias=bias, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_INIT,
                      bias_init=nnx.initializers.zeros, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, dh = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(d, cfg.num_heads * dh, bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = _linear(d, cfg.num_kv_heads * dh, bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v_proj = _linear(d, cfg.num_kv_heads * dh, bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o_proj = _linear(cfg.num_heads * dh, d, bias=False, cfg=cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x, positions, context, layer: int, cache: KVCache | None):
        """x [B,S,D] -> ([B,S,D], layer ``layer``'s updated (k, v) slots or None).

        With a cache, the S new keys/values are written at slots
        [context["slot"], + S) of the layer's buffers (keys [B, K, Dh, C], values
        [B, K, C, Dh]; in place when the cache holds one buffer per layer, see
        ``rlx.models.cache``) and returned in the form the cache stores them in.
        """
        cfg = self.cfg
        b, s, _ = x.shape
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if cache is None:
            out = _dense_attention(cfg, q, k, v, context)
            return self.o_proj(out.reshape(b, s, cfg.num_heads * cfg.head_dim)), None
        slot = context["slot"]
        ck, cv = cache.layer(layer)                   # [B, K, Dh, C], [B, K, C, Dh]
        ck = jax.lax.dynamic_update_slice(
            ck, cache_lib.keys_from_slots(k).astype(ck.dtype), (0, 0, 0, slot))
        cv = jax.lax.dynamic_update_slice(
            cv, cache_lib.values_from_slots(v).astype(cv.dtype), (0, 0, slot, 0))
        prefix = cache.prefix_layer(layer)            # [P, K, Dh, Cp], [P, K, Cp, Dh]
        keys, values = ck.astype(q.dtype), cv.astype(q.dtype)
        if context.get("from_slot_0") and prefix is None:
            # Written at slot 0 (a prefill): causality leaves exactly the S new keys
            # visible, so attend to them as computed, not to the transposed buffer.
            out = attn_lib.attend(q, k, v, context["allowed"][:, :, :s])
        elif s == 1 and cfg.decode_page_size == 0:
            out = attn_lib.attend_one_query(q, keys, values, context["allowed"], prefix)
        else:                                         # slot-major [., C, K, Dh] paths
            keys = cache_lib.keys_to_slots(keys)
            values = cache_lib.values_to_slots(values)
            if prefix is not None:
                prefix = (cache_lib.keys_to_slots(prefix[0]),
                          cache_lib.values_to_slots(prefix[1]), prefix[2])
            if s == 1:
                # LServe page selection for a decode step (prefill stays dense);
                # imported lazily like the kernel backends (pulls in Pallas).
                from rlx.models import paged_attention
                out = paged_attention.decode_attend(
                    q, keys, values, context["allowed"], prefix=prefix,
                    page_size=cfg.decode_page_size, budget=cfg.decode_page_budget,
                    sink_pages=cfg.decode_sink_pages, local_pages=cfg.decode_local_pages)
            else:
                out = attn_lib.attend(q, keys, values, context["allowed"], prefix=prefix)
        new_kv = cache.to_stored(ck, cv)
        return self.o_proj(out.reshape(b, s, cfg.num_heads * cfg.head_dim)), new_kv


def _dense_attention(cfg, q, k, v, context):
    if cfg.attention_backend != "reference":
        from rlx.models import kernel_attention  # imported lazily: optional backend
        return kernel_attention.attend(cfg, q, k, v, context)
    return attn_lib.attend(q, k, v, context["allowed"])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)) (Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, bias=False,
                                 cfg=cfg, rngs=rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, bias=False,
                               cfg=cfg, rngs=rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, bias=False,
                                 cfg=cfg, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype))
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, context, layer, cache):
        h, new_kv = self.attn(self.input_norm(x), positions, context, layer, cache)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), new_kv


class Trunk(nnx.Module):
    """Embedding, blocks and final norm: tokens -> hidden states [B, S, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.dtype(cfg.param_dtype),
                               embedding_init=_INIT, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                  dtype=jnp.dtype(cfg.dtype),
                                  param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, tokens, positions=None, attention_mask=None, *,
                 segment_ids=None, cache: KVCache | None = None, cache_slot=None):
        """Runs the trunk.

        Args:
          tokens: [B, S] int token ids.
          positions: [B, S] int rotary positions (default: 0..S-1, or for padded rows
            the count of real tokens before each one).
          attention_mask: [B, S] 1 for real tokens, 0 for padding (left or right).
          segment_ids: [B, S] Prefix Grouper packing (0 = prompt, i = completion i).
          cache: optional KVCache; the S new tokens are written at slots
            [cache_slot, cache_slot + S) and attend to every earlier valid slot.
          cache_slot: scalar int slot index (required with cache). A Python 0 (a
            prefill) is static: attention then reads only the S new keys, the only ones
            causality leaves visible, instead of the whole cache buffer.
        Returns:
          (hidden [B, S, D], cache or None).
        """
        b, s = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        if cache is None:
            index = jnp.arange(s)
            context = {"allowed": attn_lib.allowed_mask(index, index, attention_mask,
                                                         segment_ids, segment_ids),
                       "key_valid": attention_mask, "segment_ids": segment_ids}
        else:
            if cache_slot is None:
                raise ValueError("Trunk: cache_slot is required when a cache is given")
            if segment_ids is not None:
                raise ValueError("Trunk: segment_ids (packing) cannot be combined with a cache")
            slot = jnp.asarray(cache_slot, jnp.int32)
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, slot))
            context = {"slot": slot,
                       "from_slot_0": isinstance(cache_slot, int) and cache_slot == 0,
                       "allowed": attn_lib.allowed_mask(slot + jnp.arange(s),
                                                         jnp.arange(cache.num_slots), kv_mask)}
        x = self.embed(tokens)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            x, kv = block(x, positions, context, i, cache)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.final_norm(x)
        if cache is not None:
            cache = cache.with_layers(new_k, new_v).replace(mask=kv_mask)
        return x, cache


class CausalLM(nnx.Module):
    """The policy: trunk plus (tied or untied) unembedding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = Trunk(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, bias=False, cfg=cfg,
                                   rngs=rngs)

    def __call__(self, tokens, positions=None, attention_mask=None, **kw):
        """Returns (hidden [B,S,D], cache); see ``Trunk.__call__``."""
        return self.trunk(tokens, positions, attention_mask, **kw)

    def unembedding(self) -> jax.Array:
        """The [D, V] unembedding matrix in the compute dtype."""
        dtype = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            return self.trunk.embed.embedding.value.T.astype(dtype)
        return self.lm_head.kernel.value.astype(dtype)

    def logits(self, hidden) -> jax.Array:
        """hidden [B,S,D] -> float32 logits [B,S,V]."""
        return jnp.einsum("bsd,dv->bsv", hidden, self.unembedding(),
                          preferred_element_type=jnp.float32)


class ValueModel(nnx.Module):
    """Critic: the trunk plus a linear head giving one float32 value per token [B, S]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = Trunk(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden_size, 1, param_dtype=jnp.dtype(cfg.param_dtype),
                               kernel_init=nnx.initializers.zeros,
                               bias_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, tokens, positions=None, attention_mask=None, **kw):
        hidden, _ = self.trunk(tokens, positions, attention_mask, **kw)
        return self.head(hidden.astype(jnp.float32))[..., 0]


class RewardModel(nnx.Module):
    """Scalar reward per sequence, read at the last non-pad token (left or right padding)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.trunk = Trunk(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden_size, 1, param_dtype=jnp.dtype(cfg.param_dtype),
                               kernel_init=_INIT, bias_init=nnx.initializers.zeros,
                               rngs=rngs)

    def __call__(self, tokens, positions=None, attention_mask=None, **kw):
        b, s = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        hidden, _ = self.trunk(tokens, positions, attention_mask, **kw)
        scores = self.head(hidden.astype(jnp.float32))[..., 0]
        return jnp.take_along_axis(scores, last_token_index(attention_mask)[:, None], 1)[:, 0]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """[B, S] mask -> [B] index of the last real token (0 for an all-pad row)."""
    idx = jnp.arange(attention_mask.shape[1])
    return jnp.max(jnp.where(attention_mask.astype(bool), idx, 0), axis=1)
