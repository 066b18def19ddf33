"""Preallocated key/value cache for incremental decoding.

The cache is a plain pytree so the sampler can carry it through ``lax.while_loop``
and donate it. Slots are written with ``dynamic_update_slice`` at a scalar slot index
shared by all rows (prompts are left-padded so every row advances in lockstep).

Group rollouts share one prompt prefix: ``prefix_*`` hold the prompt's keys/values
once per prompt ([P, Cp, ...]) while ``k``/``v`` hold the per-rollout continuation
([B = P·G, C, ...]). Attention reads both and normalises them with one softmax, so
the G rows of a group never copy the prompt's KV entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Shapes: L layers, B rows, C slots, K kv heads, Dh head dim, P prompts.

    Attributes:
      k, v: [L, B, C, K, Dh] per-row slots.
      mask: [B, C] bool, True where the slot holds a real (attendable) token.
      prefix_k, prefix_v: [L, P, Cp, K, Dh] shared prompt slots, or None.
      prefix_mask: [P, Cp] bool, or None.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    prefix_k: jax.Array | None = None
    prefix_v: jax.Array | None = None
    prefix_mask: jax.Array | None = None

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    @property
    def group_size(self) -> int:
        if self.prefix_k is None:
            return 1
        return self.k.shape[1] // self.prefix_k.shape[1]


def init_cache(config, batch_size: int, num_slots: int, dtype=None) -> KVCache:
    """An empty cache of ``num_slots`` slots per row (no prefix)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, num_slots, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch_size, num_slots), bool))


def share_prefix(prefix: KVCache, group_size: int, num_slots: int) -> KVCache:
    """Turns a prefilled prompt cache [P, Cp] into a group cache for P·G rows.

    The prompt's entries become the shared prefix (not copied G times); the G rows of
    each prompt get ``num_slots`` fresh slots for their continuations.
    """
    if prefix.prefix_k is not None:
        raise ValueError("share_prefix: cache already has a shared prefix")
    num_layers, num_prompts, _, kv_heads, head_dim = prefix.k.shape
    rows = num_prompts * group_size
    shape = (num_layers, rows, num_slots, kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, prefix.k.dtype), v=jnp.zeros(shape, prefix.v.dtype),
                   mask=jnp.zeros((rows, num_slots), bool),
                   prefix_k=prefix.k, prefix_v=prefix.v, prefix_mask=prefix.mask)


def repeat_rows(cache: KVCache, repeats: int, extra_slots: int = 0) -> KVCache:
    """The naive group path: copies each row's slots ``repeats`` times (and appends
    ``extra_slots`` empty slots for the continuation)."""
    if cache.prefix_k is not None:
        raise ValueError("repeat_rows: cache has a shared prefix; repeat before sharing")

    def grow(x, axis_slots):
        x = jnp.repeat(x, repeats, axis=axis_slots - 1)
        if extra_slots:
            pad = [(0, 0)] * x.ndim
            pad[axis_slots] = (0, extra_slots)
            x = jnp.pad(x, pad)
        return x

    return KVCache(k=grow(cache.k, 2), v=grow(cache.v, 2), mask=grow(cache.mask, 1))
