"""Per-token policy surrogates (losses to minimise).

Common signature, so that ``compose`` can take any of them (bind hyperparameters
with ``functools.partial``)::

    surrogate(logp [B,T], old_logp [B,T], advantages [B,T], mask [B,T], *,
              axis_name=None, **hyperparameters) -> (loss [B,T], SurrogateInfo)

The per-token loss is 0 on masked tokens. Log-ratios are clamped (default ±20)
before exp. Sequence-level surrogates (GSPO, GMPO) broadcast the sequence loss ℓ_i
to every valid token of row i; with ``seq_mean_token_mean`` aggregation this gives
exactly (1/B) Σ_i ℓ_i. Their sequence advantage is the masked token mean of
``advantages`` over the row (= A_i when the advantage was broadcast).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlx.objectives.aggregation import masked, psum, safe_div
from rlx.objectives.ratios import DEFAULT_LOG_RATIO_CLAMP, log_ratio
from rlx.objectives.types import SurrogateInfo

Array = jax.Array
sg = jax.lax.stop_gradient


def _check(logp, old_logp, advantages, mask):
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} has shape {x.shape}, expected logp's shape {logp.shape}")
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B,T], got shape {logp.shape}")
    return (mask > 0).astype(logp.dtype), masked(advantages, mask)


def _seq_mean(x: Array, m: Array) -> Array:
    return safe_div(masked(x, m).sum(-1), m.sum(-1))


def ppo_clip_loss(
    logp, old_logp, advantages, mask, *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name: str | None = None,
):
    """PPO clipped surrogate (arXiv 1707.06347) with clip-higher and dual-clip.

    ℓ = max(−A r, −A clip(r, 1−ε_low, 1+ε_high)); ε_high defaults to ε_low
    (DAPO clip-higher, arXiv 2503.14476, uses 0.2/0.28). Dual-clip (arXiv 1912.09729)
    with constant c > 1: for A < 0, ℓ = min(ℓ, −c A). The gradient is exactly zero
    where A > 0 and r > 1+ε_high (``clipped_high``), where A < 0 and r < 1−ε_low
    (``clipped_low``), and where A < 0 and r > c (``scalars['dual_clip_frac']``).
    """
    m, a = _check(logp, old_logp, advantages, mask)
    eps_high = eps_low if eps_high is None else eps_high
    r = jnp.exp(log_ratio(logp, old_logp, m, clamp=clamp))
    loss = jnp.maximum(-a * r, -a * jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high))
    scalars = {}
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
        dual = (a < 0) & (r > dual_clip)
        loss = jnp.where(a < 0, jnp.minimum(loss, -a * dual_clip), loss)
        scalars["dual_clip_frac"] = safe_div(psum((dual * m).sum(), axis_name),
                                             psum(m.sum(), axis_name))
    info = SurrogateInfo(
        clipped_low=((a < 0) & (r < 1.0 - eps_low)).astype(m.dtype) * m,
        clipped_high=((a > 0) & (r > 1.0 + eps_high)).astype(m.dtype) * m,
        scalars=scalars,
    )
    return loss * m, info


def policy_gradient_loss(logp, old_logp, advantages, mask, *, axis_name=None):
    """Plain REINFORCE / GPG (arXiv 2504.02546): ℓ = −A log π_θ (no ratio, on-policy)."""
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    return -a * masked(logp, m), SurrogateInfo()


def importance_sampled_loss(
    logp, old_logp, advantages, mask, *,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name=None,
):
    """Unclipped importance-sampled surrogate ℓ = −r A (R²VPO's primal term)."""
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    return -a * jnp.exp(log_ratio(logp, old_logp, m, clamp=clamp)) * m, SurrogateInfo()


def gspo_loss(
    logp, old_logp, advantages, mask, *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    clamp: float = 10.0,
    axis_name=None,
):
    """GSPO (arXiv 2507.18071): sequence ratio s_i = exp((1/|o_i|) Σ_t log r_{i,t}).

    ℓ_i = max(−A_i s_i, −A_i clip(s_i, 1−ε_low, 1+ε_high)), broadcast to the valid
    tokens of row i. The mean log-ratio is clamped at ±``clamp`` (verl uses 10).
    Unclipped gradient: −A_i s_i (1/|o_i|) Σ_t ∇log π(o_{i,t}).
    """
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    seq_lr = jnp.clip(_seq_mean(logp - sg(old_logp), m), -clamp, clamp)
    s = jnp.exp(seq_lr)
    a_seq = _seq_mean(a, m)
    loss = jnp.maximum(-a_seq * s, -a_seq * jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high))
    valid = (m.sum(-1) > 0).astype(m.dtype)
    lo = ((a_seq < 0) & (s < 1.0 - eps_low)).astype(m.dtype) * valid
    hi = ((a_seq > 0) & (s > 1.0 + eps_high)).astype(m.dtype) * valid
    info = SurrogateInfo(clipped_low=lo[:, None] * m, clipped_high=hi[:, None] * m)
    return loss[:, None] * m, info


