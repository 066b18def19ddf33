"""Importance-ratio statistics in one pass, and the differentiable ratio variance.

For new log-probs ℓ (the policy being optimised, π_θ), old (behaviour) log-probs
ℓ_old, token mask m ∈ {0, 1} (any nonzero entry counts as valid), per token:

    log r = clip(ℓ − ℓ_old, −c, c)  (c = ``log_ratio_clamp``),   r = exp(log r),
    k3 = r − 1 − log r   (Schulman's k3 estimator of KL(π_old ‖ π_θ), ≥ 0),
    clipped low  ⇔ r < 1 − ε_low,   clipped high ⇔ r > 1 + ε_high
    (counted for every valid token, whatever the advantage's sign: the fraction
    of tokens outside the trust region).

The kernel reads the three [B, T] arrays once and writes the per-token ratio
(1.0 at masked tokens) and nine per-row partials: valid count, Σ(r−1),
Σ(r−1)², Σ log r, Σ k3, low/high clip counts, min r and max r over valid tokens.
Sums are kept about 1 -- Σ(r−1), Σ(r−1)² with r − 1 = expm1(log r) -- because
ratios cluster near 1 and Σr²/N − μ² in float32 loses the variance to
cancellation; Σr and Σr² are derived properties. Per-group sums (rows → groups
via ``group_ids``) and batch totals are segment sums of the [B] partials.
Under ``shard_map`` with ``axis_name`` the group and total statistics are
reduced with psum / pmin / pmax, so they are exact global figures; the
per-sequence fields stay per shard (they are sharded like the batch).
A row or group with no valid token has count 0, sums 0, min_ratio = +inf and
max_ratio = −inf (the identities of min / max); the mean-type properties then
return neutral values (mean ratio 1, variance 0, fractions 0).

These statistics feed R²VPO's Var[ρ] constraint (arXiv 2601.03320 /
2605.26784), BAPO's adaptive bounds (arXiv 2510.18927), GSPO's sequence ratio
exp(mean log r) and the diagnostics of every run.

:func:`ratio_variance` is the differentiable masked token-level variance of
R²VPO (formulas.md §1, reading [inferred] item 6): with N = Σm,
μ = Σ m r / N,

    about="mean":  Var = Σ m (r − μ)² / N,   ∂Var/∂ℓ_t = (2/N)·m_t·r_t·(r_t − μ)
    about="one":   V₁  = Σ m (r − 1)² / N,   ∂V₁/∂ℓ_t  = (2/N)·m_t·r_t·(r_t − 1)

Derivation (about the mean): Var = S₂/N − (S₁/N)² with S₁ = Σ m (r−1),
S₂ = Σ m (r−1)²; ∂r_t/∂ℓ_t = r_t, so ∂S₁/∂ℓ_t = m_t r_t, ∂S₂/∂ℓ_t = 2 m_t r_t (r_t−1),
and ∂Var/∂ℓ_t = (2/N) m_t r_t [(r_t − 1) − S₁/N] = (2/N) m_t r_t (r_t − μ).
Tokens whose |ℓ − ℓ_old| exceeds the clamp get zero gradient (the clamp is
flat there); ∂/∂ℓ_old is the negative. N, μ are global under ``axis_name``.
"""

from __future__ import annotations

import functools
import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from rlx_kernels import dispatch

_N_ROW_STATS = 9  # count, Σd, Σd², Σlog r, Σk3, clip_low, clip_high, min, max
_INF = jnp.inf


