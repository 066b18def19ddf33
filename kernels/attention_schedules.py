"""Block schedules for block-sparse causal attention, and the masks they imply.

A *schedule* tells the block-sparse kernel (``block_sparse_attention.py``)
which key blocks each query block visits, as index lists that the TPU kernel
scalar-prefetches (and the GPU kernel reads from an int array). Three patterns:

1. **Dense causal**: query block i visits every key block j that holds a key
   at or before its last query.
2. **Prefix Grouper** (arXiv 2506.05433): a packed row ``[prompt | c1 | … | cG]``
   with ``segment_ids`` 0 for the prompt, i for completion i and -1 for padding.
   A query in segment s may attend a key in segment 0 or s, causally in packed
   order (formulas.md §9, "single-call equivalent"). The block mask keeps every
   block pair that can hold such a pair, so it is built from ``segment_ids``
   (traceable, data dependent).
3. **Streaming heads** (LServe, arXiv 2502.14866, static sparsity): chosen
   heads see only the first ``sink_blocks`` key blocks and a local window of
   ``local_blocks`` key blocks ending at the key block that holds the query
   block's last token (a Λ-shaped mask computed block-wise, as in LServe); the
   other heads stay dense. Head choice is configuration.

**Semantics.** The kernel attends (q, k) iff the *token rule* holds,
``k ≤ q`` (packed order) ∧ ``seg_q ≥ 0`` ∧ ``seg_k ≥ 0`` ∧ ``(seg_k = seg_q ∨
seg_k = 0)``, *and* the block pair ``(q // block_q, k // block_k)`` is in the
schedule. For patterns 1 and 2 the block mask is a superset of the block pairs
the token rule can reach, so the schedule only skips work; for pattern 3 the
block mask is part of the definition (sink + local window in blocks).
Without ``segment_ids`` every token is segment 0, so the token rule is plain
causal attention. :func:`element_mask` gives the exact ``[B, H, S, S]`` mask.

**Padding of the block grid.** A length-S sequence is padded to
``padded_length(S, block_q, block_k)`` (a multiple of ``max(block_q,
block_k)``; the larger block size must be a multiple of the smaller). Padded
tokens get segment -1.

Prefix Grouper packing helpers (:func:`prefix_grouper_pack`,
:func:`prefix_grouper_unpack`, :func:`naive_group_rows`) live here too, so the
model and the GRPO update share one definition of the layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BlockSchedule",
    "PackedGroup",
    "padded_length",
    "causal_block_mask",
    "segment_block_mask",
    "streaming_block_mask",
    "make_schedule",
    "dense_causal_schedule",
    "prefix_grouper_schedule",
    "streaming_schedule",
    "token_mask",
    "element_mask",
    "prefix_grouper_pack",
    "prefix_grouper_unpack",
    "naive_group_rows",
]


# --------------------------------------------------------------------------- #
# Block grid
# --------------------------------------------------------------------------- #


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, (int, np.integer)) or b <= 0:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    hi, lo = max(block_q, block_k), min(block_q, block_k)
    if hi % lo:
        raise ValueError(
            f"the larger block size must be a multiple of the smaller, got "
            f"block_q={block_q}, block_k={block_k}"
        )


def padded_length(seq_len: int, block_q: int, block_k: int) -> int:
    """S rounded up to a multiple of ``max(block_q, block_k)``."""
    _check_blocks(block_q, block_k)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    m = max(block_q, block_k)
    return -(-seq_len // m) * m


def _grid(seq_len: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    sp = padded_length(seq_len, block_q, block_k)
    return sp, sp // block_q, sp // block_k


# --------------------------------------------------------------------------- #
# Block masks [Bs, Hs, nq, nk] (Bs ∈ {1, B}, Hs ∈ {1, H})
# --------------------------------------------------------------------------- #


def causal_block_mask(seq_len: int, *, block_q: int, block_k: int) -> np.ndarray:
    """[1, 1, nq, nk] bool: key block j holds a key ≤ the last query of block i."""
    _, nq, nk = _grid(seq_len, block_q, block_k)
    last_q = (np.arange(nq) + 1) * block_q - 1
    first_k = np.arange(nk) * block_k
    return (first_k[None, :] <= last_q[:, None])[None, None]


def _xp(*xs):
    """numpy for concrete inputs (no compilation), jax.numpy under tracing."""
    return jnp if any(isinstance(x, jax.core.Tracer) for x in xs) else np


def _block_seg_stats(seg, block: int, xp):
    """Per block: any valid token, min and max valid segment. seg: [B, Sp]."""
    b, sp = seg.shape
    s = seg.reshape(b, sp // block, block)
    valid = s >= 0
    big = np.iinfo(np.int32).max
    smin = xp.min(xp.where(valid, s, big), axis=-1)
    smax = xp.max(xp.where(valid, s, -1), axis=-1)
    return xp.any(valid, axis=-1), smin, smax


def segment_block_mask(segment_ids: jax.Array, *, block_q: int, block_k: int) -> jax.Array:
    """[B, 1, nq, nk] bool: block pairs that can hold an allowed (q, k) pair.

    Key block j is kept for query block i iff it is causally reachable, both
    blocks hold a valid token and the key block holds segment 0 or its
    segment range ``[min, max]`` meets the query block's. Segments of a block
    are a subset of its range, so this is a superset of the reachable pairs
    for any layout, and exact for the monotone Prefix Grouper layout.
    Traceable (``segment_ids`` may be a tracer).
    """
    xp = _xp(segment_ids)
    seg = xp.asarray(segment_ids).astype(np.int32)
    if seg.ndim != 2:
        raise ValueError(f"segment_ids must be [B, S], got shape {seg.shape}")
    sp, nq, nk = _grid(seg.shape[1], block_q, block_k)
    seg = xp.pad(seg, ((0, 0), (0, sp - seg.shape[1])), constant_values=-1)
    q_any, q_min, q_max = _block_seg_stats(seg, block_q, xp)
    k_any, k_min, k_max = _block_seg_stats(seg, block_k, xp)
    causal = causal_block_mask(segment_ids.shape[1], block_q=block_q, block_k=block_k)[0, 0]
    overlap = (k_max[:, None, :] >= q_min[:, :, None]) & (k_min[:, None, :] <= q_max[:, :, None])
    shared = (k_min == 0)[:, None, :]
    live = causal[None] & q_any[:, :, None] & k_any[:, None, :] & (overlap | shared)
    return live[:, None]


def streaming_block_mask(
    seq_len: int,
    *,
    streaming_heads,
    sink_blocks: int,
    local_blocks: int,
    block_q: int,
    block_k: int,
) -> np.ndarray:
    """[1, H, nq, nk] bool Λ-mask for streaming heads, causal-dense for the rest.

    ``streaming_heads``: [H] bools (per *query* head; repeat a per-KV-head
    choice ``group`` times). For a streaming head, key block j is kept for
    query block i iff j < ``sink_blocks`` or ``jl - local_blocks < j ≤ jl``
    with ``jl`` the key block holding query block i's last token (LServe's
    block-wise Λ mask); always intersected with the causal block mask.
    """
    heads = np.asarray(streaming_heads, bool)
    if heads.ndim != 1 or heads.size == 0:
        raise ValueError(f"streaming_heads must be a non-empty [H] bool array, got shape {heads.shape}")
    if sink_blocks < 0 or local_blocks < 1:
        raise ValueError(
            f"need sink_blocks >= 0 and local_blocks >= 1, got sink_blocks={sink_blocks}, "
            f"local_blocks={local_blocks}"
        )
    causal = causal_block_mask(seq_len, block_q=block_q, block_k=block_k)[0, 0]
    nq, nk = causal.shape
    jl = ((np.arange(nq) + 1) * block_q - 1) // block_k
    j = np.arange(nk)
    lam = (j[None, :] < sink_blocks) | (
        (j[None, :] <= jl[:, None]) & (j[None, :] > jl[:, None] - local_blocks)
    )
    per_head = np.where(heads[:, None, None], lam[None] & causal[None], causal[None])
    return per_head[None]


# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Index lists driving the kernel. Bs ∈ {1, B} rows, Hs ∈ {1, H} heads.

    kv_index: [Bs, Hs, nq, Mk] int32, key blocks visited by each query block,
      ascending, padded by repeating the last entry (so the pipeline issues no
      extra copies for padded steps).
    kv_count: [Bs, Hs, nq] int32, number of valid entries in ``kv_index``.
    q_index:  [Bs, Hs, nk, Mq] int32, query blocks that visit each key block
      (the transposed schedule, for the dK/dV backward kernel).
    q_count:  [Bs, Hs, nk] int32.
    block_mask: [Bs, Hs, nq, nk] bool, the block pairs (defines the pattern).
    block_q, block_k, seq_len: static.
    """

    kv_index: jax.Array
    kv_count: jax.Array
    q_index: jax.Array
    q_count: jax.Array
    block_mask: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_k: int = dataclasses.field(metadata=dict(static=True))
    seq_len: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_kv_steps(self) -> int:
        return self.kv_index.shape[-1]

    @property
    def num_q_steps(self) -> int:
        return self.q_index.shape[-1]