def gspo_token_loss(
    logp, old_logp, advantages, mask, *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    clamp: float = 10.0,
    axis_name=None,
):
    """GSPO-token (arXiv 2507.18071): s_{i,t} = sg[s_i] · π_θ(o_{i,t}) / sg[π_θ(o_{i,t})].

    In log space: logp − sg(logp) + sg(mean log-ratio), clamped at ±``clamp``.
    ℓ_{i,t} = max(−A_{i,t} s_{i,t}, −A_{i,t} clip(s_{i,t}, 1−ε_low, 1+ε_high)). Its
    value equals GSPO's and its gradient w.r.t. logp_{i,t} is −A_{i,t} s_i (own token only).
    """
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    seq_lr = _seq_mean(logp - old_logp, m)
    lr = masked(logp - sg(logp) + sg(seq_lr)[:, None], m)
    s = jnp.exp(jnp.minimum(lr, clamp))
    loss = jnp.maximum(-a * s, -a * jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high))
    info = SurrogateInfo(
        clipped_low=((a < 0) & (s < 1.0 - eps_low)).astype(m.dtype) * m,
        clipped_high=((a > 0) & (s > 1.0 + eps_high)).astype(m.dtype) * m,
    )
    return loss * m, info


def gmpo_loss(
    logp, old_logp, advantages, mask, *,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name=None,
):
    """GMPO (arXiv 2507.20673): geometric mean of token ratios clipped in log space.

    d = log r, s = sign(A_i), d̃ = s·min(s·d, s·clip(d, −ε_low, ε_high)),
    ρ̄_i = exp((1/|o_i|) Σ_t d̃), ℓ_i = −A_i ρ̄_i broadcast to row i's valid tokens.
    A token is frozen when d leaves the band in the direction sign(A_i) favours.
    """
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    d = log_ratio(logp, old_logp, m, clamp=clamp)
    a_seq = _seq_mean(a, m)
    s = jnp.sign(a_seq)[:, None]
    d_t = s * jnp.minimum(s * d, s * jnp.clip(d, -eps_low, eps_high))
    rho = jnp.exp(_seq_mean(d_t, m))
    loss = -a_seq * rho
    info = SurrogateInfo(
        clipped_low=((s < 0) & (d < -eps_low)).astype(m.dtype) * m,
        clipped_high=((s > 0) & (d > eps_high)).astype(m.dtype) * m,
    )
    return loss[:, None] * m, info


