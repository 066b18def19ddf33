"""Named objectives, each nothing but a ``compose`` call a user could have written.

Every preset returns an :class:`Objective`; the constructors (only they) are
``gin.configurable`` under the module ``rlx.objectives``
(e.g. ``rlx.objectives.dapo.eps_high = 0.3``).
Rewards come in a :class:`RewardBatch` ([P,G] scalar rewards, [P,G,K] for ``gdpo``).
Regularizers with a zero coefficient are left out, so presets without KL do not
need ``ref_logp``.
"""

from __future__ import annotations

import functools
import math

import gin
import jax
import jax.numpy as jnp

from rlx.objectives import advantages as adv_lib
from rlx.objectives.aggregation import (
    seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean,
)
from rlx.objectives.compose import AdvantageStage, check_rewards, compose, group_advantages
from rlx.objectives.groups import whiten
from rlx.objectives.masks import d3s_schedule, max_variance_subset_mask, top_score_token_mask
from rlx.objectives.regularizers import entropy_bonus, kl_penalty, ratio_variance_penalty
from rlx.objectives.shaping import overlong_penalty
from rlx.objectives import selection as sel
from rlx.objectives import surrogates as S
from rlx.objectives.types import AdvantageOutput, Objective, RewardBatch
from rlx.objectives.value import value_loss

_configurable = functools.partial(gin.configurable, module="rlx.objectives")


def _regs(kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, kl_target=None):
    regs = []
    if kl_coef:
        regs.append(kl_penalty(coef=kl_coef, estimator=kl_estimator, target=kl_target))
    if entropy_coef:
        regs.append(entropy_bonus(coef=entropy_coef))
    return tuple(regs)


def _grpo_adv(eps=1e-6, unbiased_std=False, **kw):
    return group_advantages(
        functools.partial(adv_lib.grpo_advantages, eps=eps, unbiased_std=unbiased_std), **kw)


@_configurable
def grpo(*, eps_low: float = 0.2, eps_high: float | None = None, kl_coef: float = 0.04,
         kl_estimator: str = "k3", entropy_coef: float = 0.0, std_eps: float = 1e-6,
         unbiased_std: bool = False) -> Objective:
    """GRPO (DeepSeekMath, arXiv 2402.03300): group-normalised advantage, PPO clip,
    k3 KL loss with β = 0.04, seq-mean-token-mean."""
    return compose(
        advantages=_grpo_adv(std_eps, unbiased_std),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps_low, eps_high=eps_high),
        aggregation=seq_mean_token_mean,
        regularizers=_regs(kl_coef, kl_estimator, entropy_coef),
        metric_eps=(eps_low, eps_low if eps_high is None else eps_high),
    )


@_configurable
def dr_grpo(*, eps: float = 0.2, max_length: int = 3000, kl_coef: float = 0.0) -> Objective:
    """Dr.GRPO (arXiv 2503.20783): A = R − mean_G R; Σ_t ℓ / L_max averaged over sequences."""
    return compose(
        advantages=group_advantages(adv_lib.dr_grpo_advantages),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps),
        aggregation=functools.partial(seq_mean_token_sum_norm, norm_constant=max_length),
        regularizers=_regs(kl_coef),
        metric_eps=(eps, eps),
    )


@_configurable
def dapo(*, eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = 10.0,
         filter_zero_variance: bool = True, overlong: bool = True, max_length: int = 20480,
         overlong_buffer: int = 4096, overlong_factor: float = 1.0,
         overlong_filter: bool = False, std_eps: float = 1e-6) -> Objective:
    """DAPO (arXiv 2503.14476): clip-higher 0.2/0.28 (+ verl's dual-clip c = 10),
    token-mean, zero-variance group filter, soft overlong penalty, no KL.

    The zero-variance filter masks groups out of the loss (``RLConfig.dynamic_sampling``
    also oversamples, as DAPO's dynamic sampling does); it is judged on the unshaped
    rewards. ``overlong_filter`` adds the paper's alternative, overlong *filtering*:
    truncated completions leave the loss (``selection.drop_truncated``).
    """
    shaping = (functools.partial(overlong_penalty, max_length=max_length,
                                 buffer=overlong_buffer, factor=overlong_factor)
               if overlong else None)
    return compose(
        advantages=_grpo_adv(std_eps, filter_zero_variance=filter_zero_variance,
                             reward_shaping=shaping,
                             selection=(sel.drop_truncated(),) if overlong_filter else ()),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps_low, eps_high=eps_high,
                                    dual_clip=dual_clip),
        aggregation=token_mean,
        metric_eps=(eps_low, eps_high),
    )