def _index_lists(mask, max_steps: int, xp):
    """mask [..., n, m] → ascending true indices [..., n, max_steps], counts."""
    m = mask.shape[-1]
    count = xp.sum(mask, axis=-1).astype(np.int32)
    # Stable sort puts the kept indices first, in ascending order.
    keys = xp.where(mask, 0, 1)
    order = xp.argsort(keys, axis=-1, stable=True) if xp is jnp else np.argsort(keys, axis=-1, kind="stable")
    order = order.astype(np.int32)[..., :max_steps]
    if max_steps > m:
        order = xp.pad(order, [(0, 0)] * (order.ndim - 1) + [(0, max_steps - m)])
    steps = xp.arange(max_steps, dtype=np.int32)
    last = xp.take_along_axis(order, xp.maximum(count - 1, 0)[..., None], axis=-1)
    index = xp.where(steps < count[..., None], order, last)
    return index.astype(np.int32), count


def make_schedule(
    block_mask,
    *,
    seq_len: int,
    block_q: int,
    block_k: int,
    max_kv_steps: int | None = None,
    max_q_steps: int | None = None,
) -> BlockSchedule:
    """Build a :class:`BlockSchedule` from a [Bs, Hs, nq, nk] block mask.

    ``max_kv_steps`` / ``max_q_steps`` fix the (static) number of reduction
    steps; by default they are the largest count when ``block_mask`` is
    concrete and nk / nq when it is traced. A count above the given maximum
    raises when concrete; under tracing, the caller guarantees it.
    """
    _, nq, nk = _grid(seq_len, block_q, block_k)
    xp = _xp(block_mask)
    mask = xp.asarray(block_mask).astype(bool)
    if mask.ndim != 4 or mask.shape[2:] != (nq, nk):
        raise ValueError(
            f"block_mask must be [Bs, Hs, {nq}, {nk}] for seq_len={seq_len}, "
            f"block_q={block_q}, block_k={block_k}; got shape {mask.shape}"
        )
    kv_counts = mask.sum(-1) if xp is np else None
    q_counts = mask.sum(-2) if xp is np else None
    need_kv = max(1, int(kv_counts.max())) if kv_counts is not None else nk
    need_q = max(1, int(q_counts.max())) if q_counts is not None else nq
    if max_kv_steps is not None and kv_counts is not None and need_kv > max_kv_steps:
        raise ValueError(f"max_kv_steps={max_kv_steps} is below the largest key-block count {need_kv}")
    if max_q_steps is not None and q_counts is not None and need_q > max_q_steps:
        raise ValueError(f"max_q_steps={max_q_steps} is below the largest query-block count {need_q}")
    mk = max_kv_steps if max_kv_steps is not None else need_kv
    mq = max_q_steps if max_q_steps is not None else need_q
    kv_index, kv_count = _index_lists(mask, mk, xp)
    q_index, q_count = _index_lists(xp.swapaxes(mask, -1, -2), mq, xp)
    return BlockSchedule(
        kv_index=kv_index,
        kv_count=kv_count,
        q_index=q_index,
        q_count=q_count,
        block_mask=mask,
        block_q=int(block_q),
        block_k=int(block_k),
        seq_len=int(seq_len),
    )


