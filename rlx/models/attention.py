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
        keys = lambda x: jnp.moveaxis(x, 1, -1)  # noqa: E731  [., T, K, Dh] -> [., K, Dh, T]
        values = lambda x: x.swapaxes(1, 2)  # noqa: E731  [., T, K, Dh] -> [., K, T, Dh]
        if prefix is not None:
            prefix = (keys(prefix[0]), values(prefix[1]), prefix[2])
        return attend_one_query(q, keys(k), values(v), allowed, prefix)
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
    """``attend`` for one query token per row (S = 1, a decode step) over the cache
    layout of ``rlx.models.cache`` (head-major, keys transposed).

    Args:
      q: [B, 1, H, Dh]; k: [B, K, Dh, T]; v: [B, K, T, Dh]; allowed: [B, 1, T] bool.
      prefix: optional (k_p [P, K, Dh, Tp], v_p [P, K, Tp, Dh], valid_p [P, Tp]) shared
        by the G = B/P consecutive rows of each prompt.
    Returns:
      [B, 1, H, Dh] in q's dtype.

    Per (row, kv head) this is [R, Dh]·[Dh, T] and [R, T]·[T, Dh] with (B, K) as batch
    axes, and both right-hand sides are stored as the products read them: no operand
    is transposed (the [B, T, K, Dh] form of ``attend`` makes XLA copy every layer's
    whole cache at every step). The two key regions (shared prefix, per-row slots) are
    normalised together without concatenating them: softmax over both is
    exp(s − m) / (Σ_prefix + Σ_rows) with m the joint maximum.
    """
    b, s, h, dh = q.shape
    if s != 1:
        raise ValueError(f"attend_one_query: expected one query token per row, got S={s}")
    kh = k.shape[1]
    r = h // kh
    f32 = jnp.float32
    qf = q.astype(f32).reshape(b, kh, r, dh) * f32(dh ** -0.5)
    scores = jnp.einsum("bkrd,bkdt->bkrt", qf, k.astype(f32))          # [B, K, R, T]
    scores = jnp.where(allowed[:, :, None, :], scores, NEG_INF)
    m = jnp.max(scores, axis=-1)                                         # [B, K, R]
    if prefix is not None:
        # Prefix terms in (prompt, kv head)-batch order [P, K, G, R, ·], the order the
        # products produce; only the small [B, K, R] statistics change order.
        kp, vp, validp = prefix
        p = kp.shape[0]
        g = b // p
        to_pk = lambda x: x.reshape(p, g, kh, r, *x.shape[3:]).swapaxes(1, 2)  # noqa: E731
        to_b = lambda x: x.swapaxes(1, 2).reshape(b, kh, r, *x.shape[4:])  # noqa: E731
        sp = jnp.einsum("pkgrd,pkdt->pkgrt", to_pk(qf), kp.astype(f32))  # [P, K, G, R, Tp]
        sp = jnp.where(validp[:, None, None, None, :], sp, NEG_INF)
        m = jnp.maximum(m, to_b(jnp.max(sp, axis=-1)))
    e = jnp.exp(scores - m[..., None])
    denom = jnp.sum(e, axis=-1)
    out = jnp.einsum("bkrt,bktd->bkrd", e, v.astype(f32))               # [B, K, R, Dh]
    if prefix is not None:
        ep = jnp.exp(sp - to_pk(m)[..., None])
        denom = denom + to_b(jnp.sum(ep, axis=-1))
        out = out + to_b(jnp.einsum("pkgrt,pktd->pkgrd", ep, vp.astype(f32)))
    out = out / denom[..., None]
    return out.reshape(b, 1, h, dh).astype(q.dtype)