# --------------------------------------------------------------------------- result types
@flax.struct.dataclass
class RatioSums:
    """Masked sums over some set of tokens (a row, a group, or the whole batch).

    All fields share one shape ([B], [num_groups] or []). Counts are int32.
    """

    count: jax.Array
    sum_delta: jax.Array  # Σ m (r − 1)
    sum_delta_sq: jax.Array  # Σ m (r − 1)²
    sum_log_ratio: jax.Array  # Σ m log r
    sum_k3: jax.Array  # Σ m (r − 1 − log r)
    clip_low: jax.Array  # #{valid, r < 1 − ε_low}
    clip_high: jax.Array  # #{valid, r > 1 + ε_high}
    min_ratio: jax.Array  # +inf when count == 0
    max_ratio: jax.Array  # −inf when count == 0

    def _n(self):
        return jnp.maximum(self.count, 1).astype(jnp.float32)

    def _guard(self, value, neutral):
        return jnp.where(self.count > 0, value, neutral)

    @property
    def sum_ratio(self):
        """Σ m r."""
        return self.sum_delta + self.count.astype(jnp.float32)

    @property
    def sum_ratio_sq(self):
        """Σ m r²."""
        return self.sum_delta_sq + 2.0 * self.sum_delta + self.count.astype(jnp.float32)

    @property
    def mean_ratio(self):
        """μ = Σ m r / Σ m (1.0 when empty)."""
        return self._guard(1.0 + self.sum_delta / self._n(), 1.0)

    @property
    def var_ratio(self):
        """Masked second central moment Σ m (r − μ)² / Σ m (0 when empty)."""
        md = self.sum_delta / self._n()
        return self._guard(jnp.maximum(self.sum_delta_sq / self._n() - md * md, 0.0), 0.0)

    @property
    def var_ratio_about_one(self):
        """Σ m (r − 1)² / Σ m (0 when empty)."""
        return self._guard(self.sum_delta_sq / self._n(), 0.0)

    @property
    def clip_fraction_low(self):
        return self._guard(self.clip_low / self._n(), 0.0)

    @property
    def clip_fraction_high(self):
        return self._guard(self.clip_high / self._n(), 0.0)

    @property
    def clip_fraction(self):
        return self._guard((self.clip_low + self.clip_high) / self._n(), 0.0)

    @property
    def mean_log_ratio(self):
        return self._guard(self.sum_log_ratio / self._n(), 0.0)

    @property
    def mean_k3(self):
        """Mean k3 estimate of KL(π_old ‖ π_θ) over valid tokens (0 when empty)."""
        return self._guard(self.sum_k3 / self._n(), 0.0)

    @property
    def geometric_mean_ratio(self):
        """exp(mean log r): GSPO's sequence-level ratio when taken per row."""
        return jnp.exp(self.mean_log_ratio)


@flax.struct.dataclass
class RatioStats:
    """Output of :func:`ratio_statistics`.

    ratio: [B, T] float32 per-token ratio (1.0 at masked tokens).
    sequence: per-row sums, shape [B] (local to the shard under shard_map).
    group: per-group sums, shape [num_groups] (global under ``axis_name``).
    total: batch sums, shape [] (global under ``axis_name``).
    """

    ratio: jax.Array
    sequence: RatioSums
    group: RatioSums
    total: RatioSums

    @property
    def mean_ratio(self):
        return self.total.mean_ratio

    @property
    def var_ratio(self):
        return self.total.var_ratio

    @property
    def clip_fraction(self):
        return self.total.clip_fraction

    @property
    def mean_k3(self):
        return self.total.mean_k3

    def summary(self) -> dict[str, jax.Array]:
        """Scalar batch diagnostics, named for a metrics dict."""
        t = self.total
        return {
            "ratio/mean": t.mean_ratio,
            "ratio/var": t.var_ratio,
            "ratio/min": t.min_ratio,
            "ratio/max": t.max_ratio,
            "ratio/clip_frac_low": t.clip_fraction_low,
            "ratio/clip_frac_high": t.clip_fraction_high,
            "ratio/clip_frac": t.clip_fraction,
            "ratio/mean_log": t.mean_log_ratio,
            "kl/k3": t.mean_k3,
            "ratio/tokens": t.count,
        }


# --------------------------------------------------------------------------- shared math
def _expm1(x):
    """expm1 from exp/log (Kahan's trick, a few ulp): Mosaic has no expm1 lowering."""
    u = jnp.exp(x)
    lu = jnp.log(u)
    return jnp.where(lu == 0.0, x, (u - 1.0) * (x / jnp.where(lu == 0.0, 1.0, lu)))


def _token_terms(new, old, mask, lo_thr, hi_thr, clamp):
    """Per-token terms; garbage allowed where mask is False (every use is masked)."""
    valid = mask
    lr = jnp.where(valid, jnp.clip(new.astype(jnp.float32) - old.astype(jnp.float32),
                                   -clamp, clamp), 0.0)
    d = _expm1(lr)
    r = 1.0 + d
    zero = jnp.zeros_like(lr)
    terms = (
        jnp.where(valid, 1.0, zero),
        jnp.where(valid, d, zero),
        jnp.where(valid, d * d, zero),
        lr,
        jnp.where(valid, d - lr, zero),
        jnp.where(valid & (r < lo_thr), 1.0, zero),
        jnp.where(valid & (r > hi_thr), 1.0, zero),
    )
    return r, terms, jnp.where(valid, r, _INF), jnp.where(valid, r, -_INF)