def dense_causal_schedule(seq_len: int, *, block_q: int, block_k: int) -> BlockSchedule:
    """All causally reachable blocks (the dense kernel)."""
    mask = causal_block_mask(seq_len, block_q=block_q, block_k=block_k)
    return make_schedule(mask, seq_len=seq_len, block_q=block_q, block_k=block_k)


def prefix_grouper_schedule(
    segment_ids: jax.Array,
    *,
    block_q: int,
    block_k: int,
    max_kv_steps: int | None = None,
    max_q_steps: int | None = None,
) -> BlockSchedule:
    """Schedule for packed rows (Prefix Grouper and/or padding): [B, 1, ...]."""
    mask = segment_block_mask(segment_ids, block_q=block_q, block_k=block_k)
    return make_schedule(
        mask,
        seq_len=segment_ids.shape[1],
        block_q=block_q,
        block_k=block_k,
        max_kv_steps=max_kv_steps,
        max_q_steps=max_q_steps,
    )


def streaming_schedule(
    seq_len: int,
    *,
    streaming_heads,
    sink_blocks: int,
    local_blocks: int,
    block_q: int,
    block_k: int,
    segment_ids: jax.Array | None = None,
) -> BlockSchedule:
    """Streaming heads (Λ mask) with dense heads; optionally ∧ the segment mask."""
    mask = streaming_block_mask(
        seq_len,
        streaming_heads=streaming_heads,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        block_q=block_q,
        block_k=block_k,
    )
    if segment_ids is not None:
        if segment_ids.shape[1] != seq_len:
            raise ValueError(f"segment_ids length {segment_ids.shape[1]} != seq_len {seq_len}")
        mask = mask & segment_block_mask(segment_ids, block_q=block_q, block_k=block_k)
    return make_schedule(mask, seq_len=seq_len, block_q=block_q, block_k=block_k)


