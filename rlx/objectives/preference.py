"""Reward-model and preference losses on per-sequence summed log-probs.

All functions return per-example losses [B] (reduce with a mean, or with
``aggregation.token_mean(loss[:, None], valid[:, None])`` for exact splitting),
except ``distillation_reverse_kl`` which is per-token [B,T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx.objectives.aggregation import masked

Array = jax.Array
sg = jax.lax.stop_gradient


def _same(ref: Array, **xs):
    for field, x in xs.items():
        if x.shape != ref.shape:
            raise ValueError(f"{field} has shape {x.shape}, expected {ref.shape}")


def bradley_terry_loss(
    chosen_rewards: Array, rejected_rewards: Array, *, margin: Array | float | None = None
) -> Array:
    """Pairwise reward-model loss −log σ(r_c − r_r − margin) (Ouyang et al. 2022,
    arXiv 2203.02155; margin as in Llama 2, arXiv 2307.09288). Shapes [B]."""
    _same(chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)


def _h(pc, pr, rc, rr):
    _same(pc, policy_rejected_logp=pr, ref_chosen_logp=rc, ref_rejected_logp=rr)
    return (pc - rc) - (pr - rr)


def dpo_loss(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    ref_chosen_logp: Array,
    ref_rejected_logp: Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Array:
    """DPO (arXiv 2305.18290): −log σ(β h), h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r).

    ``label_smoothing`` ε gives the conservative DPO form
    −(1−ε) log σ(βh) − ε log σ(−βh).
    """
    z = beta * _h(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    ls = label_smoothing
    return -(1.0 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)


def ipo_loss(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    ref_chosen_logp: Array,
    ref_rejected_logp: Array,
    *,
    tau: float = 0.1,
) -> Array:
    """IPO (Azar et al. 2023, arXiv 2310.12036): (h − 1/(2τ))² with h as in DPO.

    Reading: h uses summed sequence log-probs as in the paper (TRL averages per token;
    pass per-token means to get that variant).
    """
    h = _h(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    return (h - 1.0 / (2.0 * tau)) ** 2


def simpo_loss(
    policy_chosen_logp: Array,
    policy_rejected_logp: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> Array:
    """SimPO (arXiv 2405.14734): −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ).

    Reference-free, length-normalised; γ is the target reward margin (default
    β·0.5 = 1, the paper's γ/β = 0.5). Lengths must be ≥ 1 (ValueError for concrete
    inputs; clamped at 1 under tracing).
    """
    _same(policy_chosen_logp, policy_rejected_logp=policy_rejected_logp,
          chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    for field, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if not isinstance(x, jax.core.Tracer) and bool(jnp.any(jnp.asarray(x) < 1)):
            raise ValueError(f"{field} must be >= 1, got {x}")
    lc = jnp.maximum(chosen_lengths, 1).astype(policy_chosen_logp.dtype)
    lr = jnp.maximum(rejected_lengths, 1).astype(policy_chosen_logp.dtype)
    z = beta * policy_chosen_logp / lc - beta * policy_rejected_logp / lr - gamma
    return -jax.nn.log_sigmoid(z)


def distillation_reverse_kl(logp: Array, teacher_logp: Array, mask: Array) -> Array:
    """On-policy distillation: per-token reverse KL(π_θ ‖ π_teacher) on student samples.

    Value: k1_t = log π_θ(o_t) − log π_T(o_t) (0 on masked tokens). Gradient: the
    score-function form sg(k1_t)·∇log π_θ(o_t) (per-token reward −k1_t, no future sum,
    as in GKD arXiv 2306.13649 / on-policy distillation), written as
    sg(k1) + sg(k1)·(logp − sg(logp)), so that the direct ∇k1 = ∇logp term (zero in
    expectation, pure noise) is not added.
    """
    _same(logp, teacher_logp=teacher_logp, mask=mask)
    k1 = sg(masked(logp - teacher_logp, mask))
    return k1 + k1 * masked(logp - sg(logp), mask)
