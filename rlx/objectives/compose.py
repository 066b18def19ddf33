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
from rlx.objectives.selection import Shaping
from rlx.objectives.types import (
    NEEDS, AdvantageOutput, LossOutput, Objective, PolicyBatch, Regularizer, RewardBatch,
    TokenOutputs,
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


class AdvantageStage:
    """A RewardBatch -> AdvantageOutput function with optional state (``init()``).

    ``__call__(rb)`` reads its state from ``rb.state`` and returns the new one in
    ``AdvantageOutput.state`` (None when stateless). ``compose`` keeps it under
    ``state["advantages"]`` of the objective state.
    """

    def __init__(self, fn: Callable, init: Callable | None = None):
        self._fn, self._init = fn, init

    def init(self):
        return None if self._init is None else self._init()

    def __call__(self, rb: RewardBatch) -> AdvantageOutput:
        return self._fn(rb)


def group_advantages(
    estimator: Callable[[Array], Array],
    *,
    filter_zero_variance: bool = False,
    reward_shaping: Callable[[Array], Array] | None = None,
    shaping: Sequence[Callable | Shaping] = (),
    selection: Sequence[Callable] = (),
    components: bool = False,
) -> AdvantageStage:
    """Adapt a group estimator ``rewards [P,G](,K) -> advantages [P,G]`` to a RewardBatch.

    reward_shaping: optional ``lengths [B] -> [B]`` added to the scalar rewards before
        the estimator (e.g. DAPO's overlong penalty).
    shaping: further terms added to the scalar rewards, each ``rb -> [B]`` or a
        stateful ``selection.Shaping`` (repetition penalties, ``rlx.objectives.selection``).
    selection: sample selections ``(rb, advantages [P,G]) -> keep`` (bool [P,G], [B]
        or [B,T]) multiplied into the loss mask after the estimator (D³S down-sampling,
        truncation filter); advantages are not renormalised.
    filter_zero_variance: drop (mask out) the groups whose *unshaped* rewards are all
        equal (DAPO dynamic sampling's criterion on accuracy), via
        ``masks.zero_variance_group_mask``.
    components: the estimator takes the per-component rewards [P,G,K]
        (``rb.components``, or ``rb.rewards`` when it is 3-D) — GDPO.
    Metrics: ``adv/kept_groups`` (fraction of groups kept), ``adv/kept_rows`` with
    selections, and each shaping term's own.
    """
    shaping = tuple(shaping)
    selection = tuple(selection)
    stateful = [s for s in shaping if isinstance(s, Shaping)]
    names = [s.name for s in stateful]
    if len(set(names)) != len(names):
        raise ValueError(f"shaping names must be unique, got {names}")

    def advantages(rb: RewardBatch) -> AdvantageOutput:
        p, g = check_rewards(rb)
        if components:
            comp = rb.components if rb.components is not None else rb.rewards
            if comp.ndim != 3:
                raise ValueError("this estimator needs reward components [P,G,K] "
                                 "(RewardBatch.components), got "
                                 f"{None if rb.components is None else rb.components.shape}")
            scalar = (jnp.sum(comp, -1) if rb.rewards.ndim == 3 else rb.rewards)
            if shaping or reward_shaping is not None:
                raise ValueError("reward shaping applies to scalar rewards, not to "
                                 "components=True estimators")
        else:
            scalar = rb.rewards
        rewards = scalar.astype(jnp.float32)
        metrics, new_state = {}, {}
        if not components:
            if (reward_shaping is not None or shaping) and rewards.ndim != 2:
                raise ValueError("reward shaping needs scalar rewards [P,G]")
            if reward_shaping is not None:
                rewards = rewards + reward_shaping(lengths_of(rb)).reshape(p, g)
            for term in shaping:
                if isinstance(term, Shaping):
                    st = None if rb.state is None else rb.state.get(term.name)
                    if st is None:
                        st = term.init()
                    extra, m, new_state[term.name] = term.apply(rb, st)
                    metrics.update(m)
                else:
                    extra = term(rb)
                rewards = rewards + jnp.asarray(extra, jnp.float32).reshape(p, g)
        adv = estimator(comp.astype(jnp.float32) if components else rewards)
        mask = (rb.mask > 0).astype(jnp.float32)
        if filter_zero_variance:
            if scalar.ndim != 2:
                raise ValueError("filter_zero_variance needs scalar rewards [P,G]")
            keep = zero_variance_group_mask(scalar).astype(jnp.float32)  # [P]
            mask = mask * jnp.repeat(keep, g)[:, None]
            metrics["adv/kept_groups"] = keep.mean()
        for select in selection:
            keep = jnp.asarray(select(rb, adv.reshape(p, g))).astype(jnp.float32)
            if keep.shape in ((p, g), (p * g,)):
                keep = keep.reshape(p * g, 1)
            elif keep.shape != mask.shape:
                raise ValueError(f"sample selection returned shape {keep.shape}; expected "
                                 f"[P,G]={(p, g)}, [B]={(p * g,)} or [B,T]={mask.shape}")
            mask = mask * keep
        if selection:
            metrics["adv/kept_rows"] = jnp.mean((mask.sum(-1) > 0).astype(jnp.float32))
        return AdvantageOutput(advantages=broadcast_to_tokens(adv.reshape(p * g), mask),
                               mask=mask, metrics=metrics,
                               state=new_state if stateful else None)

    init = (lambda: {s.name: s.init() for s in stateful}) if stateful else None
    return AdvantageStage(advantages, init)


def compose(
    *,
    surrogate: Callable,
    advantages: Callable[[RewardBatch], AdvantageOutput],
    aggregation: Callable[[Array, Array], tuple[Array, Array]] = token_mean,
    regularizers: Sequence[Regularizer] = (),
    is_correction: Callable | None = None,
    token_selection: Sequence[Callable] = (),
    needs: Sequence[str] = (),
    metric_eps: tuple[float, float] = (0.2, 0.2),
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
) -> Objective:
    """Assemble an Objective.

    surrogate: ``(logp, old_logp, advantages, mask, *, axis_name) -> (loss [B,T], SurrogateInfo)``
        (``rlx.objectives.surrogates``; bind hyperparameters with functools.partial).
    advantages: ``(RewardBatch) -> AdvantageOutput`` (e.g. ``group_advantages(...)``);
        an ``AdvantageStage`` with state keeps it in ``state["advantages"]``.
    aggregation: ``(loss [B,T], mask [B,T]) -> (numerator, denominator)``.
    regularizers: Regularizer terms with unique names; their states are ``state[name]``.
    is_correction: optional
        ``(old_logp, sampler_logp, mask, *, axis_name) -> (weights [B,T], frac)``
        (e.g. ``partial(truncated_is_weights, level="token", cap=2.)``) multiplying the
        surrogate per token; needs ``PolicyBatch.sampler_logp``.
    token_selection: ``(outputs, batch, state) -> bool [B,T]`` masks evaluated on the current
        policy's outputs (``rlx.objectives.selection``: forking tokens, D³S tokens);
        they multiply the loss mask of every term.
    needs: extra inputs the advantage stage reads (``types.NEEDS``, e.g. "values" for
        GAE, "ref_logp" for KL in the reward); KL regularizers, ``is_correction`` and
        entropy-based pieces add theirs automatically.
    metric_eps: (ε_low, ε_high) of the trust band used by ``ratio_metrics``.

    Metrics (always): ``loss/total``, ``loss/policy``, the ``ratio/*`` statistics,
    ``adv/{mean,std,min,max}``, ``surrogate/clip_frac_{low,high}`` where the surrogate
    reports them, ``entropy/mean`` when entropy is given, ``selection/kept_tokens`` with
    token selection, and each part's own metrics.
    """
    regularizers = tuple(regularizers)
    names = [r.name for r in regularizers]
    if len(set(names)) != len(names):
        raise ValueError(f"regularizer names must be unique, got {names}")

    if "advantages" in names:
        raise ValueError("'advantages' is reserved for the advantage stage's state")
    token_selection = tuple(token_selection)
    bad = sorted(set(needs) - set(NEEDS))
    if bad:
        raise ValueError(f"compose(needs=...): unknown {bad}; expected a subset of {NEEDS}")
    need = set(needs)
    if any(getattr(r, "needs_reference", False) or r.name.startswith("kl")
           for r in regularizers):
        need.add("ref_logp")
    if is_correction is not None:
        need.add("sampler_logp")
    if token_selection or any(r.name.startswith("entropy") for r in regularizers):
        need.add("entropy")
    adv_init = getattr(advantages, "init", None)

    def init():
        state = {r.name: r.init() for r in regularizers}
        inner = adv_init() if adv_init is not None else None
        if inner is not None:
            state["advantages"] = inner
        return state

    def advantage_stage(rb: RewardBatch) -> AdvantageOutput:
        full = rb.state if isinstance(rb.state, dict) else None
        out = advantages(rb.replace(state=None if full is None else full.get("advantages")))
        if out.state is not None and full is not None:
            return out.replace(state={**full, "advantages": out.state})
        return out.replace(state=None)

    def loss(outputs: TokenOutputs, batch: PolicyBatch, state, *, axis_name=None) -> LossOutput:
        check_batch(outputs, batch)
        mask = (batch.mask > 0).astype(outputs.logp.dtype)
        metrics = {}
        if token_selection:
            before = mask
            for select in token_selection:
                keep = select(outputs, batch.replace(mask=mask), state)
                mask = mask * sg(keep).astype(mask.dtype)
            metrics["selection/kept_tokens"] = safe_div(psum(mask.sum(), axis_name),
                                                        psum(before.sum(), axis_name))
        batch = batch.replace(mask=mask)
        tok, info = surrogate(outputs.logp, batch.old_logp, batch.advantages, mask,
                              axis_name=axis_name)
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
        new = {r.name: r.update(state[r.name], metrics) for r in regularizers}
        if isinstance(state, dict) and "advantages" in state:
            new["advantages"] = state["advantages"]
        return new

    return Objective(init=init, loss=loss, update=update, advantages=advantage_stage,
                     needs=frozenset(need))
