"""Grouped-query attention (reference jnp path) with masks for padding, packing and caches.

Shapes: B rows, S query tokens, T key slots, H query heads, K kv heads, R = H/K,
Dh head dim, P prompts (shared prefix), G = B/P.

softmax(q·kᵀ/√Dh + mask) · v, computed with float32 scores and accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def allowed_mask(query_index: jax.Array, key_index: jax.Array, key_valid: jax.Array,
                 segment_q: jax.Array | None = None,
                 segment_k: jax.Array | None = None) -> jax.Array:
    """Boolean [B, S, T] mask: causal by slot index, valid keys, packed segments.

    Args:
      query_index: [B, S] or [S] slot index of each query token.
      key_index: [T] slot index of each key.
      key_valid: [B, T] key holds a real token.
      segment_q, segment_k: optional [B, S] / [B, T] segment ids for Prefix Grouper
        packing (arXiv 2506.05433): segment 0 is the shared prompt, segment i ≥ 1 is
        completion i. A query in segment s sees keys of segment 0 or s (causally).
    """
    qi = query_index if query_index.ndim == 2 else query_index[None]
    allowed = key_index[None, None, :] <= qi[:, :, None]
    allowed = allowed & key_valid[:, None, :]
    if segment_q is not None:
        sk = segment_k[:, None, :]
        allowed = allowed & ((sk == 0) | (sk == segment_q[:, :, None]))
    return allowed


def _scores(q, k):
    """q [B,S,K,R,Dh], k [B,T,K,Dh] -> [B,K,R,S,T] float32."""
    return jnp.einsum("bskrd,btkd->bkrst", q, k,
                      preferred_element_type=jnp.float32)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
           prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """Masked GQA attention.

    Args:
      q: [B, S, H, Dh]; k, v: [B, T, K, Dh]; allowed: [B, S, T] bool.
      prefix: optional (k_p [P, Tp, K, Dh], v_p [P, Tp, K, Dh], valid_p [P, Tp]) shared
        by the G = B/P consecutive rows of each prompt; every query may attend every
        valid prefix key (the prefix precedes all per-row slots).
    Returns:
      [B, S, H, Dh] in q's dtype.
    """
    b, s, h, dh = q.shape
    kh = k.shape[2]
    r = h // kh
    qg = q.reshape(b, s, kh, r, dh) * jnp.asarray(dh ** -0.5, q.dtype)
    scores = _scores(qg, k)
    scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
    if prefix is None:
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkrst,btkd->bskrd", probs.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
        return out.reshape(b, s, h, dh).astype(q.dtype)

    kp, vp, validp = prefix
    p, tp = kp.shape[0], kp.shape[1]
    g = b // p
    qp = qg.reshape(p, g, s, kh, r, dh)
    sp = jnp.einsum("pgskrd,ptkd->pgkrst", qp, kp, preferred_element_type=jnp.float32)
    sp = jnp.where(validp[:, None, None, None, None, :], sp, NEG_INF)
    sp = sp.reshape(b, kh, r, s, tp)
    probs = jax.nn.softmax(jnp.concatenate([sp, scores], axis=-1), axis=-1)
    pp, pr = probs[..., :tp], probs[..., tp:]
    out = jnp.einsum("bkrst,btkd->bskrd", pr.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    pp = pp.reshape(p, g, kh, r, s, tp).astype(vp.dtype)
    out_p = jnp.einsum("pgkrst,ptkd->pgskrd", pp, vp, preferred_element_type=jnp.float32)
    out = out + out_p.reshape(b, s, kh, r, dh)
    return out.reshape(b, s, h, dh).astype(q.dtype)
