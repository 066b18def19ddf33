"""Build an :class:`Objective` from interchangeable parts.

    advantage estimator → (selection masks) → surrogate → (IS correction)
      → regularizers → aggregation → LossOutput(loss, numerator, denominator, metrics)

A new objective is a few lines, e.g. GRPO with a KL loss::

    obj = compose(
        advantages=group_advantages(grpo_advantages),
        surrogate=functools.partial(ppo_clip_loss, eps_low=0.2),
        aggregation=seq_mean_token_mean,
        regularizers=(kl_penalty(coef=0.04, estimator="k3"),),
    )

All per-token terms (surrogate, KL, entropy, value loss) are summed per token and
aggregated once (every aggregation is linear in ℓ, so this equals aggregating each
term); batch-global scalar terms (R²VPO's λ(Var̂ − δ)) are folded into the numerator
as ``denominator · scalar``. See ``rlx.objectives.types`` for how the engine combines
``(numerator, denominator)`` across micro-batches and devices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from rlx.objectives.aggregation import masked_mean, psum, safe_div, token_mean
from rlx.objectives.groups import broadcast_to_tokens
from rlx.objectives.masks import zero_variance_group_mask
from rlx.objectives.ratios import DEFAULT_LOG_RATIO_CLAMP, masked_stats, ratio_metrics
from rlx.objectives.types import (
    AdvantageOutput, LossOutput, Objective, PolicyBatch, Regularizer, RewardBatch, TokenOutputs,
)

Array = jax.Array
sg = jax.lax.stop_gradient


def check_batch(outputs: TokenOutputs, batch: PolicyBatch) -> None:
    """Trace-time shape checks; ValueError naming the field and its shape."""
    shape = outputs.logp.shape
    if len(shape) != 2:
        raise ValueError(f"TokenOutputs.logp must be [B,T], got shape {shape}")
    fields = {
        "TokenOutputs.entropy": outputs.entropy, "TokenOutputs.values": outputs.values,
        "PolicyBatch.mask": batch.mask, "PolicyBatch.old_logp": batch.old_logp,
        "PolicyBatch.advantages": batch.advantages, "PolicyBatch.ref_logp": batch.ref_logp,
        "PolicyBatch.sampler_logp": batch.sampler_logp,
        "PolicyBatch.old_values": batch.old_values, "PolicyBatch.returns": batch.returns,
    }
    for field, x in fields.items():
        if x is not None and x.shape != shape:
            raise ValueError(f"{field} has shape {x.shape}, expected logp's shape {shape}")
    if batch.group_ids is not None and batch.group_ids.shape != shape[:1]:
        raise ValueError(
            f"PolicyBatch.group_ids has shape {batch.group_ids.shape}, expected {shape[:1]}")


def check_rewards(rb: RewardBatch) -> tuple[int, int]:
    """Shape checks of a RewardBatch; returns (P, G)."""
    if rb.rewards.ndim not in (2, 3):
        raise ValueError(
            f"RewardBatch.rewards must be [P,G] or [P,G,K], got shape {rb.rewards.shape}")
    p, g = rb.rewards.shape[:2]
    if rb.mask.ndim != 2 or rb.mask.shape[0] != p * g:
        raise ValueError(f"RewardBatch.mask has shape {rb.mask.shape}, expected [P*G={p * g}, T]")
    for field, x in (("values", rb.values), ("kl", rb.kl)):
        if x is not None and x.shape != rb.mask.shape:
            raise ValueError(f"RewardBatch.{field} has shape {x.shape}, expected {rb.mask.shape}")
    if rb.lengths is not None and rb.lengths.shape != (p * g,):
        raise ValueError(f"RewardBatch.lengths has shape {rb.lengths.shape}, expected ({p * g},)")
    return p, g


def lengths_of(rb: RewardBatch) -> Array:
    """[B] completion lengths: ``rb.lengths`` or the mask row sums."""
    return rb.lengths if rb.lengths is not None else (rb.mask > 0).sum(-1)


def group_advantages(
    estimator: Callable[[Array], Array],
    *,
    filter_zero_variance: bool = False,
    reward_shaping: Callable[[Array], Array] | None = None,
) -> Callable[[RewardBatch], AdvantageOutput]:
    """Adapt a group estimator ``rewards [P,G](,K) -> advantages [P,G]`` to a RewardBatch.

    reward_shaping: optional ``lengths [B] -> [B]`` added to the scalar rewards before
        the estimator (e.g. DAPO's overlong penalty).
    filter_zero_variance: drop (mask out) the groups whose *unshaped* rewards are all
        equal (DAPO dynamic sampling's criterion on accuracy), via
        ``masks.zero_variance_group_mask``.
    Metrics: ``adv/kept_groups`` (fraction of groups kept).
    """

    def advantages(rb: RewardBatch) -> AdvantageOutput:
        p, g = check_rewards(rb)
        rewards = rb.rewards.astype(jnp.float32)
        if reward_shaping is not None:
            if rewards.ndim != 2:
                raise ValueError("reward_shaping needs scalar rewards [P,G]")
            rewards = rewards + reward_shaping(lengths_of(rb)).reshape(p, g)
        adv = estimator(rewards).reshape(p * g)
        mask = (rb.mask > 0).astype(jnp.float32)
        metrics = {}
        if filter_zero_variance:
            if rb.rewards.ndim != 2:
                raise ValueError("filter_zero_variance needs scalar rewards [P,G]")
            keep = zero_variance_group_mask(rb.rewards).astype(jnp.float32)  # [P]
            mask = mask * jnp.repeat(keep, g)[:, None]
            metrics["adv/kept_groups"] = keep.mean()
        return AdvantageOutput(advantages=broadcast_to_tokens(adv, mask), mask=mask,
                               metrics=metrics)

    return advantages


def compose(
    *,
    surrogate: Callable,
    advantages: Callable[[RewardBatch], AdvantageOutput],
    aggregation: Callable[[Array, Array], tuple[Array, Array]] = token_mean,
    regularizers: Sequence[Regularizer] = (),
    is_correction: Callable | None = None,
    metric_eps: tuple[float, float] = (0.2, 0.2),
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
) -> Objective:
    """Assemble an Objective.

    surrogate: ``(logp, old_logp, advantages, mask, *, axis_name) -> (loss [B,T], SurrogateInfo)``
        (``rlx.objectives.surrogates``; bind hyperparameters with functools.partial).
    advantages: ``(RewardBatch) -> AdvantageOutput`` (e.g. ``group_advantages(...)``).
    aggregation: ``(loss [B,T], mask [B,T]) -> (numerator, denominator)``.
    regularizers: Regularizer terms with unique names; their states are ``state[name]``.
    is_correction: optional
        ``(old_logp, sampler_logp, mask, *, axis_name) -> (weights [B,T], frac)``
        (e.g. ``partial(truncated_is_weights, level="token", cap=2.)``) multiplying the
        surrogate per token; needs ``PolicyBatch.sampler_logp``.
    metric_eps: (ε_low, ε_high) of the trust band used by ``ratio_metrics``.

    Metrics (always): ``loss/total``, ``loss/policy``, the ``ratio/*`` statistics,
    ``adv/{mean,std,min,max}``, ``surrogate/clip_frac_{low,high}`` where the surrogate
    reports them, ``entropy/mean`` when entropy is given, and each part's own metrics.
    """
    regularizers = tuple(regularizers)
    names = [r.name for r in regularizers]
    if len(set(names)) != len(names):
        raise ValueError(f"regularizer names must be unique, got {names}")

    def init():
        return {r.name: r.init() for r in regularizers}

    def loss(outputs: TokenOutputs, batch: PolicyBatch, state, *, axis_name=None) -> LossOutput:
        check_batch(outputs, batch)
        mask = (batch.mask > 0).astype(outputs.logp.dtype)
        batch = batch.replace(mask=mask)
        tok, info = surrogate(outputs.logp, batch.old_logp, batch.advantages, mask,
                              axis_name=axis_name)
        metrics = {}
        if is_correction is not None:
            if batch.sampler_logp is None:
                raise ValueError("is_correction needs `PolicyBatch.sampler_logp`, which is None")
            w, frac = is_correction(batch.old_logp, batch.sampler_logp, mask, axis_name=axis_name)
            tok = tok * w
            metrics["is/mean_weight"] = masked_mean(w, mask, axis_name=axis_name)
            metrics["is/frac_corrected"] = frac
        pnum, pden = aggregation(sg(tok), mask)
        metrics["loss/policy"] = safe_div(psum(pnum, axis_name), psum(pden, axis_name))
        scalar = jnp.zeros((), tok.dtype)
        for reg in regularizers:
            t, s, m = reg.apply(outputs, batch, state[reg.name], axis_name=axis_name)
            if t is not None:
                tok = tok + t
            if s is not None:
                scalar = scalar + s
            metrics.update(m)
        num, den = aggregation(tok, mask)
        num = num + sg(den) * scalar
        total = safe_div(psum(num, axis_name), psum(den, axis_name))
        metrics["loss/total"] = sg(total)
        metrics.update(ratio_metrics(outputs.logp, batch.old_logp, mask, eps_low=metric_eps[0],
                                     eps_high=metric_eps[1], clamp=clamp, axis_name=axis_name))
        metrics.update(masked_stats(batch.advantages, mask, prefix="adv", axis_name=axis_name))
        if outputs.entropy is not None:
            metrics["entropy/mean"] = masked_mean(sg(outputs.entropy), mask, axis_name=axis_name)
        for side in ("low", "high"):
            ind = getattr(info, f"clipped_{side}")
            if ind is not None:
                metrics[f"surrogate/clip_frac_{side}"] = masked_mean(ind, mask, axis_name=axis_name)
        for k, v in info.scalars.items():  # names without a prefix go under surrogate/
            metrics[k if "/" in k else f"surrogate/{k}"] = v
        return LossOutput(loss=total, numerator=num, denominator=den, metrics=metrics)

    def update(state, metrics):
        return {r.name: r.update(state[r.name], metrics) for r in regularizers}

    return Objective(init=init, loss=loss, update=update, advantages=advantages)
