"""Off-policy corrections for asynchronous RL, composable with ``compose``.

Three per-token log-prob streams exist when rollouts are produced by older policy
versions than the one being trained (B rows, T completion tokens, token t of row b
sampled by behaviour version v_b,t):

    sampler_logp    log π_infer(y_t; v_b,t)  the inference engine's log-prob at the
                    token's behaviour version (after its temperature and truncation);
    behaviour_logp  log π_train(y_t; v_b,t)  the trainer's forward with the weights of
                    that same version (the "old logits" of the seed paper);
    old_logp        log π_train(y_t; v_now)  the trainer's old-policy pass at
                    consumption time (the proximal policy PPO's clip is centred on).

The total importance ratio of a stale token factors as (arXiv 2605.12070, "Missing
Old Logits in Asynchronous Agentic RL", seed 003)::

    π_old / π_infer = [π_train(v_b) / π_infer(v_b)] · [π_old(v_now) / π_train(v_b)]
                       training–inference discrepancy    policy staleness

Reading chosen for the seed paper (its abstract is all the seed gives; the text is
arXiv 2605.12070): the two factors are corrected separately — the discrepancy factor
by masked IS in a band [low, high] (it should be ≈ 1; tokens far outside are
numerical or truncation outliers of the inference engine), the staleness factor by
truncated IS (it is a genuine off-policy weight, large for stale tokens and not an
error). Without the old logits (``behaviour_logp`` missing) a pipeline can only form
the product ``π_old / π_infer``: a band meant for the discrepancy then also masks
every legitimately stale token, and a cap meant for staleness lets engine outliers
through — the "semantic mismatch" the paper names. :func:`decoupled_is_weights` is
the paper's exact route once the old logits are acquired (in rlx the asynchronous
trainer computes them on the rollout side with the very weights each chunk was
sampled with: snapshot-based version tracking, ``rlx.train.async_rl``);
:func:`truncated_is` / :func:`masked_is` on (old_logp, sampler_logp) are the
entangled single-ratio corrections (TIS / MIS, as in verl and slime) that remain
when the old logits are missing.

The paper's approximate route, when the old logits cannot be acquired cheaply, is "a
revised PPO-EWMA method" (what could be read of it: the abstract, and the authors'
README, github.com/millioniron/async_fixed, which speaks of "EWMA-style proximal
reference policies"; not the method section's formulas). rlx reads it as Hilton,
Cobbe & Schulman's PPO-EWMA ("Batch size-invariance for policy optimization", arXiv
2110.00641) carried over to the missing-old-logit setting. A *proximal* policy π_prox = π_train(θ̄), θ̄ the
bias-corrected exponentially weighted moving average of the trainer's parameter
versions (:func:`ewma_init` / :func:`ewma_update`, θ̄_v = Σ_i β^{v−i} θ_i / Σ_i β^{v−i}),
stands in for the missing π_train(v_b): it is a training-side policy (the trainer's
numerics, no engine discrepancy of its own) that lags the current one by a mean age
of ≈ β/(1 − β) versions, as the behaviour versions lag by up to k. The total ratio
then factors as::

    π_θ / π_infer = [π_θ / π_prox] · [π_prox / π_infer]
                     trust region      behaviour factor (≈ the discrepancy when the
                     (PPO clip)        EWMA's age matches the tokens' lag)

and the revised objective (:func:`ewma_decoupled_loss`) is Hilton et al.'s decoupled
PPO with that proximal policy, ℓ_t = −w_t·min(r_t A_t, clip(r_t, 1 − ε, 1 + ε) A_t),
r_t = π_θ/π_prox, with the behaviour weight w_t = :func:`ewma_decoupled_weights`
(ρ = π_prox/π_infer masked outside a band, like the exact route's discrepancy factor;
kept as ρ or 1, optionally truncated). What the paper leaves open and rlx chooses:
the EWMA advances once per policy version (not per optimizer step: versions are what
staleness is counted in), with bias correction; the default β = k/(k + 1) (mean age →
k); the band acts on ρ because π_prox approximates the behaviour version. β = 0 makes
π_prox the current policy, i.e. the "sampler" route. In ``rlx.train.async_rl``
(``AsyncConfig(old_logits="ewma")``) the trainer keeps θ̄ in its checkpoint, computes
π_prox inside the compiled update, drops the tokens outside the band from the loss
mask and hands the objective old_logp = π_prox and sampler_logp = π_infer, so
``compose(surrogate=ppo_clip_loss, is_correction=truncated_is)`` runs the revised
PPO-EWMA loss (truncated instead of banded weights inside the band).

Levels (how the per-token log-ratios ℓ_t = log p_t − log q_t of a row combine):

    "token"      w_t = exp(ℓ_t)
    "sequence"   w_t = exp(Σ_s ℓ_s m_s)                  (product of token ratios)
    "geometric"  w_t = exp(Σ_s ℓ_s m_s / max(Σ_s m_s, 1)) (geometric mean, per row)

each log clamped at ±``clamp`` before exp. Modes against the band [low, high]:

    "truncate"   w ← clip(w, low, high)                  (TIS; low = 0: only a cap)
    "mask"       w ← w · 1[low ≤ w ≤ high]               (MIS: outliers dropped)
    "reject"     w ← 1[low ≤ w ≤ high]                   (masking without reweighting)

Every function returns weights [B, T] that are 0 on masked tokens and carry no
gradient, and the fraction of valid tokens whose ratio left the band (global over
``axis_name`` under ``shard_map``). With ``compose(is_correction=...)`` the weights
multiply the per-token surrogate; a weight of 0 removes the token's gradient while it
still counts in the aggregation's denominator (masking *within* the loss; drop it
from the loss mask instead to change the denominator).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx.objectives.aggregation import masked, masked_mean, psum, safe_div
from rlx.objectives.ratios import DEFAULT_LOG_RATIO_CLAMP
from rlx.objectives.types import Objective, Regularizer

Array = jax.Array
sg = jax.lax.stop_gradient

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask", "reject")


def _check_shapes(**arrays) -> None:
    shape = None
    for name, x in arrays.items():
        if x is None:
            continue
        if x.ndim != 2:
            raise ValueError(f"{name} must be [B,T], got shape {x.shape}")
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise ValueError(f"{name} has shape {x.shape}, expected {shape}")


def _check_band(low: float, high: float, who: str) -> None:
    if not (low >= 0 and high > low):
        raise ValueError(f"{who}: band (low={low!r}, high={high!r}) must satisfy "
                         "0 <= low < high")


def level_log_ratio(log_ratio: Array, mask: Array, *, level: str = "token",
                    clamp: float = DEFAULT_LOG_RATIO_CLAMP) -> Array:
    """Per-token log-weights [B, T] at ``level`` (module docstring), clamped at ±clamp,
    0 on masked tokens. ``log_ratio`` [B, T] = log p − log q per token."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    m = (mask > 0).astype(log_ratio.dtype)
    lr = masked(log_ratio, m)
    if level == "sequence":
        lr = jnp.broadcast_to(lr.sum(-1, keepdims=True), lr.shape)
    elif level == "geometric":
        lr = jnp.broadcast_to(safe_div(lr.sum(-1), m.sum(-1))[:, None], lr.shape)
    return jnp.clip(lr, -clamp, clamp) * m


