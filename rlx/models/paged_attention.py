"""Decode-step attention with LServe query-aware KV-page selection (arXiv 2502.14866).

Used by ``Attention.__call__`` for single-token cache steps (S = 1) when
``ModelConfig.decode_page_size > 0``; prefill (S > 1) stays dense.

The keys a decode query may see are viewed as pages of ``page_size`` slots in two
regions, in attention order:

  [ shared prompt prefix (Cp slots, padded to Cp' = ⌈Cp/ps⌉·ps) | per-row slots (C → C') ]

Each region is padded on its own with empty slots, so no page straddles the prefix
and the row slots. The prefix is *paged like any other region* (not attended densely):
in a long-prompt rollout it is where almost all context lives, so that is where page
selection saves work. Pages are scored with LServe's per-channel min/max upper bound
(``rlx_kernels.paged_decode.page_scores``) and ``select_pages`` keeps, per row and
query head, the first ``sink_pages`` non-empty pages (the attention sink: the start of
the prompt), the ``local_pages`` pages ending at the newest token, and the
``budget`` best-scoring other pages. Softmax is taken jointly over the selected
tokens of both regions, so with budget ≥ the number of non-empty pages the result is
exactly dense decode (``rlx.models.attention.attend``).

The attended slots are ``allowed[:, 0]`` (valid and causal) for the per-row region and
``prefix_mask`` for the prefix, i.e. exactly the keys dense attention sees.

Cost (the chosen reading: summaries are recomputed each step, no state in the cache):
per layer and step, ``page_summary`` reads every valid key once (O(B·C·K·Dh) for the
row slots, O(P·Cp·K·Dh) for the prefix, then broadcast G times as [B, Cp'/ps, K, Dh]
summaries), and the attention itself reads only the M = sink + local + budget selected
pages per (row, head) in the kernel paths. The shared prefix is broadcast to a per-row
view [B, Cp' + C', K, Dh] because ``paged_decode_attention`` takes one cache per row;
XLA materialises that copy, so with ``prefix_cache="shared"`` the memory traffic per
step is still linear in the context. An incremental summary (``update_page_summary``
carried in the cache) and a prefix-aware page table would remove both linear terms;
they are not part of this integration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx_kernels import paged_decode


def _pad_slots(x: jax.Array, axis: int, page_size: int) -> jax.Array:
    extra = (-x.shape[axis]) % page_size
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _concat_summaries(a: paged_decode.PageSummary, b: paged_decode.PageSummary
                      ) -> paged_decode.PageSummary:
    cat = lambda x, y: jnp.concatenate([x, y], axis=1)  # noqa: E731
    return paged_decode.PageSummary(cat(a.kmax, b.kmax), cat(a.kmin, b.kmin),
                                    cat(a.count, b.count), a.page_size)


def paged_view(k, v, key_mask, prefix=None, *, page_size: int):
    """The decode keys as one paged cache per row.

    Args:
      k, v: [B, C, K, Dh] per-row slots; key_mask: [B, C] bool attendable slots.
      prefix: optional (k_p [P, Cp, K, Dh], v_p [P, Cp, K, Dh], valid_p [P, Cp]) shared
        by the G = B/P consecutive rows of each prompt.
      page_size: slots per page.
    Returns:
      (keys [B, N, K, Dh], values [B, N, K, Dh], mask [B, N], summary with N/ps pages)
      with N = Cp' + C' (prefix region first, each region padded to whole pages).
    """
    k, v = _pad_slots(k, 1, page_size), _pad_slots(v, 1, page_size)
    key_mask = _pad_slots(key_mask.astype(bool), 1, page_size)
    summary = paged_decode.page_summary(k, key_mask, page_size=page_size)
    if prefix is None:
        return k, v, key_mask, summary
    kp, vp, validp = prefix
    b, p = k.shape[0], kp.shape[0]
    if b % p:
        raise ValueError(f"rows B={b} must be a multiple of the prefix prompts P={p}")
    g = b // p
    kp, vp = _pad_slots(kp.astype(k.dtype), 1, page_size), _pad_slots(vp.astype(v.dtype), 1,
                                                                         page_size)
    validp = _pad_slots(validp.astype(bool), 1, page_size)
    ps = paged_decode.page_summary(kp, validp, page_size=page_size)
    rep = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
    ps = paged_decode.PageSummary(rep(ps.kmax), rep(ps.kmin), rep(ps.count), page_size)
    keys = jnp.concatenate([rep(kp), k], axis=1)
    values = jnp.concatenate([rep(vp), v], axis=1)
    mask = jnp.concatenate([rep(validp), key_mask], axis=1)
    return keys, values, mask, _concat_summaries(ps, summary)


def decode_attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                  prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None, *,
                  page_size: int, budget: int, sink_pages: int = 1, local_pages: int = 1,
                  backend: str = "auto", return_selection: bool = False):
    """Single-token GQA decode attention over the selected KV pages.

    softmax(q·kᵀ/√Dh) · v over the valid slots of the selected pages (prefix and row
    regions normalised together); see the module docstring for the selection rule.

    Args:
      q: [B, 1, H, Dh] the decode query (rotary already applied).
      k, v: [B, C, K, Dh] per-row cache slots (the new token already written).
      allowed: [B, 1, C] bool, the dense decode mask (valid and causal).
      prefix: optional shared prefix as in ``rlx.models.attention.attend``.
      page_size, budget, sink_pages, local_pages: see ``rlx_kernels.paged_decode``.
      backend: ``rlx_kernels.dispatch`` backend of the attention kernel ("auto" is the
        jnp reference on CPU).
      return_selection: also return (selection [B, H, M], mask [B, N]) over the paged
        view of ``paged_view``, for inspection and tests.
    Returns:
      [B, 1, H, Dh] in q's dtype (and the selection when asked).
    """
    b, s, h, dh = q.shape
    if s != 1:
        raise ValueError(f"decode_attend: page selection is for single-token decode "
                         f"steps, got S={s} query tokens")
    if allowed.shape != (b, 1, k.shape[1]):
        raise ValueError(f"decode_attend: allowed must be [B, 1, C]=({b}, 1, {k.shape[1]}),"
                         f" got {allowed.shape}")
    keys, values, mask, summary = paged_view(k, v, allowed[:, 0], prefix,
                                             page_size=page_size)
    out, selection = paged_decode.sparse_decode(
        q[:, 0], keys, values, mask, summary, budget=budget, sink_pages=sink_pages,
        local_pages=local_pages, backend=backend)
    out = out[:, None].astype(q.dtype)
    if return_selection:
        return out, (selection, mask)
    return out
