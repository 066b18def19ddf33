"""Clipped value loss for the PPO critic (arXiv 1707.06347; OpenAI baselines ppo2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx.objectives.aggregation import masked, masked_mean
from rlx.objectives.types import Regularizer

Array = jax.Array


def clipped_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float | None = 0.2,
) -> tuple[Array, Array]:
    """ℓ_t = ½ max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²) on valid tokens.

    ``clip_eps=None`` gives the plain ½(V − R)². Returns (loss [B,T], clipped [B,T]
    indicator of tokens where the clipped branch is the larger one).
    """
    for field, x in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if x.shape != values.shape:
            raise ValueError(f"{field} has shape {x.shape}, expected values' shape {values.shape}")
    m = (mask > 0).astype(values.dtype)
    v, vo, ret = masked(values, m), masked(old_values, m), masked(returns, m)
    unclipped = (v - ret) ** 2
    if clip_eps is None:
        return 0.5 * unclipped * m, jnp.zeros_like(m)
    clipped = (jnp.clip(v, vo - clip_eps, vo + clip_eps) - ret) ** 2
    return 0.5 * jnp.maximum(unclipped, clipped) * m, (clipped > unclipped).astype(m.dtype) * m


def value_loss(
    *, coef: float = 0.5, clip_eps: float | None = 0.2, name: str = "value"
) -> Regularizer:
    """Critic loss term coef·``clipped_value_loss``; needs TokenOutputs.values and
    PolicyBatch.old_values / returns. Metrics: ``{name}/loss``, ``{name}/clip_frac``."""

    def apply(outputs, batch, state, *, axis_name=None):
        for field, x in (("TokenOutputs.values", outputs.values),
                         ("PolicyBatch.old_values", batch.old_values),
                         ("PolicyBatch.returns", batch.returns)):
            if x is None:
                raise ValueError(f"value_loss needs `{field}`, which is None")
        loss, clipped = clipped_value_loss(outputs.values, batch.old_values, batch.returns,
                                           batch.mask, clip_eps=clip_eps)
        metrics = {
            f"{name}/loss": masked_mean(jax.lax.stop_gradient(loss), batch.mask,
                                        axis_name=axis_name),
            f"{name}/clip_frac": masked_mean(clipped, batch.mask, axis_name=axis_name),
        }
        return coef * loss, None, metrics

    return Regularizer(name=name, init=lambda: (), apply=apply, update=lambda s, m: s)
