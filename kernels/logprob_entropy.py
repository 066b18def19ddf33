"""Fused per-token log-prob and entropy, streamed over vocabulary chunks.

For every token n with logits x_n ∈ R^V (or x_n = h_n W from the final hidden
state h_n ∈ R^D and the unembedding W ∈ R^{D×V}) and temperature τ:

    z = x / τ,   lse = log Σ_v exp z_v,
    log p(target) = z_target − lse,
    H = −Σ_v p_v log p_v = lse − Σ_v p_v z_v.

The kernels visit the vocabulary in chunks of ``block_v`` columns and keep, per
row, the online log-sum-exp state (running max m, s = Σ exp(z − m),
t = Σ exp(z − m)·z, and the target logit), so no [N, V] float32 log-softmax is
ever materialised. bfloat16 inputs are upcast per chunk and accumulate in
float32; outputs are float32.

Gradients (custom VJP, recomputed chunk by chunk from the saved lse and H):

    ∂ log p(t)/∂z_v = δ_{v t} − p_v,      ∂H/∂z_v = −p_v (log p_v + H),

so with output cotangents g_lp, g_H:  ∂/∂x_v = (g_lp (δ_{vt} − p_v) − g_H p_v (log p_v + H)) / τ
(terms with p_v = 0, i.e. x_v = −inf, are 0). From logits the Pallas backward
kernel writes dlogits tile by tile (the gradient w.r.t. logits is itself [N, V]).
From hidden states the backward loops (``lax.scan``) over vocabulary chunks of
``bwd_chunk`` columns: logits_c = h W_c (XLA matmul), the Pallas kernel turns
them into dlogits_c, and dh += dlogits_c W_cᵀ, dW_c = hᵀ dlogits_c. Its scratch is
N·bwd_chunk·(4 + itemsize) bytes; the default chunk keeps that ≤ 256 MiB.

Targets are clipped to [0, V−1] (like ``jnp.take_along_axis``'s default
"clip" mode): pass any in-range id (e.g. 0) for padding tokens and mask them
downstream. Rows whose logits are all −inf are invalid input.

Backends (see ``rlx_kernels.dispatch``): "tpu" -- Mosaic kernels on a
(row-block, vocab-block) grid with the vocabulary axis sequential and the
online state in VMEM scratch; edge blocks are masked in-kernel (block_n a
multiple of 8, block_v a multiple of 128). "gpu" -- Triton kernels with one
program per row block that loops over vocabulary chunks with masked loads
(power-of-two blocks; the hidden-state form also loops over D in ``block_d``
chunks and uses ``tl.dot``, so block_n ≥ 16). "reference" -- :func:`reference`,
pure jnp, materialises [N, V] float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from rlx_kernels import dispatch

_NEG_INF = -jnp.inf
_BWD_SCRATCH_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- reference
def reference(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0):
    """Pure-jnp log p(target) and entropy from logits [..., V]; materialises [..., V] f32."""
    z = logits.astype(jnp.float32) / temperature
    v = z.shape[-1]
    lse = jax.nn.logsumexp(z, axis=-1)
    logp_all = z - lse[..., None]
    t = jnp.clip(targets, 0, v - 1).astype(jnp.int32)
    logp = jnp.take_along_axis(logp_all, t[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp_all)
    # double where: p·log p is 0 (value and gradient) where p == 0 (−inf logits)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp_all, 0.0), 0.0), axis=-1)
    return logp, ent


def reference_from_hidden(hidden, unembedding, targets, *, temperature: float = 1.0):
    """Pure-jnp reference from hidden [..., D] and unembedding [D, V]."""
    logits = jnp.einsum(
        "...d,dv->...v", hidden, unembedding, preferred_element_type=jnp.float32
    )
    return reference(logits, targets, temperature=temperature)


# --------------------------------------------------------------------------- shared math
def _online_step(z, col, tgt, n_vocab, m, s, t, zt, keepdims):
    """One vocabulary chunk of the online (max, Σexp, Σexp·z, z_target) update.

    z: [bn, bv] f32 (garbage allowed where col >= n_vocab), col: column ids
    broadcastable to z, tgt: [bn, 1]; state arrays [bn, 1] (keepdims) or [bn].
    """
    bcast = (lambda a: a) if keepdims else (lambda a: a[:, None])
    red = functools.partial(jnp.sum, axis=1, keepdims=keepdims)
    z = jnp.where(col < n_vocab, z, _NEG_INF)
    m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=keepdims))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    e = jnp.exp(z - bcast(m_safe))
    s = alpha * s + red(e)
    t = alpha * t + red(jnp.where(e > 0, e * z, 0.0))
    zt = zt + red(jnp.where(col == tgt, z, 0.0))
    return m_new, s, t, zt


def _finish(m, s, t, zt):
    lse = m + jnp.log(s)
    return zt - lse, lse - t / s, lse


def _dz(z, col, tgt, n_vocab, lse, ent, g_lp, g_ent, inv_temp):
    """d(g_lp·logp + g_ent·H)/d logits for one tile; zero outside the vocabulary."""
    valid = col < n_vocab
    logp = z - lse
    p = jnp.where(valid, jnp.exp(logp), 0.0)
    ent_term = jnp.where(p > 0, p * (logp + ent), 0.0)
    onehot = (col == tgt).astype(jnp.float32)
    return jnp.where(valid, (g_lp * (onehot - p) - g_ent * ent_term) * inv_temp, 0.0)


# --------------------------------------------------------------------------- TPU kernels
def _tpu_fwd_kernel(*refs, n_vocab, bn, bv, temperature, from_hidden):
    if from_hidden:
        tgt_ref, h_ref, w_ref, lp_ref, ent_ref, lse_ref, m_sc, s_sc, t_sc, zt_sc = refs
    else:
        tgt_ref, x_ref, lp_ref, ent_ref, lse_ref, m_sc, s_sc, t_sc, zt_sc = refs
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        t_sc[...] = jnp.zeros(t_sc.shape, jnp.float32)
        zt_sc[...] = jnp.zeros(zt_sc.shape, jnp.float32)

    col = j * bv + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    if from_hidden:
        # Out-of-range W columns / h rows (edge blocks) only reach their own
        # logits columns / rows, which _online_step masks / the writeback drops.
        x = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    else:
        x = x_ref[...].astype(jnp.float32)
    z = x / temperature
    m, s, t, zt = _online_step(
        z, col, tgt_ref[...], n_vocab, m_sc[...], s_sc[...], t_sc[...], zt_sc[...], True
    )
    m_sc[...], s_sc[...], t_sc[...], zt_sc[...] = m, s, t, zt

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        lp, ent, lse = _finish(m_sc[...], s_sc[...], t_sc[...], zt_sc[...])
        lp_ref[...], ent_ref[...], lse_ref[...] = lp, ent, lse


def _tpu_fwd(operands, targets, n, n_vocab, cfg, from_hidden):
    bn, bv = cfg.block_n, cfg.block_v
    grid = (pl.cdiv(n, bn), pl.cdiv(n_vocab, bv))
    row_spec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    if from_hidden:
        d = operands[0].shape[1]
        in_specs = [
            row_spec,
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
        ]
    else:
        in_specs = [row_spec, pl.BlockSpec((bn, bv), lambda i, j: (i, j))]
    out = dispatch.out_struct((n, 1), jnp.float32, targets, *operands)
    kernel = functools.partial(
        _tpu_fwd_kernel, n_vocab=n_vocab, bn=bn, bv=bv,
        temperature=cfg.temperature, from_hidden=from_hidden,
    )
    lp, ent, lse = pl.pallas_call(
        kernel,
        out_shape=(out, out, out),
        grid=grid,
        in_specs=in_specs,
        out_specs=(row_spec, row_spec, row_spec),
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 4,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        interpret=cfg.interpret,
        name="rlx_logprob_entropy_fwd",
    )(targets[:, None], *operands)
    return lp[:, 0], ent[:, 0], lse[:, 0]


def _tpu_dlogits_kernel(tgt_ref, x_ref, lse_ref, ent_ref, glp_ref, gent_ref, dx_ref,
                        *, n_vocab, bn, bv, temperature):
    j = pl.program_id(1)
    col = j * bv + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    z = x_ref[...].astype(jnp.float32) / temperature
    dz = _dz(z, col, tgt_ref[...], n_vocab, lse_ref[...], ent_ref[...],
             glp_ref[...], gent_ref[...], 1.0 / temperature)
    dx_ref[...] = dz.astype(dx_ref.dtype)


def _tpu_dlogits(x, targets, lse, ent, g_lp, g_ent, cfg):
    n, n_vocab = x.shape
    bn, bv = cfg.block_n, cfg.block_v
    row_spec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    tile_spec = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
    kernel = functools.partial(
        _tpu_dlogits_kernel, n_vocab=n_vocab, bn=bn, bv=bv, temperature=cfg.temperature
    )
    return pl.pallas_call(
        kernel,
        out_shape=dispatch.out_struct(x.shape, x.dtype, x, targets, lse, ent, g_lp, g_ent),
        grid=(pl.cdiv(n, bn), pl.cdiv(n_vocab, bv)),
        in_specs=[row_spec, tile_spec, row_spec, row_spec, row_spec, row_spec],
        out_specs=tile_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"),
            vmem_limit_bytes=cfg.vmem_limit_bytes,
        ),
        interpret=cfg.interpret,
        name="rlx_logprob_entropy_dlogits",
    )(targets[:, None], x, *(a[:, None] for a in (lse, ent, g_lp, g_ent)))


# --------------------------------------------------------------------------- GPU kernels
def _gpu_fwd_kernel(*refs, n, n_vocab, d_model, bn, bv, bd, temperature, from_hidden):
    if from_hidden:
        tgt_ref, h_ref, w_ref, lp_ref, ent_ref, lse_ref = refs
    else:
        tgt_ref, x_ref, lp_ref, ent_ref, lse_ref = refs
    rows = pl.program_id(0) * bn + jnp.arange(bn)
    rmask = rows < n
    tgt = plgpu.load(tgt_ref.at[rows], mask=rmask, other=0)[:, None]

    def logits_chunk(cols):
        cmask = cols < n_vocab
        if not from_hidden:
            return plgpu.load(
                x_ref.at[rows[:, None], cols[None, :]],
                mask=rmask[:, None] & cmask[None, :], other=0.0,
            ).astype(jnp.float32)

        def dstep(k, acc):
            ds = k * bd + jnp.arange(bd)
            dmask = ds < d_model
            h = plgpu.load(h_ref.at[rows[:, None], ds[None, :]],
                           mask=rmask[:, None] & dmask[None, :], other=0.0)
            w = plgpu.load(w_ref.at[ds[:, None], cols[None, :]],
                           mask=dmask[:, None] & cmask[None, :], other=0.0)
            return acc + plgpu.dot(h, w)

        return jax.lax.fori_loop(
            0, pl.cdiv(d_model, bd), dstep, jnp.zeros((bn, bv), jnp.float32)
        )

    def vstep(j, state):
        cols = j * bv + jnp.arange(bv)
        z = logits_chunk(cols) / temperature
        return _online_step(z, cols[None, :], tgt, n_vocab, *state, False)

    init = (jnp.full((bn,), _NEG_INF, jnp.float32),) + (jnp.zeros((bn,), jnp.float32),) * 3
    state = jax.lax.fori_loop(0, pl.cdiv(n_vocab, bv), vstep, init)
    lp, ent, lse = _finish(*state)
    plgpu.store(lp_ref.at[rows], lp, mask=rmask)
    plgpu.store(ent_ref.at[rows], ent, mask=rmask)
    plgpu.store(lse_ref.at[rows], lse, mask=rmask)


def _gpu_fwd(operands, targets, n, n_vocab, cfg, from_hidden):
    d_model = operands[0].shape[1] if from_hidden else 0
    kernel = functools.partial(
        _gpu_fwd_kernel, n=n, n_vocab=n_vocab, d_model=d_model, bn=cfg.block_n,
        bv=cfg.block_v, bd=cfg.block_d, temperature=cfg.temperature,
        from_hidden=from_hidden,
    )
    out = dispatch.out_struct((n,), jnp.float32, targets, *operands)
    return pl.pallas_call(
        kernel,
        out_shape=(out, out, out),
        grid=(pl.cdiv(n, cfg.block_n),),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=2),
        interpret=cfg.interpret,
        name="rlx_logprob_entropy_fwd",
    )(targets, *operands)


def _gpu_dlogits_kernel(tgt_ref, x_ref, lse_ref, ent_ref, glp_ref, gent_ref, dx_ref,
                        *, n, n_vocab, bn, bv, temperature):
    rows = pl.program_id(0) * bn + jnp.arange(bn)
    cols = pl.program_id(1) * bv + jnp.arange(bv)
    rmask = rows < n
    mask = rmask[:, None] & (cols[None, :] < n_vocab)

    def row(ref, other=0.0):
        return plgpu.load(ref.at[rows], mask=rmask, other=other)[:, None]

    x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)
    z = x.astype(jnp.float32) / temperature
    dz = _dz(z, cols[None, :], row(tgt_ref, 0), n_vocab, row(lse_ref), row(ent_ref),
             row(glp_ref), row(gent_ref), 1.0 / temperature)
    plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dz.astype(dx_ref.dtype), mask=mask)


def _gpu_dlogits(x, targets, lse, ent, g_lp, g_ent, cfg):
    n, n_vocab = x.shape
    kernel = functools.partial(
        _gpu_dlogits_kernel, n=n, n_vocab=n_vocab, bn=cfg.block_n, bv=cfg.block_v,
        temperature=cfg.temperature,
    )
    return pl.pallas_call(
        kernel,
        out_shape=dispatch.out_struct(x.shape, x.dtype, x, targets, lse, ent, g_lp, g_ent),
        grid=(pl.cdiv(n, cfg.block_n), pl.cdiv(n_vocab, cfg.block_v)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=2),
        interpret=cfg.interpret,
        name="rlx_logprob_entropy_dlogits",
    )(targets, x, lse, ent, g_lp, g_ent)


# --------------------------------------------------------------------------- custom VJPs
@dataclasses.dataclass(frozen=True)
class _Config:
    kind: str
    interpret: Any
    temperature: float
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    bwd_chunk: int
    vmem_limit_bytes: int | None


def _fwd(operands, targets, n, n_vocab, cfg, from_hidden):
    impl = _tpu_fwd if cfg.kind == "tpu" else _gpu_fwd
    targets, *operands = dispatch.match_varying(targets, *operands)
    return impl(tuple(operands), targets, n, n_vocab, cfg, from_hidden)


def _dlogits(x, targets, lse, ent, g_lp, g_ent, cfg):
    impl = _tpu_dlogits if cfg.kind == "tpu" else _gpu_dlogits
    return impl(*dispatch.match_varying(x, targets, lse, ent, g_lp, g_ent), cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _from_logits(x, targets, cfg):
    lp, ent, _ = _fwd((x,), targets, x.shape[0], x.shape[1], cfg, False)
    return lp, ent


def _from_logits_fwd(x, targets, cfg):
    lp, ent, lse = _fwd((x,), targets, x.shape[0], x.shape[1], cfg, False)
    return (lp, ent), (x, targets, lse, ent)


def _from_logits_bwd(cfg, res, g):
    x, targets, lse, ent = res
    g_lp, g_ent = (a.astype(jnp.float32) for a in g)
    return _dlogits(x, targets, lse, ent, g_lp, g_ent, cfg), None


_from_logits.defvjp(_from_logits_fwd, _from_logits_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _from_hidden(h, w, targets, cfg):
    lp, ent, _ = _fwd((h, w), targets, h.shape[0], w.shape[1], cfg, True)
    return lp, ent


def _from_hidden_fwd(h, w, targets, cfg):
    lp, ent, lse = _fwd((h, w), targets, h.shape[0], w.shape[1], cfg, True)
    return (lp, ent), (h, w, targets, lse, ent)


def _from_hidden_bwd(cfg, res, g):
    """Streams over vocabulary chunks of cfg.bwd_chunk columns (see module doc).

    The last chunk starts at V − chunk (overlapping the previous one); columns
    already covered get a zero gradient, so nothing is padded or copied.
    """
    h, w, targets, lse, ent = res
    g_lp, g_ent = (a.astype(jnp.float32) for a in g)
    n_vocab = w.shape[1]
    chunk = min(cfg.bwd_chunk, n_vocab)
    n_chunks = pl.cdiv(n_vocab, chunk)
    if cfg.block_v > chunk:  # keep the tile inside the chunk (power of two ≥ 128 if chunk ≥ 128)
        bv = 1 << (chunk.bit_length() - 1)
        if cfg.kind == "tpu" and bv % 128:
            bv = chunk  # full-extent block, legal on TPU
        cfg = dataclasses.replace(cfg, block_v=bv)
    col_ids = jnp.arange(chunk, dtype=jnp.int32)

    def body(carry, c):
        dh, dw = carry
        start = jnp.minimum(c * chunk, n_vocab - chunk)
        w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
        x_c = jnp.dot(h, w_c, preferred_element_type=jnp.float32)
        dz = _dlogits(x_c, targets - start, lse, ent, g_lp, g_ent, cfg)
        dz = jnp.where((start + col_ids >= c * chunk)[None, :], dz, 0.0).astype(w.dtype)
        dh = dh + jnp.dot(dz, w_c.T, preferred_element_type=jnp.float32)
        dw_c = jnp.dot(h.T, dz, preferred_element_type=jnp.float32)
        dw = jax.lax.dynamic_update_slice_in_dim(
            dw, jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=1) + dw_c, start, axis=1
        )
        return (dh, dw), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(n_chunks, dtype=jnp.int32))
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_from_hidden.defvjp(_from_hidden_fwd, _from_hidden_bwd)


# --------------------------------------------------------------------------- public API
_DEFAULTS = {
    # (block_n, block_v, block_d, num_warps)
    "tpu": (128, 1024, 0, 0),
    "tpu_hidden": (256, 512, 0, 0),
    "gpu": (16, 1024, 0, 8),
    "gpu_hidden": (16, 128, 64, 4),
}


def _default_bwd_chunk(n: int, itemsize: int) -> int:
    """Largest multiple of 128 columns with N·chunk·(4 + itemsize) ≤ 256 MiB (≥ 128)."""
    per_col = max(n, 1) * (4 + itemsize)
    return max(128, (_BWD_SCRATCH_BYTES // per_col) // 128 * 128)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _make_config(kind, interpret, temperature, n, n_vocab, itemsize, from_hidden,
                 block_n, block_v, block_d, bwd_chunk, vmem_limit_bytes):
    key = kind + ("_hidden" if from_hidden else "")
    dn, dv, dd, warps = _DEFAULTS[key]
    block_n = dn if block_n is None else block_n
    block_v = dv if block_v is None else block_v
    block_d = dd if block_d is None else block_d
    for name, val in (("block_n", block_n), ("block_v", block_v)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if kind == "tpu":
        if block_n % 8:
            raise ValueError(f"block_n must be a multiple of 8 on TPU, got {block_n}")
        if block_v % 128:
            raise ValueError(f"block_v must be a multiple of 128 on TPU, got {block_v}")
    else:
        for name, val in (("block_n", block_n), ("block_v", block_v)):
            if not _is_pow2(val):
                raise ValueError(f"{name} must be a power of two on GPU, got {val}")
        if from_hidden:
            if not _is_pow2(block_d) or min(block_n, block_v, block_d) < 16:
                raise ValueError(
                    "GPU hidden-state kernel needs power-of-two block_n, block_v, "
                    f"block_d >= 16 (tl.dot), got {block_n}, {block_v}, {block_d}"
                )
    # Never tile past the array: TPU takes the full extent, GPU the next power of two.
    fit = (lambda b, size: min(b, size)) if kind == "tpu" else (
        lambda b, size: min(b, max(pl.next_power_of_2(size), 16 if from_hidden else 1)))
    block_n, block_v = fit(block_n, max(n, 1)), fit(block_v, n_vocab)
    if bwd_chunk is None:
        bwd_chunk = _default_bwd_chunk(n, itemsize)
    if not isinstance(bwd_chunk, int) or bwd_chunk <= 0:
        raise ValueError(f"bwd_chunk must be a positive int, got {bwd_chunk!r}")
    return _Config(kind, interpret, float(temperature), block_n, block_v, block_d,
                   warps, bwd_chunk, vmem_limit_bytes)


def _check_common(targets, lead_shape, temperature, what):
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite positive float, got {temperature!r}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal {what} leading shape "
            f"{tuple(lead_shape)}"
        )


def _check_float(name, x):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def token_logprob_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    block_n: int | None = None,
    block_v: int | None = None,
    vmem_limit_bytes: int | None = None,
    backend: dispatch.Backend = "auto",
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and entropy from logits [..., V] (e.g. [B, S, V]).

    Args:
      logits: [..., V] float32/bfloat16/float16 logits.
      targets: [...] integer token ids (clipped to [0, V−1]).
      temperature: τ > 0; statistics are of softmax(logits / τ).
      block_n, block_v: row / vocabulary block (defaults: TPU 128×1024 with
        block_n % 8 == 0, block_v % 128 == 0; GPU 16×1024, powers of two).
      vmem_limit_bytes: TPU scoped-VMEM override (None: compiler default).
      backend: "auto" | "tpu" | "gpu" | "reference" (see ``rlx_kernels.dispatch``).

    Returns:
      (logp, entropy): float32 arrays of shape [...]; differentiable w.r.t. logits.
    """
    _check_float("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocab) axis, got {logits.shape}")
    _check_common(targets, logits.shape[:-1], temperature, "logits")
    res = dispatch.resolve_backend(backend)
    lead, n_vocab = logits.shape[:-1], logits.shape[-1]
    if not res.is_kernel:
        return reference(logits, targets, temperature=temperature)
    n = math.prod(lead)
    cfg = _make_config(res.kind, res.interpret, temperature, n, n_vocab,
                       logits.dtype.itemsize, False, block_n, block_v, None, 1,
                       vmem_limit_bytes)
    if n == 0:
        return jnp.zeros(lead, jnp.float32), jnp.zeros(lead, jnp.float32)
    t = jnp.clip(targets.reshape(n), 0, n_vocab - 1).astype(jnp.int32)
    lp, ent = _from_logits(logits.reshape(n, n_vocab), t, cfg)
    return lp.reshape(lead), ent.reshape(lead)