# --------------------------------------------------------------------------- TPU kernel
def _tpu_kernel(thr_ref, new_ref, old_ref, mask_ref, ratio_ref, *stat_refs,
                n_rows, n_tok, bb, bt, clamp):
    i, j = pl.program_id(0), pl.program_id(1)
    shape = (bb, bt)
    row = i * bb + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    col = j * bt + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    valid = (row < n_rows) & (col < n_tok) & (mask_ref[...] != 0)
    r, terms, rmin, rmax = _token_terms(new_ref[...], old_ref[...], valid,
                                        thr_ref[0], thr_ref[1], clamp)
    ratio_ref[...] = r

    @pl.when(j == 0)
    def _init():
        for ref in stat_refs[:7]:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)
        stat_refs[7][...] = jnp.full(stat_refs[7].shape, _INF, jnp.float32)
        stat_refs[8][...] = jnp.full(stat_refs[8].shape, -_INF, jnp.float32)

    for ref, term in zip(stat_refs[:7], terms):
        ref[...] += jnp.sum(term, axis=1, keepdims=True)
    stat_refs[7][...] = jnp.minimum(stat_refs[7][...], jnp.min(rmin, axis=1, keepdims=True))
    stat_refs[8][...] = jnp.maximum(stat_refs[8][...], jnp.max(rmax, axis=1, keepdims=True))


def _tpu_row_stats(new, old, mask, thr, bb, bt, clamp, interpret):
    b, t = new.shape
    tile = pl.BlockSpec((bb, bt), lambda i, j: (i, j))
    row = pl.BlockSpec((bb, 1), lambda i, j: (i, 0))
    kernel = functools.partial(_tpu_kernel, n_rows=b, n_tok=t, bb=bb, bt=bt, clamp=clamp)
    outs = pl.pallas_call(
        kernel,
        out_shape=(dispatch.out_struct((b, t), jnp.float32, new, old, mask),)
        + (dispatch.out_struct((b, 1), jnp.float32, new, old, mask),) * _N_ROW_STATS,
        grid=(pl.cdiv(b, bb), pl.cdiv(t, bt)),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), tile, tile, tile],
        out_specs=(tile,) + (row,) * _N_ROW_STATS,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="rlx_ratio_stats",
    )(thr, new, old, mask)
    return outs[0], [o[:, 0] for o in outs[1:]]


# --------------------------------------------------------------------------- GPU kernel
def _gpu_kernel(thr_ref, new_ref, old_ref, mask_ref, ratio_ref, *part_refs,
                n_rows, n_tok, bb, bt, clamp):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bb + jnp.arange(bb)
    cols = j * bt + jnp.arange(bt)
    rmask = rows < n_rows
    inb = rmask[:, None] & (cols[None, :] < n_tok)
    idx = (rows[:, None], cols[None, :])
    new = plgpu.load(new_ref.at[idx], mask=inb, other=0.0)
    old = plgpu.load(old_ref.at[idx], mask=inb, other=0.0)
    m = plgpu.load(mask_ref.at[idx], mask=inb, other=0.0)
    valid = inb & (m != 0)
    r, terms, rmin, rmax = _token_terms(new, old, valid, thr_ref[0], thr_ref[1], clamp)
    plgpu.store(ratio_ref.at[idx], r, mask=inb)
    flat = j * n_rows + rows  # partials laid out [num_t_blocks, B], flattened
    for ref, term in zip(part_refs[:7], terms):
        plgpu.store(ref.at[flat], jnp.sum(term, axis=1), mask=rmask)
    plgpu.store(part_refs[7].at[flat], jnp.min(rmin, axis=1), mask=rmask)
    plgpu.store(part_refs[8].at[flat], jnp.max(rmax, axis=1), mask=rmask)