def cispo_loss(
    logp, old_logp, advantages, mask, *,
    eps_low: float = 10.0,
    eps_high: float = 0.2,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name=None,
):
    """CISPO (MiniMax-M1, arXiv 2506.13585): ℓ = −sg(clip(r, 1−ε_low, 1+ε_high)) A log π_θ.

    Every token keeps a gradient −r̂ A ∇log π; only its weight is capped. Defaults
    follow verl's example (ε_low = 10, i.e. no lower bound; weight capped at 1.2).
    ``clipped_low/high`` mark tokens whose weight was capped.
    """
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    r = jnp.exp(log_ratio(logp, old_logp, m, clamp=clamp))
    w = sg(jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high))
    info = SurrogateInfo(
        clipped_low=(r < 1.0 - eps_low).astype(m.dtype) * m,
        clipped_high=(r > 1.0 + eps_high).astype(m.dtype) * m,
    )
    return -w * a * masked(logp, m), info


def sapo_loss(
    logp, old_logp, advantages, mask, *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name=None,
):
    """SAPO (arXiv 2511.20347): ℓ = −σ(τ(r−1))·(4/τ)·A, τ = τ_pos if A > 0 else τ_neg.

    Gradient −4 s(1−s) r A ∇log π with s = σ(τ(r−1)): weight 1 at r = 1, decaying smoothly.
    """
    del axis_name
    m, a = _check(logp, old_logp, advantages, mask)
    r = jnp.exp(log_ratio(logp, old_logp, m, clamp=clamp))
    tau = jnp.where(a > 0, tau_pos, tau_neg)
    return -jax.nn.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * a * m, SurrogateInfo()


def bapo_candidates(
    *,
    low_range: tuple[float, float] = (0.6, 0.9),
    high_range: tuple[float, float] = (1.2, 3.0),
    step_low: float = 0.02,
    step_high: float = 0.05,
) -> list[tuple[float, float]]:
    """BAPO Algorithm 1's visiting order of (c_low, c_high), as a static Python list.

    Start (a⁻, a⁺); while c_low + δ₂ ≤ b⁻: raise c_high by δ₁ while c_high + δ₁ ≤ b⁺,
    afterwards raise c_low by δ₂ (upper bound first, as in the paper).
    """
    (a_lo, b_lo), (a_hi, b_hi) = low_range, high_range
    n_lo = int(math.floor((b_lo - a_lo) / step_low + 1e-9))
    n_hi = int(math.floor((b_hi - a_hi) / step_high + 1e-9))
    cands = [(a_lo, a_hi)]
    if n_lo == 0:  # the while-condition c_low + δ₂ ≤ b⁻ fails at once
        return cands
    cands += [(a_lo, a_hi + k * step_high) for k in range(1, n_hi + 1)]
    top = a_hi + n_hi * step_high
    cands += [(a_lo + j * step_low, top) for j in range(1, n_lo + 1)]
    return cands


def bapo_bounds(
    logp, old_logp, advantages, mask, *,
    rho0: float = 0.4,
    low_range=(0.6, 0.9),
    high_range=(1.2, 3.0),
    step_low: float = 0.02,
    step_high: float = 0.05,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name: str | None = None,
):
    """BAPO's balance search (arXiv 2510.18927 Eq. 8, Algorithm 1), vectorised.

    Positive share ρ(c_low, c_high) = P(c_high) / (P(c_high) + N(c_low)), with
    P = Σ_{A>0} A·min(r, c_high)·m and N = Σ_{A<0} |A|·max(r, c_low)·m, which are the
    absolute clipped-surrogate contributions of positive / negative tokens (the
    paper's π_rollout factor is dropped, as in the official code). P and N are
    evaluated for every candidate of ``bapo_candidates`` in one pass and summed over
    ``axis_name`` (batch-global, as the paper). The first candidate in search order
    with ρ ≥ ρ₀ is chosen; if none is feasible, the last one visited (Algorithm 1's
    exit point). ρ is 1 when P + N = 0. Returns (c_low, c_high, ρ, feasible).
    """
    m, a = _check(logp, old_logp, advantages, mask)
    r = sg(jnp.exp(log_ratio(logp, old_logp, m, clamp=clamp)))
    a = sg(a)
    cands = bapo_candidates(
        low_range=low_range, high_range=high_range, step_low=step_low, step_high=step_high
    )
    lows = jnp.asarray([c[0] for c in cands], r.dtype)
    highs = jnp.asarray([c[1] for c in cands], r.dtype)
    pos_w = jnp.where(a > 0, a, 0.0) * m
    neg_w = jnp.where(a < 0, -a, 0.0) * m

    def contrib(c):
        lo, hi = c
        return (pos_w * jnp.minimum(r, hi)).sum(), (neg_w * jnp.maximum(r, lo)).sum()

    pos, neg = jax.lax.map(contrib, (lows, highs))
    pos, neg = psum(pos, axis_name), psum(neg, axis_name)
    tot = pos + neg
    share = jnp.where(tot > 0, pos / jnp.where(tot > 0, tot, 1.0), 1.0)
    ok = share >= rho0
    idx = jnp.where(ok.any(), jnp.argmax(ok), len(cands) - 1)
    return lows[idx], highs[idx], share[idx], ok.any()


