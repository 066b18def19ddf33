"""Block-sparse causal flash attention driven by a block schedule (Pallas).

One kernel serves dense causal attention (the all-blocks schedule), Prefix
Grouper packed rows (arXiv 2506.05433) and LServe streaming heads (arXiv
2502.14866); see ``attention_schedules.py`` for the patterns and the exact
masking rule. For query token a and key token c the kernel computes

    O_a = Σ_c P_ac V_c,   P_ac = exp(s_ac − lse_a) · M_ac,   s_ac = scale · q_a·k_c,
    lse_a = log Σ_c M_ac exp(s_ac),

with M the element mask (token rule ∧ scheduled block pair) and f32
accumulation (online softmax over the scheduled key blocks, FlashAttention-2).
Query rows with no allowed key (padding) output 0 and get zero gradients.

Backward (FlashAttention-2): with D_a = Σ_d dO_ad O_ad,
    dV_c = Σ_a P_ac dO_a,  dS_ac = P_ac (dO_a·V_c − D_a),
    dQ_a = scale Σ_c dS_ac K_c,  dK_c = scale Σ_a dS_ac Q_a,
computed by two kernels: dQ walks the forward schedule, dK/dV walks the
transposed schedule and, for GQA, also the G query heads sharing a KV head, so
dK/dV are reduced in-kernel without a [B, S, H, Dh] intermediate.

Layout (model contract): q [B, S, H, Dh], k/v [B, S, K, Dh] with H = K·G,
``segment_ids`` [B, S] int (−1 = padding). Output [B, S, H, Dh] in q's dtype.
Positions are not needed: causality is in packed order (the Prefix Grouper
positions only drive RoPE, applied before this call).

Backends: ``"tpu"`` (Mosaic; schedule scalar-prefetched through
``pltpu.PrefetchScalarGridSpec``, grid (B, H, nq, steps) with the last axis
sequential; head-major [B, H, S, Dh] operands so blocks are (block, Dh) tiles;
segment ids, lse and D are passed as [.., 1, S] rows and turned into columns
in-kernel; the forward writes lse lane-broadcast [B, H, S, 128] as JAX's splash
attention does; padded schedule steps repeat the last block index so the
pipeline issues no copy; on hardware block sizes must be multiples of 128,
checked), ``"gpu"``
(Triton; grid (B, H, nq), the schedule is an int array input walked by a
``fori_loop``; block sizes and Dh powers of two, ≥ 16 on hardware),
``"reference"`` (pure jnp, :func:`reference_attention` on the element mask),
chosen by ``rlx_kernels.dispatch.resolve_backend``; a kernel forced off its
hardware runs in Pallas interpret mode (TPU: ``pltpu.InterpretParams()``,
GPU: ``interpret=True``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from rlx_kernels import attention_schedules as sched_lib
from rlx_kernels import dispatch
from rlx_kernels.attention_schedules import BlockSchedule

__all__ = [
    "block_sparse_attention",
    "dense_attention",
    "reference_attention",
    "reference_block_sparse_attention",
]

NEG = -1e30  # finite "minus infinity": keeps exp/max free of inf − inf
LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #


def reference_attention(q, k, v, mask, *, sm_scale: float | None = None):
    """Masked softmax attention in f32. q [B,S,H,Dh], k/v [B,S,K,Dh], mask [B|1, H|1, S, S].

    Rows with no allowed key give 0.
    """
    b, s, h, d = q.shape
    kh = k.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    kk = jnp.repeat(k.astype(jnp.float32), h // kh, axis=2)
    vv = jnp.repeat(v.astype(jnp.float32), h // kh, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk) * scale
    mask = jnp.broadcast_to(mask, (b, h, s, s))
    logits = jnp.where(mask, logits, NEG)
    mx = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - mx) * mask
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv).astype(q.dtype)


def reference_block_sparse_attention(q, k, v, schedule: BlockSchedule, *, segment_ids=None, sm_scale=None):
    """The reference on the exact element mask of ``schedule``."""
    mask = sched_lib.element_mask(schedule, segment_ids, batch=q.shape[0])
    return reference_attention(q, k, v, mask, sm_scale=sm_scale)


# --------------------------------------------------------------------------- #
# Shared block math
# --------------------------------------------------------------------------- #


def _allowed(q_pos, k_pos, q_seg, k_seg):
    """Token rule; arguments broadcast to one block (any orientation)."""
    return (k_pos <= q_pos) & (q_seg >= 0) & (k_seg >= 0) & ((k_seg == q_seg) | (k_seg == 0))


def _block_mask(q_start, k_start, bq, bk, q_seg_col, k_seg_row):
    """[bq, bk] mask, queries on rows."""
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return _allowed(q_pos, k_pos, q_seg_col, k_seg_row)


def _block_mask_t(q_start, k_start, bq, bk, q_seg_row, k_seg_col):
    """[bk, bq] mask, keys on rows."""
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    return _allowed(q_pos, k_pos, q_seg_row, k_seg_col)


def _online_step(q, k, v, mask, m_prev, l_prev, acc_prev, scale):
    """One online-softmax update; m/l are [bq, 1], acc [bq, Dh] (f32)."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    return m_new, l_new, acc_new


