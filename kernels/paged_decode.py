"""Query-aware KV-page selection for single-token decode (LServe, arXiv 2502.14866).

The KV cache ``[B, C, K, Dh]`` (slots C, KV heads K; ``mask [B, C]`` marks real
tokens, as in ``rlx.models.cache.KVCache``) is viewed as P = C / page_size
contiguous pages (LServe's *logical* pages; the identity page table of a
preallocated cache). Each page keeps a per-channel summary of its keys,

    k_max[p, d] = max_{c ∈ p, valid} k[c, d],   k_min[p, d] = min_{c ∈ p, valid} k[c, d],

and a decode query scores every page with the upper bound (formulas.md §10)

    score(p) = Σ_d max(q_d · k_max[p, d], q_d · k_min[p, d])  ≥  q · k_c  for all c ∈ p.

Selection, per row and per *query* head (as in the reference code): always the
``sink_pages`` first non-empty pages and the ``local_pages`` pages ending at the
page of the newest valid token, plus the ``budget`` best-scoring other
non-empty pages. If there are at most ``sink_pages + local_pages + budget``
non-empty pages, all of them are taken, so the result equals dense decode.
LServe's rule ("top k−1 pages except the last, plus the last page") is
``sink_pages=0, local_pages=1, budget=k−1``. The number of attended pages is
constant, so decode cost stops growing with context length. LServe's
4-logical-per-physical page hierarchy and selector reuse every 4 steps are
left to the caller (score pages of 16 tokens and reuse a selection).

Attention then runs only over the selected pages (a Pallas kernel that walks the
selected page indices: scalar-prefetched on TPU, an int array input on GPU),
with f32 accumulation and the same masking of invalid slots as dense decode.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from rlx_kernels import dispatch

__all__ = [
    "PageSummary",
    "PageSelection",
    "page_summary",
    "update_page_summary",
    "page_scores",
    "select_pages",
    "selected_token_mask",
    "reference_decode_attention",
    "paged_decode_attention",
    "sparse_decode",
]

NEG = -1e30
LANES = 128
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageSummary:
    """kmax/kmin [B, P, K, Dh] (keys' dtype), count [B, P] int32 valid tokens per page."""

    kmax: jax.Array
    kmin: jax.Array
    count: jax.Array
    page_size: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageSelection:
    """index [B, H, M] int32 selected pages (ascending), valid [B, H, M] bool."""

    index: jax.Array
    valid: jax.Array


def _check_cache(k_cache, mask, page_size):
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [B, C, K, Dh], got shape {k_cache.shape}")
    b, c = k_cache.shape[:2]
    if mask.shape != (b, c):
        raise ValueError(f"mask must be [B, C]=({b}, {c}), got shape {mask.shape}")
    if page_size <= 0 or c % page_size:
        raise ValueError(f"page_size must divide the number of slots C={c}, got {page_size}")


def page_summary(k_cache: jax.Array, mask: jax.Array, *, page_size: int) -> PageSummary:
    """Summaries of every page from a filled cache (e.g. after prefill)."""
    _check_cache(k_cache, mask, page_size)
    b, c, kh, d = k_cache.shape
    pages = k_cache.reshape(b, c // page_size, page_size, kh, d)
    m = mask.reshape(b, c // page_size, page_size)[..., None, None]
    lo, hi = jnp.finfo(k_cache.dtype).min, jnp.finfo(k_cache.dtype).max
    kmax = jnp.max(jnp.where(m, pages, lo), axis=2)
    kmin = jnp.min(jnp.where(m, pages, hi), axis=2)
    count = jnp.sum(mask.reshape(b, c // page_size, page_size), axis=-1, dtype=jnp.int32)
    empty = (count == 0)[..., None, None]
    zero = jnp.zeros((), k_cache.dtype)
    return PageSummary(jnp.where(empty, zero, kmax), jnp.where(empty, zero, kmin), count, page_size)


def update_page_summary(summary: PageSummary, k_new: jax.Array, slot, valid: jax.Array) -> PageSummary:
    """Fold the key written at cache ``slot`` (scalar, shared by rows) into its page.

    k_new [B, K, Dh]; valid [B] bool (rows whose new token is real).
    """
    b, p, kh, d = summary.kmax.shape
    if k_new.shape != (b, kh, d):
        raise ValueError(f"k_new must be [B, K, Dh]=({b}, {kh}, {d}), got {k_new.shape}")
    page = jnp.asarray(slot, jnp.int32) // summary.page_size
    old_max = lax.dynamic_index_in_dim(summary.kmax, page, axis=1, keepdims=False)
    old_min = lax.dynamic_index_in_dim(summary.kmin, page, axis=1, keepdims=False)
    old_cnt = lax.dynamic_index_in_dim(summary.count, page, axis=1, keepdims=False)
    k_new = k_new.astype(summary.kmax.dtype)
    fresh = (old_cnt == 0)[:, None, None]
    new_max = jnp.where(fresh, k_new, jnp.maximum(old_max, k_new))
    new_min = jnp.where(fresh, k_new, jnp.minimum(old_min, k_new))
    v = valid[:, None, None]
    new_max, new_min = jnp.where(v, new_max, old_max), jnp.where(v, new_min, old_min)
    new_cnt = old_cnt + valid.astype(jnp.int32)
    put = lambda x, y: lax.dynamic_update_index_in_dim(x, y, page, axis=1)  # noqa: E731
    return PageSummary(put(summary.kmax, new_max), put(summary.kmin, new_min), put(summary.count, new_cnt),
                       summary.page_size)


def page_scores(q: jax.Array, summary: PageSummary) -> jax.Array:
    """[B, H, P] f32: Σ_d max(q_d·kmax_d, q_d·kmin_d) with kv head h // G."""
    b, h, d = q.shape
    kh = summary.kmax.shape[2]
    if h % kh:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads K={kh}")
    qf = q.astype(jnp.float32).reshape(b, kh, h // kh, 1, d)
    kmax = jnp.swapaxes(summary.kmax.astype(jnp.float32), 1, 2)[:, :, None]  # [B, K, 1, P, Dh]
    kmin = jnp.swapaxes(summary.kmin.astype(jnp.float32), 1, 2)[:, :, None]
    return jnp.sum(jnp.maximum(qf * kmax, qf * kmin), axis=-1).reshape(b, h, -1)


def select_pages(scores: jax.Array, summary: PageSummary, *, budget: int, sink_pages: int = 1,
                 local_pages: int = 1) -> PageSelection:
    """The sink, local and ``budget`` best non-empty pages per (row, query head).

    M = min(P, sink_pages + local_pages + budget) entries, ascending page order;
    ``valid`` is False for entries beyond the number of non-empty pages.
    """
    if budget < 0 or sink_pages < 0 or local_pages < 0:
        raise ValueError(f"budget, sink_pages, local_pages must be >= 0, got {budget}, {sink_pages}, {local_pages}")
    b, h, p = scores.shape
    if summary.count.shape != (b, p):
        raise ValueError(f"scores [B, H, P] do not match summary.count {summary.count.shape}")
    m = min(p, sink_pages + local_pages + budget)
    if m == 0:
        raise ValueError("select_pages needs sink_pages + local_pages + budget >= 1")
    nonempty = summary.count > 0  # [B, P]
    rank = jnp.cumsum(nonempty, axis=-1) - 1  # rank among non-empty pages
    pid = jnp.arange(p)
    last = jnp.max(jnp.where(nonempty, pid, -1), axis=-1, keepdims=True)  # newest page
    forced = nonempty & ((rank < sink_pages) | ((pid <= last) & (pid > last - local_pages)))
    prio = jnp.where(forced[:, None], jnp.inf, scores.astype(jnp.float32))
    prio = jnp.where(nonempty[:, None], prio, -jnp.inf)
    top, idx = lax.top_k(prio, m)
    valid = top > -jnp.inf
    idx = jnp.where(valid, idx, p)  # sort invalid entries last
    order = jnp.argsort(idx, axis=-1)
    idx, valid = jnp.take_along_axis(idx, order, -1), jnp.take_along_axis(valid, order, -1)
    first = idx[..., :1]
    return PageSelection(jnp.where(valid, idx, first).astype(jnp.int32), valid)


def selected_token_mask(selection: PageSelection, mask: jax.Array, *, page_size: int) -> jax.Array:
    """[B, H, C] bool: valid slots whose page is selected."""
    b, c = mask.shape
    p = c // page_size
    onehot = jax.nn.one_hot(selection.index, p, dtype=jnp.bool_) & selection.valid[..., None]
    pages = jnp.any(onehot, axis=2)  # [B, H, P]
    return jnp.repeat(pages, page_size, axis=-1) & mask[:, None, :]


def reference_decode_attention(q, k_cache, v_cache, token_mask, *, sm_scale: float | None = None):
    """Decode attention in f32. q [B,H,Dh], caches [B,C,K,Dh], token_mask [B,H|1,C]. 0 if no key."""
    b, h, d = q.shape
    kh = k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    k = jnp.repeat(k_cache.astype(jnp.float32), h // kh, axis=2)
    v = jnp.repeat(v_cache.astype(jnp.float32), h // kh, axis=2)
    s = jnp.einsum("bhd,bchd->bhc", q.astype(jnp.float32), k) * scale
    token_mask = jnp.broadcast_to(token_mask, s.shape)
    s = jnp.where(token_mask, s, NEG)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * token_mask
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhc,bchd->bhd", p, v).astype(q.dtype)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


def _update(s, mask, v, m_prev, l_prev, acc_prev):
    """Online softmax over one page; s/mask [1, ps] rows, v [ps, Dh]."""
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc_prev + lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    return m_new, l_new, acc


def _tpu_kernel(sel_idx, sel_valid, q_ref, k_ref, v_ref, mask_ref, o_ref, m_scr, l_scr, acc_scr, *, scale, steps):
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(sel_valid[b, h, t] > 0)
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale  # [1, ps]
        m, l, acc = _update(s, mask_ref[...] > 0, v_ref[...], m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
        m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
        acc_scr[...] = acc

    @pl.when(t == steps - 1)
    def _write():
        l = l_scr[...][:, :1]
        ok = l > 0
        o_ref[...] = jnp.where(ok, acc_scr[...] / jnp.where(ok, l, 1.0), 0.0).astype(o_ref.dtype)


def _tpu_decode(q, k_cache, v_cache, mask, selection, page_size, scale, interpret):
    b, h, d = q.shape
    c, kh = k_cache.shape[1], k_cache.shape[2]
    group, steps = h // kh, selection.index.shape[-1]
    # Head-major views: [B, K, C, Dh] pages are (page_size, Dh) tiles.
    kt, vt = jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2)
    mask4 = mask.astype(jnp.int32).reshape(b, c // page_size, 1, page_size)
    page_map = lambda bb, hh, t, idx, val: (bb, hh // group, idx[bb, hh, t], 0)  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, scale=scale, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, steps),
            in_specs=[
                pl.BlockSpec((None, None, 1, d), lambda bb, hh, t, *_: (bb, hh, 0, 0)),
                pl.BlockSpec((None, None, page_size, d), page_map),
                pl.BlockSpec((None, None, page_size, d), page_map),
                pl.BlockSpec((None, None, 1, page_size), lambda bb, hh, t, idx, val: (bb, idx[bb, hh, t], 0, 0)),
            ],
            out_specs=pl.BlockSpec((None, None, 1, d), lambda bb, hh, t, *_: (bb, hh, 0, 0)),
            scratch_shapes=[pltpu.VMEM((1, LANES), jnp.float32), pltpu.VMEM((1, LANES), jnp.float32),
                            pltpu.VMEM((1, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, h, 1, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_decode_attention",
    )(selection.index, selection.valid.astype(jnp.int32), q[:, :, None, :], kt, vt, mask4)
    return out[:, :, 0]


def _gpu_kernel(sel_idx, sel_valid, q_ref, k_ref, v_ref, mask_ref, o_ref, *, scale, page_size, steps):
    b, h = pl.program_id(0), pl.program_id(1)
    q = q_ref[...].astype(jnp.float32)[None, :]  # [1, Dh]
    d = q.shape[-1]

    def body(t, carry):
        page = sel_idx[b, h, t]
        rows = pl.ds(page * page_size, page_size)
        k = k_ref[rows, :].astype(jnp.float32)
        s = jnp.sum(k * q, axis=-1)[None, :] * scale  # [1, ps]
        mask = (mask_ref[rows] > 0)[None, :] & (sel_valid[b, h, t] > 0)
        return _update(s, mask, v_ref[rows, :], *carry)

    init = (jnp.full((1, 1), NEG, jnp.float32), jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, d), jnp.float32))
    _, l, acc = lax.fori_loop(0, steps, body, init)
    ok = l > 0
    o_ref[...] = jnp.where(ok, acc / jnp.where(ok, l, 1.0), 0.0)[0].astype(o_ref.dtype)


def _gpu_decode(q, k_cache, v_cache, mask, selection, page_size, scale, interpret):
    b, h, d = q.shape
    c, kh = k_cache.shape[1], k_cache.shape[2]
    group, steps = h // kh, selection.index.shape[-1]
    full = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    valid = selection.valid.astype(jnp.int32)
    return pl.pallas_call(
        functools.partial(_gpu_kernel, scale=scale, page_size=page_size, steps=steps),
        grid=(b, h),
        in_specs=[
            full(selection.index), full(valid),
            pl.BlockSpec((None, None, d), lambda bb, hh: (bb, hh, 0)),
            pl.BlockSpec((None, c, None, d), lambda bb, hh: (bb, 0, hh // group, 0)),
            pl.BlockSpec((None, c, None, d), lambda bb, hh: (bb, 0, hh // group, 0)),
            pl.BlockSpec((None, c), lambda bb, hh: (bb, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, d), lambda bb, hh: (bb, hh, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_decode_attention_gpu",
    )(selection.index, valid, q, k_cache, v_cache, mask.astype(jnp.int32))


def paged_decode_attention(q, k_cache, v_cache, mask, selection: PageSelection, *, page_size: int,
                           sm_scale: float | None = None, backend: str = "auto") -> jax.Array:
    """Decode attention over the selected pages only. q [B,H,Dh] → [B,H,Dh] in q's dtype."""
    _check_cache(k_cache, mask, page_size)
    b, h, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"caches must be [B={b}, C, K, Dh={d}], got {k_cache.shape}, {v_cache.shape}")
    if h % k_cache.shape[2]:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads K={k_cache.shape[2]}")
    if selection.index.shape[:2] != (b, h):
        raise ValueError(f"selection must be [B={b}, H={h}, M], got {selection.index.shape}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    res = dispatch.resolve_backend(backend)
    if not res.is_kernel:
        tmask = selected_token_mask(selection, mask, page_size=page_size)
        return reference_decode_attention(q, k_cache, v_cache, tmask, sm_scale=scale)
    if not res.interpret:
        if res.kind == "tpu" and page_size % 8:
            raise ValueError(f"TPU pages must be a multiple of 8 tokens, got page_size={page_size}")
        if res.kind == "gpu" and (page_size & (page_size - 1) or d & (d - 1)):
            raise ValueError(f"GPU (Triton) needs power-of-two page_size and head_dim, got {page_size}, {d}")
    fn = _tpu_decode if res.kind == "tpu" else _gpu_decode
    return fn(q, k_cache, v_cache, mask, selection, page_size, scale, res.interpret)


def sparse_decode(q, k_cache, v_cache, mask, summary: PageSummary, *, budget: int, sink_pages: int = 1,
                  local_pages: int = 1, sm_scale: float | None = None, backend: str = "auto"):
    """Score pages, select, attend. Returns (out [B,H,Dh], selection) so a caller
    can reuse the selection for the next few steps (LServe reuses it for 4)."""
    selection = select_pages(page_scores(q, summary), summary, budget=budget, sink_pages=sink_pages,
                             local_pages=local_pages)
    out = paged_decode_attention(q, k_cache, v_cache, mask, selection, page_size=summary.page_size,
                                 sm_scale=sm_scale, backend=backend)
    return out, selection