def band_weights(log_ratio: Array, mask: Array, *, level: str = "token",
                 mode: str = "truncate", low: float = 0.0, high: float = 2.0,
                 clamp: float = DEFAULT_LOG_RATIO_CLAMP, axis_name=None):
    """Importance weights from per-token log-ratios against the band [low, high].

    r = exp(level_log_ratio(log_ratio)); outside = r < low or r > high;
    "truncate": w = clip(r, low, high); "mask": w = r·(1 − outside);
    "reject": w = 1 − outside. Returns (w [B, T] · m (no gradient),
    Σ outside·m / Σ m over the global batch).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_band(low, high, f"band_weights(mode={mode!r})")
    _check_shapes(log_ratio=log_ratio, mask=mask)
    m = (mask > 0).astype(log_ratio.dtype)
    r = jnp.exp(level_log_ratio(sg(log_ratio), m, level=level, clamp=clamp))
    outside = ((r < low) | (r > high)).astype(m.dtype) * m
    if mode == "truncate":
        w = jnp.clip(r, low, high)
    elif mode == "mask":
        w = r * (1.0 - outside)
    else:
        w = 1.0 - outside
    frac = safe_div(psum(outside.sum(), axis_name), psum(m.sum(), axis_name))
    return w * m, frac


def truncated_is(old_logp: Array, sampler_logp: Array, mask: Array, *,
                 level: str = "token", cap: float = 2.0, low: float = 0.0,
                 clamp: float = DEFAULT_LOG_RATIO_CLAMP, axis_name=None):
    """Truncated IS (TIS) w = clip(π_old/π_sampler, low, cap) at ``level``.

    ``compose(is_correction=partial(truncated_is, cap=2.))`` compatible; with
    low = 0 and level "token"/"sequence" it equals
    ``surrogates.truncated_is_weights(mode="truncate")``. Returns (weights, fraction of
    valid tokens whose ratio was truncated)."""
    _check_shapes(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
    return band_weights(old_logp - sampler_logp, mask, level=level, mode="truncate",
                        low=low, high=cap, clamp=clamp, axis_name=axis_name)


def masked_is(old_logp: Array, sampler_logp: Array, mask: Array, *,
              level: str = "token", low: float = 0.5, high: float = 2.0,
              reweight: bool = True, clamp: float = DEFAULT_LOG_RATIO_CLAMP,
              axis_name=None):
    """Masked IS (MIS): tokens (level "token") or whole rows ("sequence",
    "geometric") whose ratio π_old/π_sampler leaves [low, high] get weight 0; the
    others keep w = ratio (``reweight=True``) or 1 (pure rejection). Returns
    (weights, fraction of valid tokens masked); ``is_correction`` compatible."""
    _check_shapes(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
    return band_weights(old_logp - sampler_logp, mask, level=level,
                        mode="mask" if reweight else "reject", low=low, high=high,
                        clamp=clamp, axis_name=axis_name)


def decoupled_is_weights(old_logp: Array, behaviour_logp: Array, sampler_logp: Array,
                         mask: Array, *, discrepancy_level: str = "token",
                         discrepancy_band: tuple[float, float] = (0.5, 2.0),
                         discrepancy_reweight: bool = True,
                         staleness_level: str = "token",
                         staleness_cap: float | None = 2.0,
                         clamp: float = DEFAULT_LOG_RATIO_CLAMP, axis_name=None):
    """The two-factor correction of arXiv 2605.12070 with exact old logits.

    d = π_train(v_b)/π_infer(v_b) = exp(behaviour_logp − sampler_logp) at
    ``discrepancy_level``, masked outside ``discrepancy_band`` (kept as d, or as 1
    with ``discrepancy_reweight=False``); s = π_old(v_now)/π_train(v_b) =
    exp(old_logp − behaviour_logp) at ``staleness_level``, truncated at
    ``staleness_cap`` (None: s is not reweighted, the PPO clip around π_old alone
    bounds the update). w = D(d) · S(s), [B, T], 0 on masked tokens, no gradient.

    Returns (w, {"offpolicy/discrepancy_masked": fraction of valid tokens masked by
    the discrepancy band, "offpolicy/staleness_truncated": fraction truncated by the
    staleness cap}). When ``behaviour_logp == old_logp`` (no staleness) this is
    ``masked_is`` on the discrepancy; when ``behaviour_logp == sampler_logp`` (no
    discrepancy, inside the band) it is ``truncated_is`` on the staleness.
    """
    _check_shapes(old_logp=old_logp, behaviour_logp=behaviour_logp,
                  sampler_logp=sampler_logp, mask=mask)
    low, high = discrepancy_band
    d, d_frac = band_weights(behaviour_logp - sampler_logp, mask, level=discrepancy_level,
                             mode="mask" if discrepancy_reweight else "reject",
                             low=low, high=high, clamp=clamp, axis_name=axis_name)
    if staleness_cap is None:
        s = (mask > 0).astype(d.dtype)
        s_frac = jnp.zeros((), d.dtype)
    else:
        s, s_frac = band_weights(old_logp - behaviour_logp, mask, level=staleness_level,
                                 mode="truncate", low=0.0, high=staleness_cap, clamp=clamp,
                                 axis_name=axis_name)
    return d * s, {"offpolicy/discrepancy_masked": d_frac,
                   "offpolicy/staleness_truncated": s_frac}


# ------------------------------------------------- approximate route: PPO-EWMA
def ewma_init(params) -> dict:
    """The EWMA state of the proximal policy at version 0: {"params": a copy of
    ``params`` (its own buffers, never aliasing the trained ones), "weight": n_0 = 1,
    "age": a_0 = 0} (scalars f32)."""
    return {"params": jax.tree.map(jnp.copy, params),
            "weight": jnp.ones((), jnp.float32), "age": jnp.zeros((), jnp.float32)}


def ewma_update(state: dict, params, *, decay: float) -> dict:
    """One version more in the bias-corrected EWMA of PPO-EWMA (Hilton et al. 2021).

    With β = ``decay`` (0 ≤ β < 1) and θ_0 … θ_v the parameter versions so far, the
    proximal parameters are θ̄_v = Σ_i β^{v−i} θ_i / Σ_i β^{v−i}, kept by

        n' = β·n + 1,   λ = 1/n',   θ̄' = (1 − λ)·θ̄ + λ·θ,   a' = β·n·(a + 1)/n'

    (n: total weight; a: the EWMA's mean age in versions, Σ_i (v−i) β^{v−i} / n,
    → β/(1 − β)). β = 0 gives θ̄' = θ bitwise (the proximal policy is the current one).
    ``state`` as :func:`ewma_init`; pure (jit-able), nothing carries a gradient.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ewma_update: decay={decay!r} must satisfy 0 <= decay < 1")
    n = state["weight"]
    n_new = decay * n + 1.0
    lam = 1.0 / n_new
    mix = lambda avg, p: sg((1.0 - lam).astype(avg.dtype) * avg  # noqa: E731
                            + lam.astype(avg.dtype) * p.astype(avg.dtype))
    return {"params": jax.tree.map(mix, state["params"], params), "weight": n_new,
            "age": decay * n * (state["age"] + 1.0) / n_new}