def _finish(m, l, acc):
    ok = l > 0
    safe_l = jnp.where(ok, l, 1.0)
    out = jnp.where(ok, acc / safe_l, 0.0)
    lse = jnp.where(ok, m + jnp.log(safe_l), 0.0)
    return out, lse


def _dq_step(q, k, v, do, lse_col, delta_col, mask, scale):
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, NEG) - lse_col), 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_col)
    return lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32) * scale


def _dkv_step(q, k, v, do, lse_row, delta_row, mask_t, scale):
    """Contributions to dK, dV of one (key block, query block) pair, keys on rows."""
    st = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * scale
    pt = jnp.where(mask_t, jnp.exp(jnp.where(mask_t, st, NEG) - lse_row), 0.0)
    dv = lax.dot_general(pt.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
    dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
    dst = pt * (dpt - delta_row)
    dk = lax.dot_general(dst.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32) * scale
    return dk, dv


# --------------------------------------------------------------------------- #
# TPU (Mosaic) kernels, layout [B, H, S, Dh]
# --------------------------------------------------------------------------- #


def _pick(x, per):
    return x if per else 0


def _tpu_fwd_kernel(kv_idx, kv_cnt, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                    m_scr, l_scr, acc_scr, *, scale, bq, bk, per_b, per_h, steps):
    b, h, i, t = (pl.program_id(n) for n in range(4))
    sb, sh = _pick(b, per_b), _pick(h, per_h)

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(t < kv_cnt[sb, sh, i])
    def _step():
        j = kv_idx[sb, sh, i, t]
        mask = _block_mask(i * bq, j * bk, bq, bk, qseg_ref[0][:, None], kseg_ref[...])
        m, l, acc = _online_step(q_ref[...], k_ref[...], v_ref[...], mask, m_scr[...][:, :1],
                                 l_scr[...][:, :1], acc_scr[...], scale)
        m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
        acc_scr[...] = acc

    @pl.when(t == steps - 1)
    def _write():
        out, lse = _finish(m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _tpu_dq_kernel(kv_idx, kv_cnt, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                   dq_ref, dq_scr, *, scale, bq, bk, per_b, per_h, steps):
    b, h, i, t = (pl.program_id(n) for n in range(4))
    sb, sh = _pick(b, per_b), _pick(h, per_h)

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(t < kv_cnt[sb, sh, i])
    def _step():
        j = kv_idx[sb, sh, i, t]
        mask = _block_mask(i * bq, j * bk, bq, bk, qseg_ref[0][:, None], kseg_ref[...])
        dq_scr[...] += _dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[0][:, None],
                                delta_ref[0][:, None], mask, scale)

    @pl.when(t == steps - 1)
    def _write():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_idx, q_cnt, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                    dk_ref, dv_ref, dk_scr, dv_scr, *, scale, bq, bk, per_b, per_h, steps, group):
    b, kh, j, t = (pl.program_id(n) for n in range(4))
    g, u = t // steps, t % steps
    sb, sh = _pick(b, per_b), _pick(kh * group + g, per_h)

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(u < q_cnt[sb, sh, j])
    def _step():
        i = q_idx[sb, sh, j, u]
        mask_t = _block_mask_t(i * bq, j * bk, bq, bk, qseg_ref[...], kseg_ref[0][:, None])
        dk, dv = _dkv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                           mask_t, scale)
        dk_scr[...] += dk
        dv_scr[...] += dv

    @pl.when(t == group * steps - 1)
    def _write():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_params(n_parallel):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _tpu_forward(q, k, v, seg, schedule, scale, interpret):
    """q [B,H,Sp,Dh], k/v [B,K,Sp,Dh], seg [B,1,Sp] → o [B,H,Sp,Dh], lse [B,H,Sp]."""
    bsz, h, sp, d = q.shape
    group = h // k.shape[1]
    bq, bk = schedule.block_q, schedule.block_k
    per_b, per_h = schedule.kv_index.shape[0] > 1, schedule.kv_index.shape[1] > 1
    steps = schedule.num_kv_steps
    kern = functools.partial(_tpu_fwd_kernel, scale=scale, bq=bq, bk=bk, per_b=per_b, per_h=per_h, steps=steps)

    def kv_map(b, hh, i, t, idx, cnt):
        return (b, hh // group, idx[_pick(b, per_b), _pick(hh, per_h), i, t], 0)

    def kseg_map(b, hh, i, t, idx, cnt):
        return (b, 0, idx[_pick(b, per_b), _pick(hh, per_h), i, t])

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(bsz, h, sp // bq, steps),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda b, hh, i, t, *_: (b, hh, i, 0)),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, 1, bq), lambda b, hh, i, t, *_: (b, 0, i)),
            pl.BlockSpec((None, 1, bk), kseg_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), lambda b, hh, i, t, *_: (b, hh, i, 0)),
            pl.BlockSpec((None, None, bq, LANES), lambda b, hh, i, t, *_: (b, hh, i, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        kern,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, h, sp, LANES), jnp.float32)],
        compiler_params=_tpu_params(3),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(schedule.kv_index, schedule.kv_count, q, k, v, seg, seg)
    return o, lse[..., 0]