def token_logprob_entropy_from_hidden(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    block_n: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    bwd_chunk: int | None = None,
    vmem_limit_bytes: int | None = None,
    backend: dispatch.Backend = "auto",
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and entropy of softmax(hidden @ unembedding / τ), logits never stored.

    Args:
      hidden: [..., D] final hidden states (e.g. [B, S, D] or [N, D]).
      unembedding: [D, V] unembedding matrix (same dtype as hidden).
      targets: [...] integer token ids (clipped to [0, V−1]).
      temperature: τ > 0.
      block_n, block_v: row / vocabulary block (TPU default 256×512, full D per
        block; GPU default 16×128).
      block_d: GPU only: D chunk of the in-kernel matmul loop (default 64).
      bwd_chunk: vocabulary columns per backward step (default: scratch ≤ 256 MiB).
      vmem_limit_bytes: TPU scoped-VMEM override (large D needs more VMEM).
      backend: "auto" | "tpu" | "gpu" | "reference".

    Returns:
      (logp, entropy): float32 [...]; differentiable w.r.t. hidden and unembedding.
    """
    _check_float("hidden", hidden)
    _check_float("unembedding", unembedding)
    if unembedding.ndim != 2:
        raise ValueError(f"unembedding must be [D, V], got shape {unembedding.shape}")
    if hidden.ndim < 1 or hidden.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            f"hidden last axis ({hidden.shape}) must equal unembedding D "
            f"({unembedding.shape[0]})"
        )
    if hidden.dtype != unembedding.dtype:
        raise ValueError(
            f"hidden dtype {hidden.dtype} must equal unembedding dtype {unembedding.dtype}"
        )
    if unembedding.shape[1] < 1:
        raise ValueError(f"unembedding must have V >= 1, got shape {unembedding.shape}")
    _check_common(targets, hidden.shape[:-1], temperature, "hidden")
    res = dispatch.resolve_backend(backend)
    lead, d_model = hidden.shape[:-1], hidden.shape[-1]
    n_vocab = unembedding.shape[1]
    if not res.is_kernel:
        return reference_from_hidden(hidden, unembedding, targets, temperature=temperature)
    n = math.prod(lead)
    cfg = _make_config(res.kind, res.interpret, temperature, n, n_vocab,
                       hidden.dtype.itemsize, True, block_n, block_v, block_d, bwd_chunk,
                       vmem_limit_bytes)
    if n == 0:
        return jnp.zeros(lead, jnp.float32), jnp.zeros(lead, jnp.float32)
    t = jnp.clip(targets.reshape(n), 0, n_vocab - 1).astype(jnp.int32)
    lp, ent = _from_hidden(hidden.reshape(n, d_model), unembedding, t, cfg)
    return lp.reshape(lead), ent.reshape(lead)


def scratch_bytes(n: int, n_vocab: int, d_model: int | None = None, *,
                  itemsize: int = 2, block_n: int = 128, block_v: int = 1024,
                  bwd_chunk: int | None = None) -> dict[str, int]:
    """Analytic memory (bytes) beyond inputs/outputs, for the benchmark and docs.

    kernel_fwd: pipelined VMEM/SMEM tiles (2 buffers of a [block_n, block_v]
    input tile + 4 f32 [block_n] state vectors) -- per core, independent of N.
    kernel_residuals: the f32 lse and entropy saved for the backward ([N] each).
    kernel_bwd_hidden: the hidden-state backward's [N, chunk] f32 logits chunk
    plus its dlogits chunk (input dtype). reference: the [N, V] f32 logits /
    log-softmax / probabilities XLA keeps live (3 arrays; the forward alone needs
    at least one).
    """
    if bwd_chunk is None:
        bwd_chunk = _default_bwd_chunk(n, itemsize)
    block_n, block_v = min(block_n, max(n, 1)), min(block_v, n_vocab)
    out = {
        "kernel_fwd": 2 * block_n * block_v * itemsize + 4 * 4 * block_n,
        "kernel_residuals": 2 * 4 * n,
        "reference_fwd_min": 4 * n * n_vocab,
        "reference": 3 * 4 * n * n_vocab,
    }
    if d_model is not None:
        out["kernel_fwd"] += 2 * (block_n + block_v) * d_model * itemsize
        out["kernel_bwd_hidden"] = n * min(bwd_chunk, n_vocab) * (4 + itemsize)
    return out