def _gpu_row_stats(new, old, mask, thr, bb, bt, clamp, interpret):
    b, t = new.shape
    nt = pl.cdiv(t, bt)
    kernel = functools.partial(_gpu_kernel, n_rows=b, n_tok=t, bb=bb, bt=bt, clamp=clamp)
    outs = pl.pallas_call(
        kernel,
        out_shape=(dispatch.out_struct((b, t), jnp.float32, new, old, mask),)
        + (dispatch.out_struct((nt * b,), jnp.float32, new, old, mask),) * _N_ROW_STATS,
        grid=(pl.cdiv(b, bb), nt),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rlx_ratio_stats",
    )(thr, new, old, mask)
    parts = [o.reshape(nt, b) for o in outs[1:]]
    rows = [p.sum(0) for p in parts[:7]] + [parts[7].min(0), parts[8].max(0)]
    return outs[0], rows


# --------------------------------------------------------------------------- reference
def _reference_row_stats(new, old, mask, thr, clamp):
    """Pure jnp per-row partials (uses jnp.expm1; same semantics as the kernels)."""
    valid = mask != 0
    lr = jnp.where(valid, jnp.clip(new.astype(jnp.float32) - old.astype(jnp.float32),
                                   -clamp, clamp), 0.0)
    d = jnp.expm1(lr)
    r = 1.0 + d
    vf = valid.astype(jnp.float32)
    rows = [
        vf.sum(1),
        jnp.where(valid, d, 0.0).sum(1),
        jnp.where(valid, d * d, 0.0).sum(1),
        lr.sum(1),
        jnp.where(valid, d - lr, 0.0).sum(1),
        (valid & (r < thr[0])).astype(jnp.float32).sum(1),
        (valid & (r > thr[1])).astype(jnp.float32).sum(1),
        jnp.where(valid, r, _INF).min(1),
        jnp.where(valid, r, -_INF).max(1),
    ]
    return r, rows


def reference(new_logp, old_logp, mask, group_ids, *, num_groups, eps_low, eps_high,
              log_ratio_clamp=20.0, axis_name=None) -> RatioStats:
    """Pure-jnp :func:`ratio_statistics` (the ``backend="reference"`` path)."""
    return ratio_statistics(new_logp, old_logp, mask, group_ids, num_groups=num_groups,
                            eps_low=eps_low, eps_high=eps_high,
                            log_ratio_clamp=log_ratio_clamp, axis_name=axis_name,
                            backend="reference")


def reference_ratio_variance(new_logp, old_logp, mask, *, about="mean",
                             log_ratio_clamp=20.0, axis_name=None):
    """Pure-jnp ratio variance written directly as Σ m (r − c)² / Σ m; plain autodiff."""
    valid = mask != 0
    lr = jnp.clip(new_logp.astype(jnp.float32) - old_logp.astype(jnp.float32),
                  -log_ratio_clamp, log_ratio_clamp)
    r = jnp.exp(jnp.where(valid, lr, 0.0))
    vf = valid.astype(jnp.float32)
    n, sr = vf.sum(), jnp.where(valid, r, 0.0).sum()
    if axis_name is not None:
        n, sr = jax.lax.psum((n, sr), axis_name)
    nn = jnp.maximum(n, 1.0)
    center = sr / nn if about == "mean" else 1.0
    sq = jnp.where(valid, (r - center) ** 2, 0.0).sum()
    if axis_name is not None:
        sq = jax.lax.psum(sq, axis_name)
    return jnp.where(n > 0, sq / nn, 0.0)


def _sums_from_rows(rows) -> RatioSums:
    cnt, sd, sd2, slr, sk3, clo, chi, rmin, rmax = rows
    return RatioSums(cnt.astype(jnp.int32), sd, sd2, slr, sk3, clo.astype(jnp.int32),
                     chi.astype(jnp.int32), rmin, rmax)


def _reduce(seq: RatioSums, segment_fn, axis_name) -> RatioSums:
    sums = [segment_fn(getattr(seq, f), "sum") for f in
            ("count", "sum_delta", "sum_delta_sq", "sum_log_ratio", "sum_k3",
             "clip_low", "clip_high")]
    lo, hi = segment_fn(seq.min_ratio, "min"), segment_fn(seq.max_ratio, "max")
    if axis_name is not None:
        sums = [jax.lax.psum(s, axis_name) for s in sums]
        lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    return RatioSums(*sums, lo, hi)


# --------------------------------------------------------------------------- public API
_DEFAULT_BLOCKS = {"tpu": (16, 2048), "gpu": (4, 512)}