def _tpu_backward(q, k, v, seg, schedule, o, lse, do, scale, interpret):
    """All in [B, H|K, Sp, Dh]; lse [B,H,Sp]. Returns dq, dk, dv."""
    bsz, h, sp, d = q.shape
    kvh = k.shape[1]
    group = h // kvh
    bq, bk = schedule.block_q, schedule.block_k
    per_b, per_h = schedule.kv_index.shape[0] > 1, schedule.kv_index.shape[1] > 1
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    lse_r, delta_r = lse[:, :, None, :], delta[:, :, None, :]  # [B,H,1,Sp] rows

    # dQ: forward schedule.
    ksteps = schedule.num_kv_steps

    def kv_map(b, hh, i, t, idx, cnt):
        return (b, hh // group, idx[_pick(b, per_b), _pick(hh, per_h), i, t], 0)

    def kseg_map(b, hh, i, t, idx, cnt):
        return (b, 0, idx[_pick(b, per_b), _pick(hh, per_h), i, t])

    q_map = lambda b, hh, i, t, *_: (b, hh, i, 0)  # noqa: E731
    row_map = lambda b, hh, i, t, *_: (b, hh, 0, i)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, scale=scale, bq=bq, bk=bk, per_b=per_b, per_h=per_h, steps=ksteps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, h, sp // bq, ksteps),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, 1, bq), lambda b, hh, i, t, *_: (b, 0, i)),
                pl.BlockSpec((None, 1, bk), kseg_map),
            ],
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_tpu_params(3),
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(schedule.kv_index, schedule.kv_count, q, k, v, do, lse_r, delta_r, seg, seg)

    # dK, dV: transposed schedule, reduced over the G query heads of each KV head.
    qsteps = schedule.num_q_steps

    def head(kh, t):
        return kh * group + t // qsteps

    def qblk(b, kh, j, t, idx):
        return idx[_pick(b, per_b), _pick(head(kh, t), per_h), j, t % qsteps]

    def qd_map(b, kh, j, t, idx, cnt):
        return (b, head(kh, t), qblk(b, kh, j, t, idx), 0)

    def qrow_map(b, kh, j, t, idx, cnt):
        return (b, head(kh, t), 0, qblk(b, kh, j, t, idx))

    def qseg_map(b, kh, j, t, idx, cnt):
        return (b, 0, qblk(b, kh, j, t, idx))

    kv_blk = lambda b, kh, j, t, *_: (b, kh, j, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, scale=scale, bq=bq, bk=bk, per_b=per_b, per_h=per_h,
                          steps=qsteps, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, kvh, sp // bk, group * qsteps),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), qd_map),
                pl.BlockSpec((None, None, bk, d), kv_blk),
                pl.BlockSpec((None, None, bk, d), kv_blk),
                pl.BlockSpec((None, None, bq, d), qd_map),
                pl.BlockSpec((None, None, 1, bq), qrow_map),
                pl.BlockSpec((None, None, 1, bq), qrow_map),
                pl.BlockSpec((None, 1, bq), qseg_map),
                pl.BlockSpec((None, 1, bk), lambda b, kh, j, t, *_: (b, 0, j)),
            ],
            out_specs=[pl.BlockSpec((None, None, bk, d), kv_blk), pl.BlockSpec((None, None, bk, d), kv_blk)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_tpu_params(3),
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(schedule.q_index, schedule.q_count, q, k, v, do, lse_r, delta_r, seg, seg)
    return dq, dk, dv


# --------------------------------------------------------------------------- #
# GPU (Triton) kernels, layout [B, S, H, Dh]
# --------------------------------------------------------------------------- #


def _full_spec(x):
    zeros = (0,) * x.ndim
    return pl.BlockSpec(x.shape, lambda *_: zeros)


def _gpu_params(d):
    return pltriton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _gpu_fwd_kernel(kv_idx, kv_cnt, q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, scale, bq, bk, per_b,
                    per_h):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sb, sh = _pick(b, per_b), _pick(h, per_h)
    q = q_ref[...]
    q_seg = seg_ref[pl.ds(i * bq, bq)][:, None]
    d = q.shape[-1]

    def body(t, carry):
        j = kv_idx[sb, sh, i, t]
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = _block_mask(i * bq, j * bk, bq, bk, q_seg, seg_ref[pl.ds(j * bk, bk)][None, :])
        return _online_step(q, k, v, mask, *carry, scale)

    init = (jnp.full((bq, 1), NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, kv_cnt[sb, sh, i], body, init)
    out, lse = _finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _gpu_dq_kernel(kv_idx, kv_cnt, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dq_ref, *, scale, bq,
                   bk, per_b, per_h):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sb, sh = _pick(b, per_b), _pick(h, per_h)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg = seg_ref[pl.ds(i * bq, bq)][:, None]

    def body(t, dq):
        j = kv_idx[sb, sh, i, t]
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = _block_mask(i * bq, j * bk, bq, bk, q_seg, seg_ref[pl.ds(j * bk, bk)][None, :])
        return dq + _dq_step(q, k, v, do, lse, delta, mask, scale)

    dq = lax.fori_loop(0, kv_cnt[sb, sh, i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_idx, q_cnt, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dk_ref, dv_ref, *,
                    scale, bq, bk, per_b, per_h, group):
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    sb = _pick(b, per_b)
    k, v = k_ref[...], v_ref[...]
    k_seg = seg_ref[pl.ds(j * bk, bk)][:, None]

    def head_body(g, carry):
        sh = _pick(kh * group + g, per_h)

        def body(u, acc):
            i = q_idx[sb, sh, j, u]
            rows = pl.ds(i * bq, bq)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            mask_t = _block_mask_t(i * bq, j * bk, bq, bk, seg_ref[rows][None, :], k_seg)
            dk, dv = _dkv_step(q, k, v, do, lse_ref[g, rows][None, :], delta_ref[g, rows][None, :], mask_t, scale)
            return acc[0] + dk, acc[1] + dv

        return lax.fori_loop(0, q_cnt[sb, sh, j], body, carry)

    zero = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_body, (zero, zero))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_forward(q, k, v, seg, schedule, scale, interpret):
    """q [B,Sp,H,Dh], k/v [B,Sp,K,Dh], seg [B,Sp] → o [B,Sp,H,Dh], lse [B,H,Sp]."""
    bsz, sp, h, d = q.shape
    group = h // k.shape[2]
    bq, bk = schedule.block_q, schedule.block_k
    per_b, per_h = schedule.kv_index.shape[0] > 1, schedule.kv_index.shape[1] > 1
    kern = functools.partial(_gpu_fwd_kernel, scale=scale, bq=bq, bk=bk, per_b=per_b, per_h=per_h)
    o, lse = pl.pallas_call(
        kern,
        grid=(bsz, h, sp // bq),
        in_specs=[
            _full_spec(schedule.kv_index),
            _full_spec(schedule.kv_count),
            pl.BlockSpec((None, bq, None, d), lambda b, hh, i: (b, i, hh, 0)),
            pl.BlockSpec((None, sp, None, d), lambda b, hh, i: (b, 0, hh // group, 0)),
            pl.BlockSpec((None, sp, None, d), lambda b, hh, i: (b, 0, hh // group, 0)),
            pl.BlockSpec((None, sp), lambda b, hh, i: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda b, hh, i: (b, i, hh, 0)),
            pl.BlockSpec((None, None, bq), lambda b, hh, i: (b, hh, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, h, sp), jnp.float32)],
        compiler_params=_gpu_params(d),
        interpret=interpret,
        name="block_sparse_attention_fwd_gpu",
    )(schedule.kv_index, schedule.kv_count, q, k, v, seg)
    return o, lse


def _gpu_backward(q, k, v, seg, schedule, o, lse, do, scale, interpret):
    bsz, sp, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    bq, bk = schedule.block_q, schedule.block_k
    per_b, per_h = schedule.kv_index.shape[0] > 1, schedule.kv_index.shape[1] > 1
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b, hh, i: (b, i, hh, 0))
    kv_full = pl.BlockSpec((None, sp, None, d), lambda b, hh, i: (b, 0, hh // group, 0))
    row = pl.BlockSpec((None, None, bq), lambda b, hh, i: (b, hh, i))
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, scale=scale, bq=bq, bk=bk, per_b=per_b, per_h=per_h),
        grid=(bsz, h, sp // bq),
        in_specs=[
            _full_spec(schedule.kv_index),
            _full_spec(schedule.kv_count),
            q_spec, kv_full, kv_full, q_spec, row, row,
            pl.BlockSpec((None, sp), lambda b, hh, i: (b, 0)),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_gpu_params(d),
        interpret=interpret,
        name="block_sparse_attention_dq_gpu",
    )(schedule.kv_index, schedule.kv_count, q, k, v, do, lse, delta, seg)

    kv_blk = pl.BlockSpec((None, bk, None, d), lambda b, kh, j: (b, j, kh, 0))
    q_group = pl.BlockSpec((None, sp, group, d), lambda b, kh, j: (b, 0, kh, 0))
    rows_group = pl.BlockSpec((None, group, sp), lambda b, kh, j: (b, kh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, scale=scale, bq=bq, bk=bk, per_b=per_b, per_h=per_h, group=group),
        grid=(bsz, kvh, sp // bk),
        in_specs=[
            _full_spec(schedule.q_index),
            _full_spec(schedule.q_count),
            q_group, kv_blk, kv_blk, q_group, rows_group, rows_group,
            pl.BlockSpec((None, sp), lambda b, kh, j: (b, 0)),
        ],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_gpu_params(d),
        interpret=interpret,
        name="block_sparse_attention_dkv_gpu",
    )(schedule.q_index, schedule.q_count, q, k, v, do, lse, delta, seg)
    return dq, dk, dv


# --------------------------------------------------------------------------- #
# Custom VJP over padded inputs, layout [B, Sp, H, Dh]
# --------------------------------------------------------------------------- #


def _to_bhsd(x):
    return jnp.swapaxes(x, 1, 2)


def _fwd_impl(q, k, v, seg, schedule, scale, backend, interpret):
    if backend == "tpu":
        o, lse = _tpu_forward(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), seg[:, None, :], schedule, scale, interpret)
        return _to_bhsd(o), lse
    return _gpu_forward(q, k, v, seg, schedule, scale, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, seg, schedule, scale, backend, interpret):
    return _fwd_impl(q, k, v, seg, schedule, scale, backend, interpret)[0]


def _attention_fwd(q, k, v, seg, schedule, scale, backend, interpret):
    o, lse = _fwd_impl(q, k, v, seg, schedule, scale, backend, interpret)
    return o, (q, k, v, seg, schedule, o, lse)


def _attention_bwd(scale, backend, interpret, res, do):
    q, k, v, seg, schedule, o, lse = res
    if backend == "tpu":
        dq, dk, dv = _tpu_backward(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), seg[:, None, :], schedule, _to_bhsd(o),
                                   lse, _to_bhsd(do), scale, interpret)
        dq, dk, dv = _to_bhsd(dq), _to_bhsd(dk), _to_bhsd(dv)
    else:
        dq, dk, dv = _gpu_backward(q, k, v, seg, schedule, o, lse, do, scale, interpret)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------- #
# Public wrappers
# --------------------------------------------------------------------------- #


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_inputs(q, k, v, schedule, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H|K, Dh], got {q.shape}, {k.shape}, {v.shape}")
    b, s, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != d:
        raise ValueError(f"k and v must be [B={b}, S={s}, K, Dh={d}], got k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads K={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if schedule.seq_len != s:
        raise ValueError(f"schedule.seq_len={schedule.seq_len} does not match S={s}")
    bs, hs = schedule.kv_index.shape[:2]
    if bs not in (1, b):
        raise ValueError(f"schedule batch dim must be 1 or B={b}, got {bs}")
    if hs not in (1, h):
        raise ValueError(f"schedule head dim must be 1 or H={h}, got {hs}")
    if segment_ids is not None and segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids must be [B, S]=({b}, {s}), got {segment_ids.shape}")


def _check_hardware_blocks(backend, schedule, d):
    bq, bk = schedule.block_q, schedule.block_k
    if backend == "tpu" and (bq % LANES or bk % LANES):
        raise ValueError(f"TPU blocks must be multiples of {LANES}, got block_q={bq}, block_k={bk}")
    if backend == "gpu":
        for name, n in (("block_q", bq), ("block_k", bk), ("head_dim", d)):
            if not _is_pow2(n) or n < 16:
                raise ValueError(f"GPU (Triton) needs {name} a power of two >= 16, got {n}")


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    schedule: BlockSchedule,
    *,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """Causal attention restricted to ``schedule`` (see module docstring).

    q [B,S,H,Dh], k/v [B,S,K,Dh], segment_ids [B,S] (−1 padding; None = all 0).
    ``backend``: "auto" | "tpu" | "gpu" | "reference", resolved by
    :func:`rlx_kernels.dispatch.resolve_backend` (a kernel forced off its
    hardware runs in Pallas interpret mode).
    Returns [B,S,H,Dh] in q's dtype; differentiable in q, k, v.
    """
    _check_inputs(q, k, v, schedule, segment_ids)
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    res = dispatch.resolve_backend(backend)
    if not res.is_kernel:
        return reference_block_sparse_attention(q, k, v, schedule, segment_ids=segment_ids, sm_scale=scale)
    backend, interpret = res.kind, res.interpret
    if not interpret:
        _check_hardware_blocks(backend, schedule, d)
    sp = sched_lib.padded_length(s, schedule.block_q, schedule.block_k)
    seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = ((0, 0), (0, sp - s), (0, 0), (0, 0))
    seg = jnp.pad(seg, ((0, 0), (0, sp - s)), constant_values=-1)
    out = _attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), seg, schedule, scale, backend, interpret)
    return out[:, :s]


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    backend: str = "auto",
) -> jax.Array:
    """Causal attention (all reachable blocks); with ``segment_ids`` the block
    schedule also skips blocks the segments rule out (Prefix Grouper rows,
    padding), which changes cost, not results."""
    s = q.shape[1]
    if segment_ids is None:
        schedule = sched_lib.dense_causal_schedule(s, block_q=block_q, block_k=block_k)
    else:
        schedule = sched_lib.prefix_grouper_schedule(segment_ids, block_q=block_q, block_k=block_k)
    return block_sparse_attention(q, k, v, schedule, segment_ids=segment_ids, sm_scale=sm_scale, backend=backend)