# --------------------------------------------------------------------------- #
# Element-level masks (for the reference)
# --------------------------------------------------------------------------- #


def token_mask(segment_ids: jax.Array | None, seq_len: int, batch: int = 1) -> jax.Array:
    """[B, 1, S, S] bool token rule: causal ∧ valid ∧ (seg_k = seg_q ∨ seg_k = 0)."""
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, seq_len), jnp.int32)
    seg = jnp.asarray(segment_ids, jnp.int32)
    qs, ks = seg[:, :, None], seg[:, None, :]
    idx = jnp.arange(seg.shape[1])
    causal = idx[None, :] <= idx[:, None]
    allowed = causal[None] & (qs >= 0) & (ks >= 0) & ((ks == qs) | (ks == 0))
    return allowed[:, None]


def element_mask(schedule: BlockSchedule, segment_ids: jax.Array | None = None, batch: int = 1) -> jax.Array:
    """[B, Hs, S, S] bool: the exact mask the kernel applies for ``schedule``."""
    s = schedule.seq_len
    bm = jnp.repeat(jnp.repeat(schedule.block_mask, schedule.block_q, axis=2), schedule.block_k, axis=3)
    bm = bm[:, :, :s, :s]
    return token_mask(segment_ids, s, batch) & bm


# --------------------------------------------------------------------------- #
# Prefix Grouper packing (arXiv 2506.05433, formulas.md §9)
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedGroup:
    """One packed row ``[prompt | c1 | … | cG | pad]`` of length S = Lp + G·T.

    tokens:       [S] int32, pad tokens are ``pad_id``.
    segment_ids:  [S] int32, 0 prompt, i completion i (1-based), -1 padding.
    positions:    [S] int32, prompt 0…Lp'-1, every completion restarts at the
                  prompt length Lp' (``prompt_len``), padding 0.
    token_index:  [G, T] int32, packed slot of completion token t of ci.
    logit_index:  [G, T] int32, packed slot whose output predicts that token:
                  the last prompt slot for t = 0, else ``token_index - 1``.
    completion_mask: [G, T] bool, t < len_i.
    """

    tokens: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    token_index: jax.Array
    logit_index: jax.Array
    completion_mask: jax.Array


