"""Logit processors and the per-row sampler: pure functions on float32 logits [..., V].

Each processor returns logits of the same shape with excluded tokens set to −∞, so
processors compose by function application and ``log_softmax`` of the result is the
(renormalised) distribution actually sampled from. ``process_logits`` applies them in
the fixed order

    forbidden ids → temperature τ → top-k → top-p → min-p

(the order of Hugging Face's warpers and vLLM: truncation is judged on the
temperature-scaled distribution, and each truncation renormalises before the next).

Tie rule: a threshold keeps every token whose logit equals the boundary logit, so a
truncation may keep slightly more than k tokens / p mass when logits tie exactly.
Temperature 0 means greedy decoding: the sampled distribution is a point mass on the
argmax, whose log-probability is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def mask_forbidden(logits: jax.Array, forbidden_ids: Sequence[int]) -> jax.Array:
    """Sets the logits of ``forbidden_ids`` to −∞ (they can never be sampled)."""
    if not forbidden_ids:
        return logits
    ids = jnp.asarray(tuple(forbidden_ids), jnp.int32)
    return logits.at[..., ids].set(NEG_INF)


def scale_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """z / τ for τ > 0 (τ = 0, greedy, is handled by ``sample`` and leaves z unchanged)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r}: must be >= 0")
    if temperature == 0 or temperature == 1:
        return logits
    return logits / jnp.float32(temperature)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits (all tokens tied with the k-th are kept); k = 0 is off."""
    if k < 0:
        raise ValueError(f"top_k={k!r}: must be >= 0 (0 disables)")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def _top_p_threshold(head: jax.Array, lse: jax.Array, p: float) -> jax.Array:
    """Boundary logit of the nucleus.

    ``head`` [..., N] holds the largest logits in descending order (every token with a
    larger logit than head[-1] is in it) and ``lse`` [..., 1] the logsumexp over all
    logits. Token i (sorted) is kept iff the mass strictly before it is < p, i.e. the
    nucleus is the smallest prefix whose mass reaches p (the top token always stays).
    """
    probs = jnp.exp(head - lse)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(before < p, axis=-1, keepdims=True)
    return jnp.take_along_axis(head, jnp.maximum(kept, 1) - 1, axis=-1)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus sampling (Holtzman et al. 2019, arXiv 1904.09751): keeps the smallest set
    of most-likely tokens whose probability mass reaches p; p = 1 is off."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p={p!r}: must be in (0, 1]")
    if p == 1:
        return logits
    head = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= _top_p_threshold(head, lse, p), logits, NEG_INF)


def min_p_mask(logits: jax.Array, min_p: float) -> jax.Array:
    """Min-p sampling (Nguyen et al. 2024, arXiv 2407.01082): keeps tokens with
    p_v ≥ min_p · max_u p_u, i.e. z_v ≥ max z + log(min_p); min_p = 0 is off."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p!r}: must be in [0, 1]")
    if min_p == 0:
        return logits
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + jnp.log(jnp.float32(min_p)), logits, NEG_INF)


def process_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0,
                   forbidden_ids: Sequence[int] = ()) -> jax.Array:
    """The composed processor (see the module docstring for the order).

    When top-k is on, top-p is computed on the k sorted candidates from ``lax.top_k``
    instead of a full-vocabulary sort (same result: tokens below the k-th are already
    −∞ and carry no mass).
    """
    logits = mask_forbidden(logits.astype(jnp.float32), forbidden_ids)
    logits = scale_temperature(logits, temperature)
    if temperature == 0:
        return logits
    if 0 < top_k < logits.shape[-1] and top_p < 1:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r}: must be in (0, 1]")
        head = jax.lax.top_k(logits, top_k)[0]
        logits = jnp.where(logits >= head[..., -1:], logits, NEG_INF)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        logits = jnp.where(logits >= _top_p_threshold(head, lse, top_p), logits, NEG_INF)
    else:
        logits = top_p_mask(top_k_mask(logits, top_k), top_p)
    return min_p_mask(logits, min_p)


def sample(key: jax.Array, processed: jax.Array, *, greedy: bool
           ) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from processed logits [B, V] with per-row keys [B].

    Returns (tokens [B] int32, log-probs [B] f32 of those tokens under the distribution
    sampled from: log_softmax(processed), or 0 for greedy (a point mass)).
    Sampling is Gumbel-max (``jax.random.categorical``), so −∞ logits are never drawn.
    """
    if greedy:
        tokens = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    tokens = jax.vmap(jax.random.categorical)(key, processed).astype(jnp.int32)
    logp = jax.nn.log_softmax(processed, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