@_configurable
def gspo(*, eps_low: float = 3e-4, eps_high: float = 4e-4, token_level: bool = False) -> Objective:
    """GSPO (arXiv 2507.18071): length-normalised sequence ratio, seq-mean-token-mean, no KL.
    ``token_level`` selects GSPO-token."""
    sur = S.gspo_token_loss if token_level else S.gspo_loss
    return compose(
        advantages=_grpo_adv(),
        surrogate=functools.partial(sur, eps_low=eps_low, eps_high=eps_high),
        aggregation=seq_mean_token_mean,
        metric_eps=(eps_low, eps_high),
    )


@_configurable
def cispo(*, eps_low: float = 10.0, eps_high: float = 0.2) -> Objective:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clipped stop-gradient IS weight, token-mean."""
    return compose(
        advantages=_grpo_adv(),
        surrogate=functools.partial(S.cispo_loss, eps_low=eps_low, eps_high=eps_high),
        aggregation=token_mean,
        metric_eps=(min(eps_low, 1.0), eps_high),
    )


@_configurable
def rloo(*, eps: float = 0.2, kl_coef: float = 0.0) -> Objective:
    """RLOO (arXiv 2402.14740): leave-one-out baseline, PPO clip, token-mean."""
    return compose(
        advantages=group_advantages(adv_lib.rloo_advantages),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps),
        aggregation=token_mean,
        regularizers=_regs(kl_coef, "k3"),
        metric_eps=(eps, eps),
    )


@_configurable
def reinforce_pp(*, baseline: bool = True, eps: float = 0.2, kl_coef: float = 1e-5,
                 kl_reward_coef: float = 0.0, gamma: float = 1.0) -> Objective:
    """REINFORCE++ (arXiv 2501.03262), OpenRLHF reference.

    baseline=True (REINFORCE++-baseline, the RLVR recommendation): R − mean_G R, return,
    global whitening; KL as a k2 loss with coefficient ``kl_coef`` (1e-5).
    baseline=False: token rewards R at EOS − β·KL_t (β = ``kl_reward_coef``, KL_t from
    ``RewardBatch.kl``, k1 recommended), return-to-go with γ, global whitening.
    Both use the PPO clip with ε = 0.2, token-mean.
    """

    def advantages(rb: RewardBatch) -> AdvantageOutput:
        check_rewards(rb)
        kl = rb.kl if kl_reward_coef else None
        if baseline:
            a = adv_lib.reinforce_pp_baseline_advantages(
                rb.rewards, rb.mask, kl_penalty=None if kl is None else kl_reward_coef * kl)
        else:
            tok = adv_lib.outcome_token_rewards(rb.rewards, rb.mask, kl=kl, beta=kl_reward_coef)
            a = adv_lib.reinforce_pp_advantages(tok, rb.mask, gamma=gamma)
        return AdvantageOutput(advantages=a, mask=(rb.mask > 0).astype(jnp.float32))

    return compose(
        advantages=advantages,
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps),
        aggregation=token_mean,
        regularizers=_regs(kl_coef, "k2"),
        needs=("ref_logp",) if kl_reward_coef else (),
        metric_eps=(eps, eps),
    )


@_configurable
def ppo(*, eps: float = 0.2, gamma: float = 1.0, lam: float = 0.95, vf_coef: float = 0.5,
        value_clip: float | None = 0.2, kl_reward_coef: float = 0.0,
        entropy_coef: float = 0.0, whiten_advantages: bool = True) -> Objective:
    """PPO for LMs (arXiv 1707.06347; Ouyang et al. 2022): outcome reward at EOS minus
    β·KL_t in the reward, GAE(γ, λ) with the critic's ``RewardBatch.values``, whitened
    advantages, PPO clip, clipped value loss × ``vf_coef``, token-mean."""

    def advantages(rb: RewardBatch) -> AdvantageOutput:
        check_rewards(rb)
        if rb.values is None:
            raise ValueError("ppo needs `RewardBatch.values` (critic values), which is None")
        kl = rb.kl if kl_reward_coef else None
        tok = adv_lib.outcome_token_rewards(rb.rewards, rb.mask, kl=kl, beta=kl_reward_coef)
        a, ret = adv_lib.gae(tok, rb.values, rb.mask, gamma=gamma, lam=lam)
        if whiten_advantages:
            a = whiten(a, rb.mask)
        return AdvantageOutput(advantages=a, returns=ret, mask=(rb.mask > 0).astype(jnp.float32))

    # vf_coef > 0: the critic's values come from the same forward (TokenOutputs.values,
    # shared trunk). vf_coef = 0: no value term here; a separate critic is trained by
    # the engine's value step (rlx.train.steps.make_value_step), as RLTrainer does.
    regs = ((value_loss(coef=vf_coef, clip_eps=value_clip),) if vf_coef else ()) + \
        _regs(entropy_coef=entropy_coef)
    return compose(
        advantages=advantages,
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps),
        aggregation=token_mean,
        regularizers=regs,
        needs=("values",) + (("ref_logp",) if kl_reward_coef else ()),
        metric_eps=(eps, eps),
    )


@_configurable
def bnpo(*, eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = 10.0,
         r_min: float = 0.0, r_max: float = 1.0, momentum: float = 0.0) -> Objective:
    """BNPO (arXiv 2506.02864): Beta-normalised advantage, clip 0.2/0.28, c = 10,
    seq-mean-token-sum. The Beta fit (α, β) is a state of the objective
    (``state["advantages"]``, ``advantages.bnpo_update``): refit from each batch with
    ``momentum = 0`` (the official code), an EMA of the reward moments otherwise."""

    def stage(rb: RewardBatch) -> AdvantageOutput:
        check_rewards(rb)
        st = rb.state if rb.state is not None else adv_lib.bnpo_init(momentum=momentum)
        st = adv_lib.bnpo_update(st, rb.rewards, r_min=r_min, r_max=r_max)
        out = group_advantages(functools.partial(
            adv_lib.bnpo_advantages, alpha=st.alpha, beta=st.beta, r_min=r_min,
            r_max=r_max))(rb)
        return out.replace(state=st, metrics={**out.metrics, "bnpo/alpha": st.alpha,
                                              "bnpo/beta": st.beta})

    return compose(
        advantages=AdvantageStage(stage, lambda: adv_lib.bnpo_init(momentum=momentum)),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps_low, eps_high=eps_high,
                                    dual_clip=dual_clip),
        aggregation=seq_mean_token_sum,
        metric_eps=(eps_low, eps_high),
    )


@_configurable
def gdpo(*, weights: tuple[float, ...] | None = None, eps: float = 0.2,
         std_eps: float = 1e-4, kl_coef: float = 0.0) -> Objective:
    """GDPO (arXiv 2601.05242): per-component group normalisation, weighted sum, batch
    renormalisation on the per-component rewards ``RewardBatch.components`` [P,G,K]
    (the reward spec's components; ``weights`` here weight the normalised components,
    default 1). PPO clip, seq-mean-token-mean (TRL GRPO default)."""
    w = None if weights is None else jnp.asarray(weights, jnp.float32)
    return compose(
        advantages=group_advantages(
            functools.partial(adv_lib.gdpo_advantages, weights=w, eps=std_eps),
            components=True),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps),
        aggregation=seq_mean_token_mean,
        regularizers=_regs(kl_coef),
        metric_eps=(eps, eps),
    )


@_configurable
def bapo(*, rho0: float = 0.4, low_range: tuple[float, float] = (0.6, 0.9),
         high_range: tuple[float, float] = (1.2, 3.0), step_low: float = 0.02,
         step_high: float = 0.05, dual_clip: float | None = None) -> Objective:
    """BAPO (arXiv 2510.18927): GRPO advantages, adaptive clip bounds (paper defaults,
    paper search order), token-mean, no KL."""
    return compose(
        advantages=_grpo_adv(),
        surrogate=functools.partial(S.bapo_loss, rho0=rho0, low_range=low_range,
                                    high_range=high_range, step_low=step_low,
                                    step_high=step_high, dual_clip=dual_clip),
        aggregation=token_mean,
        metric_eps=(1.0 - low_range[0], high_range[0] - 1.0),
    )


@_configurable
def r2vpo(*, delta: float = 0.02, eta: float = 1.0, lambda_init: float = 0.04,
          about: str = "mean") -> Objective:
    """R²VPO (arXiv 2601.03320): unclipped ρA with the ratio-variance Lagrangian term
    λ(Var̂[ρ] − δ) and dual ascent on λ; GRPO advantages, token-mean. See
    ``regularizers.ratio_variance_penalty`` for the reading and defaults."""
    return compose(
        advantages=_grpo_adv(),
        surrogate=S.importance_sampled_loss,
        aggregation=token_mean,
        regularizers=(ratio_variance_penalty(delta=delta, eta=eta, lambda_init=lambda_init,
                                             about=about),),
    )


@_configurable
def sapo(*, tau_pos: float = 1.0, tau_neg: float = 1.05) -> Objective:
    """SAPO (arXiv 2511.20347): soft sigmoid gate (4/τ form), seq-mean-token-mean."""
    return compose(
        advantages=_grpo_adv(),
        surrogate=functools.partial(S.sapo_loss, tau_pos=tau_pos, tau_neg=tau_neg),
        aggregation=seq_mean_token_mean,
    )


@_configurable
def gmpo(*, eps_low: float = 0.4, eps_high: float = 0.4) -> Objective:
    """GMPO (arXiv 2507.20673): geometric-mean ratio clipped in log space (±0.4),
    averaged over sequences."""
    return compose(
        advantages=_grpo_adv(),
        surrogate=functools.partial(S.gmpo_loss, eps_low=eps_low, eps_high=eps_high),
        aggregation=seq_mean_token_mean,
        metric_eps=(1.0 - math.exp(-eps_low), math.exp(eps_high) - 1.0),
    )


@_configurable
def d3s(*, total_iterations: int = 40, sample_frac_init: float = 0.5,
        sample_frac_final: float = 1.0, token_frac_init: float = 0.2,
        token_frac_final: float = 1.0, per_group: bool = False, eps_low: float = 0.2,
        eps_high: float = 0.28) -> Objective:
    """D³S (arXiv 2509.22115): GRPO advantages from the full groups, then the
    max-variance subset of N_s(p) rollouts (cross-group over all P·G rows by default,
    ``masks.max_variance_subset_mask``) and, among their tokens, the top K(p) by |A|·H
    (``masks.top_score_token_mask``); [N_s, K](p) = (1−p)·init + p·final with
    p = iteration / ``total_iterations`` (``masks.d3s_schedule``). The sample budget is
    given as a fraction of the P·G rows (N = round(frac·P·G)) and K as a token fraction;
    the paper publishes no defaults: 0.5 → 1.0 rollouts, 0.2 → 1.0 tokens is rlx's
    choice (aggressive early, relaxing late, as the paper describes). The iteration
    count is the objective's state (``state["advantages"]["iteration"]``). Clip
    0.2/0.28, token-mean, no KL."""
    for name, v in (("sample_frac_init", sample_frac_init),
                    ("sample_frac_final", sample_frac_final),
                    ("token_frac_init", token_frac_init), ("token_frac_final", token_frac_final)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"d3s.{name} must be in [0, 1], got {v}")
    if total_iterations < 1:
        raise ValueError(f"d3s.total_iterations must be >= 1, got {total_iterations}")
    base = _grpo_adv()

    def progress(it):
        return jnp.minimum(it.astype(jnp.float32) / total_iterations, 1.0)

    def stage(rb: RewardBatch) -> AdvantageOutput:
        p, g = check_rewards(rb)
        it = (rb.state["iteration"] if rb.state is not None
              else jnp.zeros((), jnp.int32))
        budget = d3s_schedule(progress(it), n_init=round(sample_frac_init * p * g),
                              n_final=round(sample_frac_final * p * g),
                              k_init=token_frac_init, k_final=token_frac_final)
        out = base(rb)
        m = out.mask
        adv = (out.advantages * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)   # row's A
        k = jnp.minimum(budget.num_samples, p * g) if not per_group else \
            jnp.maximum(budget.num_samples // p, 1)
        keep = max_variance_subset_mask(adv.reshape(p, g), k=k, per_group=per_group)
        mask = out.mask * keep.reshape(p * g, 1).astype(out.mask.dtype)
        return out.replace(mask=mask, advantages=out.advantages * mask,
                           state={"iteration": it + 1},
                           metrics={**out.metrics, "d3s/kept_rows": keep.mean(),
                                    "d3s/token_keep_ratio": budget.keep_ratio})

    def tokens(outputs, batch, state):
        it = state["advantages"]["iteration"] - 1 if state else jnp.zeros((), jnp.int32)
        ratio = d3s_schedule(progress(jnp.maximum(it, 0)), n_init=0, n_final=0,
                             k_init=token_frac_init, k_final=token_frac_final).keep_ratio
        return top_score_token_mask(jax.lax.stop_gradient(batch.advantages),
                                    jax.lax.stop_gradient(outputs.entropy), batch.mask,
                                    keep_ratio=ratio)

    return compose(
        advantages=AdvantageStage(stage, lambda: {"iteration": jnp.zeros((), jnp.int32)}),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps_low, eps_high=eps_high),
        aggregation=token_mean,
        token_selection=(tokens,),
        metric_eps=(eps_low, eps_high),
    )


@_configurable
def forking_tokens(*, top_quantile: float = 0.2, eps_low: float = 0.2,
                   eps_high: float = 0.28) -> Objective:
    """"Beyond the 80/20 rule" (arXiv 2506.01939): DAPO-style clip-higher policy
    gradient on only the batch's top-20% highest-entropy tokens
    (``selection.high_entropy_tokens``), GRPO advantages, token-mean, no KL."""
    return compose(
        advantages=_grpo_adv(),
        surrogate=functools.partial(S.ppo_clip_loss, eps_low=eps_low, eps_high=eps_high),
        aggregation=token_mean,
        token_selection=(sel.high_entropy_tokens(top_quantile=top_quantile),),
        metric_eps=(eps_low, eps_high),
    )


PRESETS = {f.__name__: f for f in (grpo, dr_grpo, dapo, gspo, cispo, rloo, reinforce_pp, ppo,
                                    bnpo, gdpo, bapo, r2vpo, sapo, gmpo, d3s, forking_tokens)}