def _validate(new_logp, old_logp, mask, clamp):
    for name, x in (("new_logp", new_logp), ("old_logp", old_logp)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be [B, T], got shape {x.shape}")
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")
    if old_logp.shape != new_logp.shape:
        raise ValueError(f"old_logp shape {old_logp.shape} != new_logp shape {new_logp.shape}")
    if mask.shape != new_logp.shape:
        raise ValueError(f"mask shape {mask.shape} != new_logp shape {new_logp.shape}")
    if not (isinstance(clamp, numbers.Real) and math.isfinite(clamp) and clamp > 0):
        raise ValueError(f"log_ratio_clamp must be a finite positive float, got {clamp!r}")


def _check_eps(name, eps):
    if isinstance(eps, numbers.Real) and not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {eps!r}")


def _blocks(kind, b, t, block_b, block_t):
    db, dt = _DEFAULT_BLOCKS[kind]
    bb = db if block_b is None else block_b
    bt = dt if block_t is None else block_t
    for name, v in (("block_b", bb), ("block_t", bt)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if kind == "tpu":
        if bb % 8 and bb != b:
            raise ValueError(f"block_b must be a multiple of 8 (or B) on TPU, got {bb}")
        if bt % 128 and bt != t:
            raise ValueError(f"block_t must be a multiple of 128 (or T) on TPU, got {bt}")
    else:
        for name, v in (("block_b", bb), ("block_t", bt)):
            if v & (v - 1):
                raise ValueError(f"{name} must be a power of two on GPU, got {v}")
    if kind == "tpu":  # never tile past the array (full extent is always legal)
        return min(bb, b), min(bt, t)
    return min(bb, pl.next_power_of_2(b)), min(bt, pl.next_power_of_2(t))


def _row_stats(new_logp, old_logp, mask, thr, clamp, backend, block_b, block_t):
    res = dispatch.resolve_backend(backend)
    if not res.is_kernel:
        return _reference_row_stats(new_logp, old_logp, mask, thr, clamp)
    b, t = new_logp.shape
    bb, bt = _blocks(res.kind, b, t, block_b, block_t)
    if mask.dtype not in (jnp.float32, jnp.bfloat16):
        mask = (mask != 0).astype(jnp.float32)
    impl = _tpu_row_stats if res.kind == "tpu" else _gpu_row_stats
    thr, new_logp, old_logp, mask = dispatch.match_varying(thr, new_logp, old_logp, mask)
    return impl(new_logp, old_logp, mask, thr, bb, bt, clamp, res.interpret)


def ratio_statistics(
    new_logp: jax.Array,
    old_logp: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array,
    *,
    num_groups: int,
    eps_low: float | jax.Array,
    eps_high: float | jax.Array,
    log_ratio_clamp: float = 20.0,
    axis_name: str | None = None,
    block_b: int | None = None,
    block_t: int | None = None,
    backend: dispatch.Backend = "auto",
) -> RatioStats:
    """One-pass importance-ratio statistics (see module docstring).

    Args:
      new_logp, old_logp: [B, T] log-probs (float32/bfloat16; f32 accumulation).
      mask: [B, T] token mask (bool / int / float; nonzero = valid).
      group_ids: [B] integer group of each row, in [0, num_groups) (rows with
        out-of-range ids are left out of the group sums, kept in the totals).
      num_groups: static number of groups.
      eps_low, eps_high: clip bounds (floats or traced scalars, e.g. BAPO's
        adaptive bounds): low clip r < 1 − eps_low, high clip r > 1 + eps_high.
      log_ratio_clamp: c > 0, log r is clipped to [−c, c] before exp.
      axis_name: mapped axis to reduce group/total statistics over (shard_map).
      block_b, block_t: row / token block (TPU default 16×2048, multiples of
        (8, 128); GPU default 4×512, powers of two).
      backend: "auto" | "tpu" | "gpu" | "reference".

    Returns:
      :class:`RatioStats`. Not differentiated (inputs are stop_gradient'ed); use
      :func:`ratio_variance` for R²VPO's gradient.
    """
    _validate(new_logp, old_logp, mask, log_ratio_clamp)
    if group_ids.shape != new_logp.shape[:1] or not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(
            f"group_ids must be an integer [B]={new_logp.shape[:1]} array, got "
            f"shape {group_ids.shape} dtype {group_ids.dtype}"
        )
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    _check_eps("eps_low", eps_low)
    _check_eps("eps_high", eps_high)
    new_logp, old_logp = jax.lax.stop_gradient(new_logp), jax.lax.stop_gradient(old_logp)
    thr = jnp.stack([1.0 - jnp.asarray(eps_low, jnp.float32),
                     1.0 + jnp.asarray(eps_high, jnp.float32)])
    thr = jax.lax.stop_gradient(thr)
    ratio, rows = _row_stats(new_logp, old_logp, mask, thr, float(log_ratio_clamp),
                             backend, block_b, block_t)
    seq = _sums_from_rows(rows)

    def by_group(x, op):
        fn = {"sum": jax.ops.segment_sum, "min": jax.ops.segment_min,
              "max": jax.ops.segment_max}[op]
        return fn(x, group_ids, num_segments=num_groups)

    def total(x, op):
        return {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}[op](x)

    return RatioStats(ratio, seq, _reduce(seq, by_group, axis_name),
                      _reduce(seq, total, axis_name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _local_moments(new_logp, old_logp, mask, clamp, backend, block_b, block_t):
    """Local (N, S₁, S₂) = (Σm, Σm(r−1), Σm(r−1)²) through the kernel."""
    return _local_moments_fwd(new_logp, old_logp, mask, clamp, backend, block_b, block_t)[0]


def _local_moments_fwd(new_logp, old_logp, mask, clamp, backend, block_b, block_t):
    thr = jnp.array([0.0, _INF], jnp.float32)  # clip counts unused here
    ratio, rows = _row_stats(new_logp, old_logp, mask, thr, clamp, backend, block_b, block_t)
    moments = (rows[0].sum(), rows[1].sum(), rows[2].sum())
    return moments, (new_logp, old_logp, mask, ratio)


def _local_moments_bwd(clamp, backend, block_b, block_t, res, g):
    """∂S₁/∂ℓ_t = m r_t, ∂S₂/∂ℓ_t = 2 m r_t (r_t − 1), zero where the clamp is flat."""
    new_logp, old_logp, mask, ratio = res
    _, g1, g2 = g
    diff = new_logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
    live = (mask != 0) & (jnp.abs(diff) < clamp)
    grad = jnp.where(live, ratio * (g1 + 2.0 * g2 * (ratio - 1.0)), 0.0)
    return grad.astype(new_logp.dtype), (-grad).astype(old_logp.dtype), None


_local_moments.defvjp(_local_moments_fwd, _local_moments_bwd)


def ratio_variance(
    new_logp: jax.Array,
    old_logp: jax.Array,
    mask: jax.Array,
    *,
    about: str = "mean",
    log_ratio_clamp: float = 20.0,
    axis_name: str | None = None,
    block_b: int | None = None,
    block_t: int | None = None,
    backend: dispatch.Backend = "auto",
) -> jax.Array:
    """Masked token-level Var[ρ] (about="mean") or E[(ρ−1)²] (about="one"), scalar f32.

    Differentiable w.r.t. new_logp (and old_logp): the kernel's local moments
    (N, Σ(r−1), Σ(r−1)²) carry a custom VJP and the variance is plain jnp on
    three scalars, so autodiff composes them into the formula of the module
    docstring. Under ``shard_map`` pass ``axis_name``: the moments are psum'd
    (global N, μ) and each shard gets the exact gradient for its own tokens,
    with or without ``check_vma``. Returns 0 (gradient 0) when no token is valid.
    """
    _validate(new_logp, old_logp, mask, log_ratio_clamp)
    if about not in ("mean", "one"):
        raise ValueError(f"about must be 'mean' or 'one', got {about!r}")
    if jnp.issubdtype(mask.dtype, jnp.floating):
        mask = jax.lax.stop_gradient(mask)
    n, s1, s2 = _local_moments(new_logp, old_logp, mask, float(log_ratio_clamp), backend,
                               block_b, block_t)
    if axis_name is not None:
        n, s1, s2 = jax.lax.psum((n, s1, s2), axis_name)
    n = jax.lax.stop_gradient(n)
    nn = jnp.maximum(n, 1.0)
    md = s1 / nn
    var = s2 / nn - (md * md if about == "mean" else 0.0)
    return jnp.where(n > 0, jnp.maximum(var, 0.0), 0.0)