def ewma_decoupled_weights(proximal_logp: Array, sampler_logp: Array, mask: Array, *,
                           level: str = "token", band: tuple[float, float] = (0.5, 2.0),
                           reweight: bool = True, cap: float | None = None,
                           clamp: float = DEFAULT_LOG_RATIO_CLAMP, axis_name=None):
    """Behaviour weights of the revised PPO-EWMA (arXiv 2605.12070, approximate route).

    ρ = π_prox/π_infer = exp(proximal_logp − sampler_logp) at ``level`` (π_prox: the
    trainer's forward with the EWMA parameters, :func:`ewma_update`; π_infer: the
    inference engine's log-probs at the tokens' behaviour versions). Tokens (rows at
    level "sequence" / "geometric") whose ρ leaves ``band`` = [low, high] get 0; the
    others keep w = ρ (``reweight=True``) or 1, truncated at ``cap`` (None: no cap).
    Returns (w [B, T], 0 on masked tokens, no gradient; fraction of valid tokens whose
    weight was masked or truncated, global over ``axis_name``), so it is
    ``compose(is_correction=...)`` compatible (old_logp = proximal_logp).
    """
    _check_shapes(proximal_logp=proximal_logp, sampler_logp=sampler_logp, mask=mask)
    low, high = band
    _check_band(low, high, "ewma_decoupled_weights(band)")
    if cap is not None and not cap > 0:
        raise ValueError(f"ewma_decoupled_weights: cap={cap!r} must be > 0 or None")
    m = (mask > 0).astype(proximal_logp.dtype)
    w, masked_frac = band_weights(proximal_logp - sampler_logp, m, level=level,
                                  mode="mask" if reweight else "reject", low=low, high=high,
                                  clamp=clamp, axis_name=axis_name)
    if cap is None:
        return w, masked_frac
    capped = (w > cap).astype(m.dtype) * m
    frac = masked_frac + safe_div(psum(capped.sum(), axis_name), psum(m.sum(), axis_name))
    return jnp.minimum(w, cap) * m, frac