def bapo_loss(
    logp, old_logp, advantages, mask, *,
    rho0: float = 0.4,
    low_range=(0.6, 0.9),
    high_range=(1.2, 3.0),
    step_low: float = 0.02,
    step_high: float = 0.05,
    dual_clip: float | None = None,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name: str | None = None,
):
    """BAPO (arXiv 2510.18927): PPO clip with ratio bounds chosen by ``bapo_bounds``.

    ℓ = max(−A r, −A clip(r, c_low, c_high)) (+ optional dual-clip). The chosen
    bounds, the achieved positive share and feasibility are in ``info.scalars``.
    """
    c_low, c_high, share, feasible = bapo_bounds(
        logp, old_logp, advantages, mask, rho0=rho0, low_range=low_range,
        high_range=high_range, step_low=step_low, step_high=step_high, clamp=clamp,
        axis_name=axis_name,
    )
    loss, info = ppo_clip_loss(
        logp, old_logp, advantages, mask, eps_low=1.0 - c_low, eps_high=c_high - 1.0,
        dual_clip=dual_clip, clamp=clamp, axis_name=axis_name,
    )
    scalars = dict(info.scalars)
    scalars.update({
        "bapo/c_low": c_low, "bapo/c_high": c_high,
        "bapo/positive_share": share, "bapo/feasible": feasible.astype(loss.dtype),
    })
    return loss, info.replace(scalars=scalars)


def truncated_is_weights(
    old_logp, sampler_logp, mask, *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    axis_name: str | None = None,
):
    """Sampler/trainer mismatch correction w = π_old / π_sampler (no gradient).

    level="token": w_t = exp(old_logp_t − sampler_logp_t).
    level="sequence": w_i = exp(Σ_t (old_logp − sampler_logp) m) (product of token
        ratios, log clamped at ±``clamp``), broadcast to row i's tokens.
    mode="truncate": w ← min(w, cap) (truncated IS, TIS);
    mode="mask": w ← w · 1[w ≤ cap] (masked IS: outlier tokens / sequences dropped).
    Returns (weights [B,T] (0 on masked tokens), fraction of valid tokens affected,
    global over ``axis_name``).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    if sampler_logp.shape != old_logp.shape:
        raise ValueError(
            f"sampler_logp has shape {sampler_logp.shape}, expected {old_logp.shape}")
    m = (mask > 0).astype(old_logp.dtype)
    lr = sg(masked(old_logp - sampler_logp, m))
    if level == "token":
        w = jnp.exp(jnp.clip(lr, -clamp, clamp))
    else:
        w = jnp.broadcast_to(jnp.exp(jnp.clip(lr.sum(-1), -clamp, clamp))[:, None], lr.shape)
    over = (w > cap).astype(m.dtype)
    w = jnp.minimum(w, cap) if mode == "truncate" else w * (1.0 - over)
    return w * m, safe_div(psum((over * m).sum(), axis_name), psum(m.sum(), axis_name))
