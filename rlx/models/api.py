"""The functional boundary: static definition + params pytree, pure forwards.

A model is ``(graphdef, params)``: ``graphdef`` is static (hashable, closed over by jit),
``params`` is an ``nnx.State`` pytree of arrays keyed by stable paths (see
``rlx/models/transformer.py``). Every function here is a pure
``(graphdef, params, inputs) -> outputs`` that can be jitted, differentiated and sharded.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from rlx.models.cache import KVCache
from rlx.models.config import ModelConfig
from rlx.models.logprobs import logprobs_from_hidden
from rlx.models.transformer import CausalLM, RewardModel, ValueModel

Kind = Literal["policy", "value", "reward"]
_CLASSES = {"policy": CausalLM, "value": ValueModel, "reward": RewardModel}


def init(config: ModelConfig, *, kind: Kind = "policy", seed: int = 0
         ) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds a randomly initialised model and splits it into (graphdef, params)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_CLASSES)}")
    module = _CLASSES[kind](config, rngs=nnx.Rngs(seed))
    return split(module)


def abstract_init(config: ModelConfig, *, kind: Kind = "policy"
                  ) -> tuple[nnx.GraphDef, nnx.State]:
    """Like ``init`` but with ShapeDtypeStructs (no memory); for sharding plans and loading."""
    module = nnx.eval_shape(lambda: _CLASSES[kind](config, rngs=nnx.Rngs(0)))
    return split(module)


def split(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params = nnx.split(module, nnx.Param)
    return graphdef, params


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.Module:
    return nnx.merge(graphdef, params)


def hidden_states(graphdef, params, tokens, positions=None, attention_mask=None, *,
                  segment_ids=None) -> jax.Array:
    """[B, S] tokens -> [B, S, D] final (normed) hidden states (any model kind)."""
    hidden, _ = merge(graphdef, params).trunk(tokens, positions, attention_mask,
                                              segment_ids=segment_ids)
    return hidden


def logits(graphdef, params, tokens, positions=None, attention_mask=None, *,
           segment_ids=None) -> jax.Array:
    """[B, S] tokens -> float32 logits [B, S, V]."""
    model = merge(graphdef, params)
    hidden, _ = model(tokens, positions, attention_mask, segment_ids=segment_ids)
    return model.logits(hidden)


def token_logprobs(graphdef, params, tokens, targets, positions=None, attention_mask=None,
                   *, segment_ids=None, temperature: float = 1.0, chunk_size: int = 512
                   ) -> tuple[jax.Array, jax.Array]:
    """log π(targets_t | tokens_≤t) and the entropy of π(· | tokens_≤t), both [B, S] f32.

    ``targets`` is usually ``tokens`` shifted left by one. Logits are formed one chunk
    of ``chunk_size`` tokens at a time (see ``rlx.models.logprobs``).
    """
    model = merge(graphdef, params)
    hidden, _ = model(tokens, positions, attention_mask, segment_ids=segment_ids)
    return logprobs_from_hidden(hidden, model.unembedding(), targets,
                                temperature=temperature, chunk_size=chunk_size)


def forward_with_cache(graphdef, params, tokens, positions, attention_mask, cache: KVCache,
                       cache_slot) -> tuple[jax.Array, KVCache]:
    """Writes S tokens into ``cache`` at ``cache_slot`` and returns (logits [B,S,V] f32,
    cache). Prefill is S = prompt length; a decode step is S = 1."""
    model = merge(graphdef, params)
    hidden, cache = model(tokens, positions, attention_mask, cache=cache,
                          cache_slot=cache_slot)
    return model.logits(hidden), cache


def values(graphdef, params, tokens, positions=None, attention_mask=None) -> jax.Array:
    """Value model: [B, S] tokens -> [B, S] float32 values."""
    return merge(graphdef, params)(tokens, positions, attention_mask)


def rewards(graphdef, params, tokens, positions=None, attention_mask=None) -> jax.Array:
    """Reward model: [B, S] tokens -> [B] float32 scores at the last real token."""
    return merge(graphdef, params)(tokens, positions, attention_mask)


def cast_params(params: nnx.State, dtype: Any) -> nnx.State:
    """Casts floating-point leaves (e.g. f32 master weights -> bf16 for a forward)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def param_paths(params: nnx.State) -> list[str]:
    """The '/'-joined paths of all parameters, e.g. 'trunk/layers/0/attn/q_proj/kernel'."""
    flat = nnx.to_flat_state(params)
    return ["/".join(str(p) for p in path) for path, _ in flat]
