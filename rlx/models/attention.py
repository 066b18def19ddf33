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
    if s == 1:
        return attend_one_query(q, k, v, allowed, prefix)
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


def attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                     prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None
                     ) -> jax.Array:
    """``attend`` for one query token per row (S = 1, a decode step); same arguments.

    A decode step is a matrix-vector product per (row, kv head): it is written as fused
    multiply-reduces over the cache in its own [B, T, K, Dh] layout. The einsum form of
    ``attend`` lowers to batched dots whose batch axes (b, k) must lead, so XLA first
    copies every layer's whole cache (and the shared prefix) to [B, K, T, Dh] at every
    step; here each key and value is read once, in place. The two key regions (shared
    prefix, per-row slots) are normalised together without concatenating them:
    softmax over both = exp(s − m) / (Σ_prefix + Σ_rows) with m the joint maximum.
    """
    b, s, h, dh = q.shape
    if s != 1:
        raise ValueError(f"attend_one_query: expected one query token per row, got S={s}")
    kh = k.shape[2]
    r = h // kh
    f32 = jnp.float32
    qf = q.astype(f32).reshape(b, kh, r, dh) * f32(dh ** -0.5)
    # [B, T, K, R]: row slots
    scores = jnp.sum(qf[:, None] * k.astype(f32)[:, :, :, None, :], axis=-1)
    scores = jnp.where(allowed[:, 0, :, None, None], scores, NEG_INF)
    m = jnp.max(scores, axis=1, keepdims=True)                       # [B, 1, K, R]
    if prefix is not None:
        kp, vp, validp = prefix
        p, tp = kp.shape[0], kp.shape[1]
        g = b // p
        qp = qf.reshape(p, g, 1, kh, r, dh)
        # [P, G, Tp, K, R]: the prompt's keys once per prompt, read by its G rows
        sp = jnp.sum(qp * kp.astype(f32)[:, None, :, :, None, :], axis=-1)
        sp = jnp.where(validp[:, None, :, None, None], sp, NEG_INF)
        m = jnp.maximum(m, jnp.max(sp, axis=2).reshape(b, 1, kh, r))
    e = jnp.exp(scores - m)
    denom = jnp.sum(e, axis=1)                                        # [B, K, R]
    out = jnp.sum(e[..., None] * v.astype(f32)[:, :, :, None, :], axis=1)  # [B, K, R, Dh]
    if prefix is not None:
        ep = jnp.exp(sp - m.reshape(p, g, 1, kh, r))
        denom = denom + jnp.sum(ep, axis=2).reshape(b, kh, r)
        out_p = jnp.sum(ep[..., None] * vp.astype(f32)[:, None, :, :, None, :], axis=2)
        out = out + out_p.reshape(b, kh, r, dh)
    out = out / denom[..., None]
    return out.reshape(b, 1, h, dh).astype(q.dtype)
