"""Pieces that plug into ``group_advantages`` and ``compose``: reward shaping on
tokens, sample selection and token selection.

Three kinds, each a small pure function (or an ``init/apply`` pair when it has state):

* **Reward shaping** (``group_advantages(shaping=...)``): ``rb -> [B]`` added to the
  scalar reward of each row before the estimator. Stateful shaping is a
  :class:`Shaping` whose state lives in the objective state
  (``state["advantages"][name]``) and is updated once per rollout batch.
* **Sample selection** (``group_advantages(selection=...)``):
  ``(rb, advantages [P, G]) -> keep`` with ``keep`` bool ``[P, G]``, ``[B]`` or
  ``[B, T]``; it multiplies the loss mask after the advantages are computed
  (advantages are not renormalised).
* **Token selection** (``compose(token_selection=...)``):
  ``(outputs: TokenOutputs, batch: PolicyBatch, state) -> bool [B, T]`` (``state`` is
  the objective state) evaluated inside the
  loss on the current policy's outputs (entropy); it multiplies the loss mask of the
  surrogate, the regularizers and the aggregation.

A composition that uses them (GRPO with D³S down-sampling and the 80/20 forking-token
mask, DAPO's overlong filter and a 4-gram repetition penalty)::

    obj = compose(
        advantages=group_advantages(grpo_advantages,
                                    shaping=(repetition(weight=0.5),),
                                    selection=(drop_truncated(), d3s_samples(k=4))),
        surrogate=functools.partial(ppo_clip_loss, eps_low=0.2, eps_high=0.28),
        token_selection=(high_entropy_tokens(top_quantile=0.2),),
    )

Shapes: P prompts, G group size, B = P·G rows (row ``p·G + g``), T completion tokens.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlx.objectives import masks, shaping as shaping_lib
from rlx.objectives.types import PolicyBatch, RewardBatch, TokenOutputs

Array = jax.Array


class Shaping(NamedTuple):
    """Stateful reward shaping.

    init() -> state; apply(rb, state) -> (term [B], metrics dict, new_state).
    """

    name: str
    init: Callable[[], Any]
    apply: Callable[[RewardBatch, Any], tuple]


def _need(rb: RewardBatch, field: str, who: str):
    x = getattr(rb, field)
    if x is None:
        raise ValueError(f"{who} needs `RewardBatch.{field}`, which is None")
    return x


# ----------------------------------------------------------------------- shaping
def overlong(*, max_length: int, buffer: int, factor: float = 1.0) -> Callable:
    """DAPO soft overlong punishment on the completion lengths (see
    ``shaping.overlong_penalty``): rb -> [B]."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"need 0 < buffer <= max_length, got buffer={buffer}, "
                         f"max_length={max_length}")

    def term(rb: RewardBatch) -> Array:
        lengths = rb.lengths if rb.lengths is not None else (rb.mask > 0).sum(-1)
        return shaping_lib.overlong_penalty(lengths, max_length=max_length, buffer=buffer,
                                            factor=factor)

    return term


def repetition(*, weight: float, n: int = 4, kind: str = "ngram",
               target: float | None = None, lr: float = 0.0,
               max_weight: float = float("inf"), name: str = "repetition") -> Shaping:
    """Repetition penalty −w·f_b on each row's sampled tokens.

    f_b = ``shaping.ngram_repetition_penalty`` (kind="ngram", fraction of repeated
    n-grams) or ``shaping.repetition_loop_fraction`` (kind="loop", MiroMind-M1's
    terminal-loop fraction). With ``target`` set the weight is adaptive (a Lagrange
    multiplier of "batch-mean f ≤ target", ``shaping.repetition_weight_update``:
    w ← clip(w + lr·(mean f − target), 0, max_weight), once per rollout batch, after the
    batch was shaped with the old w); without it w stays fixed.
    Metrics: ``shaping/<name>_fraction`` (batch mean f), ``shaping/<name>_weight``.
    """
    if kind not in ("ngram", "loop"):
        raise ValueError(f"repetition kind must be 'ngram' or 'loop', got {kind!r}")
    adaptive = target is not None

    def init():
        return shaping_lib.repetition_weight_init(
            weight=weight, target=target if adaptive else 0.0, lr=lr if adaptive else 0.0,
            max_weight=max_weight if adaptive else max(weight, 0.0))

    def apply(rb: RewardBatch, state):
        tokens = _need(rb, "tokens", f"repetition shaping {name!r}")
        m = rb.mask > 0
        f = (shaping_lib.ngram_repetition_penalty(tokens, m, n=n) if kind == "ngram"
             else shaping_lib.repetition_loop_fraction(tokens, m))
        rate = jnp.mean(f)
        new = shaping_lib.repetition_weight_update(state, rate) if adaptive else state
        metrics = {f"shaping/{name}_fraction": rate, f"shaping/{name}_weight": state.weight}
        return -state.weight * f, metrics, new

    return Shaping(name=name, init=init, apply=apply)


# -------------------------------------------------------------- sample selection
def drop_truncated() -> Callable:
    """DAPO overlong filtering: rows that hit the length limit without a stop token
    leave the loss (``masks.truncated_completion_mask``); keep [B] = ¬truncated."""

    def select(rb: RewardBatch, advantages: Array) -> Array:
        if rb.truncated is not None:
            return ~rb.truncated.astype(bool)
        return _need(rb, "finished", "drop_truncated").astype(bool)

    return select


def d3s_samples(*, k: int, per_group: bool = True) -> Callable:
    """D³S sample-level down-sampling (arXiv 2509.22115): keep the k rollouts of each
    group (``per_group``) or of the whole batch whose advantages have maximal variance
    (``masks.max_variance_subset_mask``); keep [P, G]."""

    def select(rb: RewardBatch, advantages: Array) -> Array:
        return masks.max_variance_subset_mask(advantages, k=k, per_group=per_group)

    return select


# --------------------------------------------------------------- token selection
def high_entropy_tokens(*, top_quantile: float = 0.2) -> Callable:
    """"Beyond the 80/20 rule" (arXiv 2506.01939): the loss sees only the batch's top
    ``top_quantile`` highest-entropy (forking) tokens of the current policy."""

    def select(outputs: TokenOutputs, batch: PolicyBatch, state=None) -> Array:
        if outputs.entropy is None:
            raise ValueError("high_entropy_tokens needs TokenOutputs.entropy, which is None")
        return masks.high_entropy_token_mask(outputs.entropy, batch.mask,
                                             top_quantile=top_quantile)

    return select


def d3s_tokens(*, keep_ratio: float) -> Callable:
    """D³S token-level selection: keep the ceil(keep_ratio·n) tokens with the largest
    |A|·H (``masks.top_score_token_mask``)."""

    def select(outputs: TokenOutputs, batch: PolicyBatch, state=None) -> Array:
        if outputs.entropy is None:
            raise ValueError("d3s_tokens needs TokenOutputs.entropy, which is None")
        return masks.top_score_token_mask(jax.lax.stop_gradient(batch.advantages),
                                          jax.lax.stop_gradient(outputs.entropy),
                                          batch.mask, keep_ratio=keep_ratio)

    return select