def ewma_decoupled_loss(logp: Array, proximal_logp: Array, sampler_logp: Array,
                        advantages: Array, mask: Array, *, eps_low: float = 0.2,
                        eps_high: float | None = None, level: str = "token",
                        band: tuple[float, float] = (0.5, 2.0), reweight: bool = True,
                        cap: float | None = None, clamp: float = DEFAULT_LOG_RATIO_CLAMP,
                        axis_name=None):
    """Per-token loss [B, T] of the revised PPO-EWMA decoupled objective::

        ℓ_t = − w_t · min(r_t·A_t, clip(r_t, 1 − ε_low, 1 + ε_high)·A_t)
        r_t = π_θ/π_prox = exp(logp − proximal_logp)    (trust region: the EWMA policy)
        w_t = :func:`ewma_decoupled_weights` (π_prox/π_infer, banded, no gradient)

    (Hilton et al.'s decoupled PPO objective with the EWMA as proximal policy; the
    behaviour factor is the inference engine's, since the old logits are missing).
    ``eps_high`` None: ε_low. 0 on masked tokens. Returns (ℓ, the weights' fraction).
    In rlx the same loss is ``compose(surrogate=ppo_clip_loss, is_correction=
    ewma_decoupled_weights)`` with ``PolicyBatch.old_logp`` = proximal_logp, which is
    what ``AsyncConfig(old_logits="ewma")`` hands the objective.
    """
    _check_shapes(logp=logp, proximal_logp=proximal_logp, sampler_logp=sampler_logp,
                  advantages=advantages, mask=mask)
    eps_high = eps_low if eps_high is None else eps_high
    w, frac = ewma_decoupled_weights(proximal_logp, sampler_logp, mask, level=level,
                                     band=band, reweight=reweight, cap=cap, clamp=clamp,
                                     axis_name=axis_name)
    m = (mask > 0).astype(logp.dtype)
    r = jnp.exp(jnp.clip(logp - sg(proximal_logp), -clamp, clamp))
    surr = jnp.minimum(r * advantages, jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    return -sg(w) * surr * m, frac


# ------------------------------------------------------------------ diagnostics
def _pmax(x: Array, axis_name) -> Array:
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def mismatch_metrics(old_logp: Array, sampler_logp: Array, mask: Array, *,
                     prefix: str = "offpolicy", clamp: float = DEFAULT_LOG_RATIO_CLAMP,
                     axis_name=None) -> dict:
    """Sampler–trainer log-prob gap over valid tokens (global over ``axis_name``).

    With δ_t = old_logp − sampler_logp: ``<prefix>/gap_mean`` = mean δ,
    ``<prefix>/gap_abs_mean`` = mean |δ|, ``<prefix>/gap_abs_max`` = max |δ|, and
    ``<prefix>/kl_k3`` = mean (e^δ − 1 − δ) (δ clamped at ±clamp), the k3 estimate
    of KL(π_sampler ‖ π_trainer) from the sampled tokens (≥ 0).
    """
    _check_shapes(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
    m = (mask > 0).astype(old_logp.dtype)
    gap = masked(sg(old_logp) - sg(sampler_logp), m)
    dc = jnp.clip(gap, -clamp, clamp)
    return {f"{prefix}/gap_mean": masked_mean(gap, m, axis_name=axis_name),
            f"{prefix}/gap_abs_mean": masked_mean(jnp.abs(gap), m, axis_name=axis_name),
            f"{prefix}/gap_abs_max": _pmax(jnp.max(jnp.abs(gap) * m), axis_name),
            f"{prefix}/kl_k3": masked_mean(jnp.expm1(dc) - dc, m, axis_name=axis_name)}


def mismatch_monitor(*, prefix: str = "offpolicy", name: str = "mismatch_monitor"
                     ) -> Regularizer:
    """A zero-loss Regularizer that logs :func:`mismatch_metrics` of
    (``PolicyBatch.old_logp``, ``PolicyBatch.sampler_logp``) inside the compiled step
    (nothing when the batch has no sampler log-probs)."""

    def apply(outputs, batch, state, *, axis_name=None):
        if batch.sampler_logp is None:
            return None, None, {}
        return None, None, mismatch_metrics(batch.old_logp, batch.sampler_logp, batch.mask,
                                            prefix=prefix, axis_name=axis_name)

    return Regularizer(name=name, init=lambda: (), apply=apply, update=lambda s, m: s)


def monitored(objective: Objective, *, prefix: str = "offpolicy") -> Objective:
    """``objective`` with :func:`mismatch_metrics` added to every loss call's metrics
    (the loss, its gradient and its state are unchanged). Use it for any objective,
    composed or not, whose batches carry ``sampler_logp``."""
    inner = objective.loss

    def loss(outputs, batch, state, *, axis_name=None):
        out = inner(outputs, batch, state, axis_name=axis_name)
        if batch.sampler_logp is None:
            return out
        extra = mismatch_metrics(batch.old_logp, batch.sampler_logp, batch.mask,
                                 prefix=prefix, axis_name=axis_name)
        return out.replace(metrics={**out.metrics, **extra})

    return objective._replace(loss=loss, needs=frozenset(objective.needs) | {"sampler_logp"})
