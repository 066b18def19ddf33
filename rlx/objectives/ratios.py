"""Importance ratios and their batch statistics.

``ratio_metrics`` is the single entry point for ratio statistics. It runs the fused
one-pass kernel ``rlx_kernels.ratio_stats.ratio_statistics`` through its dispatcher
(Mosaic on TPU, Triton on NVIDIA GPUs, the pure-jnp reference elsewhere; force a path
with ``rlx_kernels.dispatch.force_backend`` or ``RLX_KERNEL_BACKEND``). Contract:

    ratio_metrics(logp [B,T], old_logp [B,T], mask [B,T], *, eps_low, eps_high,
                  clamp=20., axis_name=None) -> dict[str, scalar]

with r = exp(clip(logp − old_logp, −clamp, clamp)) on valid tokens and keys

* ``ratio/mean``, ``ratio/min``, ``ratio/max``: over valid tokens (min = max = 1
  when no token is valid);
* ``ratio/clip_frac_low``: fraction of valid tokens with r < 1 − eps_low;
* ``ratio/clip_frac_high``: fraction of valid tokens with r > 1 + eps_high;
  (sign-independent: the fraction outside the trust band, whatever the advantage);
* ``ratio/approx_kl``: mean k3 estimate of KL(π_old ‖ π_θ) = E_old[r − 1 − log r];
* ``ratio/valid_tokens``: number of valid tokens.

All values are global over ``axis_name`` (psum / pmin / pmax) and carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx.objectives.aggregation import masked, psum, safe_div

Array = jax.Array

DEFAULT_LOG_RATIO_CLAMP = 20.0


def log_ratio(
    logp: Array, old_logp: Array, mask: Array, *, clamp: float = DEFAULT_LOG_RATIO_CLAMP
) -> Array:
    """[B,T] clip(logp − old_logp, −clamp, clamp) on valid tokens, 0 elsewhere."""
    return masked(jnp.clip(logp - old_logp, -clamp, clamp), mask)


def ratio(
    logp: Array, old_logp: Array, mask: Array, *, clamp: float = DEFAULT_LOG_RATIO_CLAMP
) -> Array:
    """[B,T] exp of the clamped log-ratio (1 on masked tokens)."""
    return jnp.exp(log_ratio(logp, old_logp, mask, clamp=clamp))


def ratio_metrics(
    logp: Array,
    old_logp: Array,
    mask: Array,
    *,
    eps_low: float,
    eps_high: float,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name: str | None = None,
) -> dict:
    """Ratio statistics over valid tokens; see the module docstring for the contract."""
    from rlx_kernels.ratio_stats import ratio_statistics

    group_ids = jnp.zeros(logp.shape[:1], jnp.int32)
    stats = ratio_statistics(logp, old_logp, mask, group_ids, num_groups=1,
                             eps_low=eps_low, eps_high=eps_high, log_ratio_clamp=clamp,
                             axis_name=axis_name).total
    n = stats.count
    return {
        "ratio/mean": stats.mean_ratio,
        "ratio/min": jnp.where(n > 0, stats.min_ratio, 1.0),
        "ratio/max": jnp.where(n > 0, stats.max_ratio, 1.0),
        "ratio/clip_frac_low": stats.clip_fraction_low,
        "ratio/clip_frac_high": stats.clip_fraction_high,
        "ratio/approx_kl": stats.mean_k3,
        "ratio/valid_tokens": n,
    }


def masked_stats(
    x: Array, mask: Array, *, prefix: str, axis_name: str | None = None
) -> dict:
    """mean / std (biased) / min / max of ``x`` over valid tokens, global over axis_name."""
    x = jax.lax.stop_gradient(x)
    m = (mask > 0).astype(x.dtype)
    n = psum(m.sum(), axis_name)
    mu = safe_div(psum(masked(x, m).sum(), axis_name), n)
    var = safe_div(psum(masked((x - mu) ** 2, m).sum(), axis_name), n)
    xmin = jnp.where(m > 0, x, jnp.inf).min()
    xmax = jnp.where(m > 0, x, -jnp.inf).max()
    if axis_name is not None:
        xmin = jax.lax.pmin(xmin, axis_name)
        xmax = jax.lax.pmax(xmax, axis_name)
    return {
        f"{prefix}/mean": mu,
        f"{prefix}/std": jnp.sqrt(var),
        f"{prefix}/min": jnp.where(n > 0, xmin, 0.0),
        f"{prefix}/max": jnp.where(n > 0, xmax, 0.0),
    }
