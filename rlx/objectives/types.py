"""Named pytrees shared by every objective piece.

Shapes: B batch rows (B = P * G, row ``b = p * G + g``), P prompts, G group size,
T completion tokens, K reward components.

An :class:`Objective` is what the training engine consumes:

* ``advantages(rb: RewardBatch) -> AdvantageOutput`` turns rewards into per-token
  advantages (and returns, and the loss mask after sample selection). It is
  stateless; the engine calls it once per rollout batch, outside the gradient.
* ``init() -> state`` builds the objective state (a pytree carried in the train state:
  adaptive KL coefficient, R²VPO's dual variable, ...).
* ``loss(outputs: TokenOutputs, batch: PolicyBatch, state, *, axis_name=None)
  -> LossOutput`` is the differentiable part, called on every (micro-)batch.
* ``update(state, metrics) -> state`` is called once per optimizer step with the
  metrics returned by ``loss`` (for dual ascent, adaptive KL, ...).

How the engine combines ``LossOutput`` over micro-batches and devices: every
aggregation returns a ``(numerator, denominator)`` pair whose numerators and
denominators are plain sums over rows, so the full-batch loss is exactly
``sum(numerator) / sum(denominator)`` (sums over micro-batches and devices). The
denominator never depends on the parameters, so the exact full-batch gradient is
``sum_mb grad(numerator_mb) / sum_mb denominator_mb``. ``LossOutput.loss`` is
``numerator / max(denominator, 1)`` of the batch the call saw (after a ``psum`` over
``axis_name`` when one is given), i.e. the full loss when the call sees the full batch.
Under ``shard_map`` data parallelism pass ``axis_name``: ``jax.grad`` of ``loss`` is then
exactly the full-batch gradient (tested), batch-global statistics (ratio variance, BAPO
bounds, metrics) included. With sequential micro-batches, statistics that are not sums
(R²VPO's Var̂, BAPO's bounds) are per micro-batch (global across devices).
A batch with no valid token has numerator = denominator = 0 and therefore loss 0 and
zero gradient (documented masking, never NaN).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from flax import struct

Array = jax.Array
PyTree = Any


@struct.dataclass
class TokenOutputs:
    """What one forward pass of the policy (and critic) gives.

    logp: [B,T] log-prob of the sampled tokens under the current parameters.
    entropy: [B,T] full-vocabulary entropy of the current policy, or None.
    values: [B,T] critic values, or None.
    """

    logp: Array
    entropy: Array | None = None
    values: Array | None = None


@struct.dataclass
class PolicyBatch:
    """Per-token arrays fixed during the optimisation of one rollout batch.

    mask: [B,T] 1 for completion tokens that enter the loss (bool or float).
    old_logp: [B,T] log-probs under the behaviour (trainer-side old) policy.
    advantages: [B,T] per-token advantages.
    ref_logp: [B,T] reference-policy log-probs (KL terms), or None.
    sampler_logp: [B,T] log-probs reported by the inference engine (truncated IS), or None.
    old_values: [B,T] critic values at rollout time (clipped value loss), or None.
    returns: [B,T] value targets, or None.
    group_ids: [B] prompt index of each row, or None.
    """

    mask: Array
    old_logp: Array
    advantages: Array
    ref_logp: Array | None = None
    sampler_logp: Array | None = None
    old_values: Array | None = None
    returns: Array | None = None
    group_ids: Array | None = None


@struct.dataclass
class RewardBatch:
    """Input of an advantage estimator: everything the rollout phase knows.

    rewards: [P,G] scalar outcome rewards (the weighted total of the components), or
        [P,G,K] reward components (then ``components`` may be None).
    mask: [B,T] loss mask (completion tokens that were sampled, not forced), B = P * G,
        row ``p * G + g``.
    lengths: [B] completion lengths in tokens, or None (then ``mask.sum(-1)``).
    values: [B,T] critic values at rollout time (GAE), or None.
    kl: [B,T] per-token KL estimate of the rollout for the reward path, or None. The
        engine fills it with ``kl.kl_reward_penalty(old_logp, ref_logp, mask, coef=1.0)``
        (k1) whenever a reference policy exists. Estimators multiply it by their own
        coefficient (``kl_reward_coef`` in the presets); for an adaptive coefficient
        (``kl.adaptive_kl_init/update`` tracked by the engine) pass ``coef=β`` here and
        set the estimator's coefficient to 1.
    components: [P,G,K] per-component rewards (GDPO, ``rlx.rewards.spec``), or None.
    tokens: [B,T] completion token ids (repetition shaping), or None.
    finished: [B] bool, the row ended with a sampled stop token, or None.
    truncated: [B] bool, the row hit the length limit without a stop token, or None.
    forced: [B,T] bool, forced-prefix tokens (fed, not sampled), or None.
    state: the advantage stage's own state (``compose`` passes ``state["advantages"]``
        of the objective state), or None.
    """

    rewards: Array
    mask: Array
    lengths: Array | None = None
    values: Array | None = None
    kl: Array | None = None
    components: Array | None = None
    tokens: Array | None = None
    finished: Array | None = None
    truncated: Array | None = None
    forced: Array | None = None
    state: PyTree = None


@struct.dataclass
class AdvantageOutput:
    """Output of an advantage estimator.

    advantages: [B,T] per-token advantages (0 on masked tokens).
    mask: [B,T] loss mask after sample selection (e.g. DAPO's zero-variance filter);
        the engine must put this mask, not the rollout mask, into ``PolicyBatch``.
    returns: [B,T] value targets (GAE), or None.
    metrics: dict of scalars.
    state: the advantage stage's new state (stateful shaping, BNPO's running Beta
        fit), or None when the stage is stateless; ``compose`` stores it back into
        ``state["advantages"]`` of the objective state.
    """

    advantages: Array
    mask: Array
    returns: Array | None = None
    metrics: dict = struct.field(default_factory=dict)
    state: PyTree = None


@struct.dataclass
class LossOutput:
    """loss = numerator / max(denominator, 1); see the module docstring."""

    loss: Array
    numerator: Array
    denominator: Array
    metrics: dict


@struct.dataclass
class SurrogateInfo:
    """Per-token diagnostics of a surrogate (None where not meaningful).

    clipped_low / clipped_high: [B,T] float indicators of tokens where the lower /
    upper clip is active in the surrogate (for PPO: the gradient is zero there).
    scalars: dict of scalar diagnostics (e.g. BAPO's chosen bounds).
    """

    clipped_low: Array | None = None
    clipped_high: Array | None = None
    scalars: dict = struct.field(default_factory=dict)


class Regularizer(NamedTuple):
    """A loss term with optional state (adaptive KL, R²VPO dual variable).

    apply(outputs, batch, state, *, axis_name) -> (token_loss [B,T] | None,
        scalar_loss | None, metrics dict). ``token_loss`` is aggregated with the
        objective's aggregation; ``scalar_loss`` is a batch-global scalar added to
        the loss (folded into the numerator as ``denominator * scalar``).
    update(state, metrics) -> state, called once per optimizer step.
    """

    name: str
    init: Callable[[], PyTree]
    apply: Callable[..., tuple]
    update: Callable[[PyTree, dict], PyTree]


NEEDS = ("ref_logp", "sampler_logp", "values", "entropy")


class Objective(NamedTuple):
    """A complete RL objective; see the module docstring for the protocol.

    needs: which optional inputs the objective reads, a subset of ``NEEDS``:
      "ref_logp" (a frozen reference policy: KL loss or KL in the reward),
      "sampler_logp" (the inference engine's log-probs: IS correction),
      "values" (critic values at rollout time: GAE), "entropy" (token entropy of the
      current policy). The engine builds what is needed and fails before compiling
      when it cannot (e.g. "values" without a critic).
    """

    init: Callable[[], PyTree]
    loss: Callable[..., LossOutput]
    update: Callable[[PyTree, dict], PyTree]
    advantages: Callable[[RewardBatch], AdvantageOutput]
    needs: frozenset = frozenset()