def prefix_grouper_pack(prompt_ids, prompt_len, completion_ids, completion_lens, *, pad_id: int = 0) -> PackedGroup:
    """Pack one prompt and its G completions into a single row.

    prompt_ids: [Lp] (the prompt is ``prompt_ids[:prompt_len]``, right padded);
    completion_ids: [G, T] (completion i is ``completion_ids[i, :completion_lens[i]]``).
    Pure jnp with static shapes (vmap over prompts for a batch). Padded
    entries of ``token_index``/``logit_index`` point at slot 0; mask them with
    ``completion_mask``.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    completion_ids = jnp.asarray(completion_ids, jnp.int32)
    if prompt_ids.ndim != 1 or completion_ids.ndim != 2:
        raise ValueError(
            f"prompt_ids must be [Lp] and completion_ids [G, T], got {prompt_ids.shape}, {completion_ids.shape}"
        )
    lp = prompt_ids.shape[0]
    g, t = completion_ids.shape
    s = lp + g * t
    plen = jnp.asarray(prompt_len, jnp.int32)
    lens = jnp.asarray(completion_lens, jnp.int32)
    if lens.shape != (g,):
        raise ValueError(f"completion_lens must be [G]={g}, got shape {lens.shape}")
    ends = plen + jnp.cumsum(lens)  # [G] exclusive end of completion i
    starts = ends - lens
    slot = jnp.arange(s, dtype=jnp.int32)
    comp = jnp.searchsorted(ends, slot, side="right").astype(jnp.int32)  # 0-based completion
    in_prompt = slot < plen
    in_comp = (~in_prompt) & (slot < ends[-1])
    comp_c = jnp.minimum(comp, g - 1)
    offset = slot - starts[comp_c]
    seg = jnp.where(in_prompt, 0, jnp.where(in_comp, comp_c + 1, -1))
    tok_prompt = prompt_ids[jnp.minimum(slot, lp - 1)]
    tok_comp = completion_ids[comp_c, jnp.clip(offset, 0, t - 1)]
    tokens = jnp.where(in_prompt, tok_prompt, jnp.where(in_comp, tok_comp, pad_id))
    positions = jnp.where(in_prompt, slot, jnp.where(in_comp, plen + offset, 0))
    tt = jnp.arange(t, dtype=jnp.int32)
    cmask = tt[None, :] < lens[:, None]
    token_index = jnp.where(cmask, starts[:, None] + tt[None, :], 0)
    logit_index = jnp.where(cmask, jnp.where(tt[None, :] == 0, plen - 1, token_index - 1), 0)
    return PackedGroup(
        tokens=tokens.astype(jnp.int32),
        segment_ids=seg.astype(jnp.int32),
        positions=positions.astype(jnp.int32),
        token_index=token_index.astype(jnp.int32),
        logit_index=logit_index.astype(jnp.int32),
        completion_mask=cmask,
    )


def prefix_grouper_unpack(packed_values: jax.Array, index: jax.Array, mask: jax.Array) -> jax.Array:
    """Gather per-completion values [G, T, ...] from a packed row [S, ...].

    ``index`` is ``PackedGroup.logit_index`` (to align logits/log-probs with the
    completion tokens they predict) or ``token_index``; entries where ``mask``
    is False are zero.
    """
    out = packed_values[index]
    m = mask.reshape(mask.shape + (1,) * (out.ndim - mask.ndim))
    return jnp.where(m, out, jnp.zeros((), out.dtype))


def naive_group_rows(prompt_ids, prompt_len, completion_ids, completion_lens, *, pad_id: int = 0):
    """The repeated-prompt baseline: G rows ``[prompt | ci | pad]`` of length Lp + T.

    Returns (tokens [G, Lp+T], segment_ids [G, Lp+T] with 0 valid / -1 pad,
    positions [G, Lp+T], logit_index [G, T], completion_mask [G, T]), where
    ``logit_index`` gives the slot in the row predicting completion token t.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    completion_ids = jnp.asarray(completion_ids, jnp.int32)
    lp = prompt_ids.shape[0]
    g, t = completion_ids.shape
    plen = jnp.asarray(prompt_len, jnp.int32)
    lens = jnp.asarray(completion_lens, jnp.int32)
    slot = jnp.arange(lp + t, dtype=jnp.int32)
    in_prompt = slot < plen
    off = slot - plen
    in_comp = (~in_prompt)[None, :] & (off[None, :] < lens[:, None])
    tok_comp = jnp.take_along_axis(completion_ids, jnp.clip(off, 0, t - 1)[None, :].repeat(g, 0), axis=1)
    tokens = jnp.where(in_prompt[None, :], prompt_ids[jnp.minimum(slot, lp - 1)][None, :],
                       jnp.where(in_comp, tok_comp, pad_id))
    valid = in_prompt[None, :] | in_comp
    seg = jnp.where(valid, 0, -1)
    positions = jnp.where(valid, slot[None, :], 0)
    tt = jnp.arange(t, dtype=jnp.int32)
    cmask = tt[None, :] < lens[:, None]
    logit_index = jnp.where(cmask, plen - 1 + tt[None, :], 0)
    return (tokens.astype(jnp.int32), seg.astype(jnp.int32), positions.astype(jnp.int32),
            jnp.broadcast_to(logit_index, (g, t)).astype(jnp.int32), cmask)
