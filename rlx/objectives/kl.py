"""KL estimators between the current policy and a reference, and KL controllers.

Per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's "Approximating
KL divergence" note), with δ = logp − ref_logp clamped to ±``clamp_log_ratio``:

* k1 = δ;  k2 = ½ δ²;  k3 = exp(−δ) − 1 + δ (≥ 0, low variance);  abs = |δ|.

The estimate is then clamped to ±``clamp_value`` (verl uses 10). ``grad_estimator``
gives the straight-through form "value of one estimator, gradient of another":
    kl = g + sg(v − g),
so ``estimator="k3", grad_estimator="k2"`` has k3's value and k2's (unbiased)
gradient δ ∇logp (verl's "k3+").

KL can enter the objective as a loss term (``rlx.objectives.regularizers.kl_penalty``)
or be folded into the reward: ``kl_reward_penalty`` gives per-token penalties for the
reward path (``RewardBatch.kl``; k1 recommended there, k2/k3 as a loss, per OpenRLHF).
The coefficient is fixed or adaptive (``adaptive_kl_init/update``, Ziegler et al. 2019,
arXiv 1909.08593).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rlx.objectives.aggregation import masked

Array = jax.Array
sg = jax.lax.stop_gradient

ESTIMATORS = ("k1", "k2", "k3", "abs")


def _estimate(delta: Array, estimator: str) -> Array:
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator == "k3":
        return jnp.exp(-delta) - 1.0 + delta
    if estimator == "abs":
        return jnp.abs(delta)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def kl_estimate(
    logp: Array,
    ref_logp: Array,
    mask: Array | None = None,
    *,
    estimator: str = "k3",
    grad_estimator: str | None = None,
    clamp_log_ratio: float = 20.0,
    clamp_value: float | None = 10.0,
) -> Array:
    """[B,T] per-token KL(π_θ ‖ π_ref) estimate (0 on masked tokens); see module doc."""
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp has shape {ref_logp.shape}, expected {logp.shape}")
    delta = jnp.clip(logp - ref_logp, -clamp_log_ratio, clamp_log_ratio)
    if mask is not None:
        delta = masked(delta, mask)
    v = _estimate(delta, estimator)
    if clamp_value is not None:
        v = jnp.clip(v, -clamp_value, clamp_value)
    if grad_estimator is not None:
        g = _estimate(delta, grad_estimator)
        v = g + sg(v - g)
    return v if mask is None else masked(v, mask)


def kl_reward_penalty(
    old_logp: Array,
    ref_logp: Array,
    mask: Array,
    *,
    coef: float | Array,
    estimator: str = "k1",
    clamp_log_ratio: float = 20.0,
    clamp_value: float | None = 10.0,
) -> Array:
    """[B,T] per-token penalty coef·KL_t for the reward path (no gradient).

    Computed from the rollout (old) log-probs; goes into ``RewardBatch.kl``, where
    estimators subtract it from the token rewards (REINFORCE++, PPO).
    """
    kl = kl_estimate(old_logp, ref_logp, mask, estimator=estimator,
                     clamp_log_ratio=clamp_log_ratio, clamp_value=clamp_value)
    return sg(coef * kl)


@struct.dataclass
class AdaptiveKLState:
    """coef: the current KL coefficient β."""

    coef: Array


def adaptive_kl_init(init_coef: float) -> AdaptiveKLState:
    """Initial controller state (Ziegler et al. 2019, arXiv 1909.08593, §2.2)."""
    if init_coef < 0:
        raise ValueError(f"init_coef must be >= 0, got {init_coef!r}")
    return AdaptiveKLState(coef=jnp.asarray(init_coef, jnp.float32))


def adaptive_kl_update(
    state: AdaptiveKLState,
    kl: Array,
    *,
    target: float,
    horizon: float = 10000.0,
    n_steps: int = 1,
) -> AdaptiveKLState:
    """β ← β (1 + K_β e n_steps / horizon), e = clip(KL/target − 1, −0.2, 0.2).

    ``kl`` is the measured mean KL; K_β = 1 folded into ``horizon`` as in the paper's code.
    """
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target!r}")
    err = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return AdaptiveKLState(coef=state.coef * (1.0 + err * n_steps / horizon))
