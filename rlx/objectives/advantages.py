"""Advantage estimators: group baselines, REINFORCE++, GAE, pass@k, BNPO, GDPO.

Shapes: rewards ``[P, G]`` (P prompts, G rollouts each), token arrays ``[B, T]`` with
``B = P * G`` prompt-major and ``mask [B, T]``. Sequence-level estimators return
``[P, G]``; use :func:`rlx.objectives.groups.broadcast_to_tokens` to get ``[B, T]``.

Missing samples: a non-finite reward (NaN/inf) marks a missing sample. It is left out of
every statistic and its advantage is exactly 0, so one bad reward never turns a batch
into NaN. (GDPO follows its paper instead: NaN component rewards become 0.) Shape errors
and degenerate group sizes raise ``ValueError``. Hyperparameters are keyword-only;
ints such as ``k`` must be static under ``jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rlx.objectives.groups import (
    as_float,
    check_group_size,
    check_rank,
    check_shape,
    masked_moments,
    whiten,
)

Array = jax.Array


# ------------------------------------------------------------------------ helpers
def _group_rewards(name: str, rewards: Array, min_group: int = 2):
    r = as_float(rewards)
    check_rank(name, r, 2)
    check_group_size(name, r.shape[1], min_group)
    valid = jnp.isfinite(r)
    return jnp.where(valid, r, 0.0), valid


def _group_shift(r: Array, valid: Array) -> Array:
    """Per-group shift (max valid value, 0 if none) subtracted before summing.

    Group baselines are shift-invariant; summing r − shift makes a constant group give
    deviations of exactly 0 (a float32 mean of equal values is not always exact, and
    eps-scaled rounding noise would otherwise become O(0.1) advantages).
    """
    hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(hi), hi, 0.0)


def _group_center(r: Array, valid: Array, *, unbiased: bool):
    """Per-group deviations r − mean_G, group std and mean over valid entries (last axis).

    Deviations are 0 at invalid entries and exactly 0 for constant groups.
    """
    w = valid.astype(r.dtype)
    n = jnp.sum(w, axis=-1, keepdims=True)
    shift = _group_shift(r, valid)
    rs = jnp.where(valid, r - shift, 0.0)
    mean_s = jnp.sum(rs, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(valid, rs - mean_s, 0.0)
    ddof = 1.0 if unbiased else 0.0
    var = jnp.sum(dev * dev, axis=-1, keepdims=True) / jnp.maximum(n - ddof, 1.0)
    return dev, jnp.sqrt(var), shift + mean_s


# ---------------------------------------------------------------- group baselines
def grpo_advantages(
    rewards: Array,
    *,
    eps: float = 1e-6,
    unbiased_std: bool = False,
    scale_by_std: bool = True,
) -> Array:
    """GRPO group-normalised advantage (DeepSeekMath, arXiv 2402.03300).

    A_i = (r_i − mean_G r) / (std_G r + eps), or r_i − mean_G r if not ``scale_by_std``.

    std is the biased (1/G) estimator by default, ``jnp.std``'s convention;
    ``unbiased_std=True`` gives torch's 1/(G−1) as in TRL/verl. A group whose rewards
    are all equal gets zero advantage. rewards: [P, G], G ≥ 2. Returns [P, G].
    """
    r, valid = _group_rewards("rewards", rewards)
    adv, std, _ = _group_center(r, valid, unbiased=unbiased_std)
    if scale_by_std:
        adv = adv / (std + eps)
    return jnp.where(valid, adv, 0.0)


def dr_grpo_advantages(rewards: Array) -> Array:
    """Dr.GRPO advantage (arXiv 2503.20783): A_i = r_i − mean_G r, no std division."""
    return grpo_advantages(rewards, scale_by_std=False)


def batch_std_advantages(
    rewards: Array, *, eps: float = 1e-6, unbiased_std: bool = False, axis_name=None
) -> Array:
    """Group-mean baseline with batch-level std scaling (Lite PPO, arXiv 2508.08221).

    A_i = (r_i − mean_G r) / (std_batch r + eps), where std_batch is taken over every
    valid reward of the batch (biased by default). With ``axis_name`` the batch std is
    global under data parallelism (rewards sharded over prompts). Returns [P, G].
    """
    r, valid = _group_rewards("rewards", rewards)
    dev, _, _ = _group_center(r, valid, unbiased=False)
    mom = masked_moments(r, valid, unbiased=unbiased_std, axis_name=axis_name)
    return jnp.where(valid, dev / (jnp.sqrt(mom.var) + eps), 0.0)


def rloo_advantages(rewards: Array) -> Array:
    """REINFORCE leave-one-out advantage (Ahmadian et al., arXiv 2402.14740).

    A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) · (r_i − mean), n = valid rollouts of
    the group. Requires G ≥ 2; a group with fewer than 2 valid rewards gets 0.
    """
    r, valid = _group_rewards("rewards", rewards)
    w = valid.astype(r.dtype)
    n = jnp.sum(w, axis=-1, keepdims=True)
    rs = jnp.where(valid, r - _group_shift(r, valid), 0.0)
    total = jnp.sum(rs, axis=-1, keepdims=True)
    adv = rs - (total - rs) / jnp.maximum(n - 1.0, 1.0)
    return jnp.where(valid & (n >= 2), adv, 0.0)


def remax_advantages(rewards: Array, greedy_rewards: Array) -> Array:
    """ReMax advantage (arXiv 2310.10505): A_i = r_i − r(greedy response of prompt).

    rewards: [P, G] (G ≥ 1), greedy_rewards: [P]. A missing greedy reward zeros its
    whole group.
    """
    r, valid = _group_rewards("rewards", rewards, min_group=1)
    g = as_float(greedy_rewards)
    check_shape("greedy_rewards", g, (r.shape[0],))
    ok = valid & jnp.isfinite(g)[:, None]
    return jnp.where(ok, r - jnp.where(jnp.isfinite(g), g, 0.0)[:, None], 0.0)


def opo_advantages(rewards: Array, lengths: Array) -> Array:
    """OPO advantage with the length-weighted optimal baseline (arXiv 2505.23585).

    A_i = r_i − b,  b = Σ_j |o_j| r_j / Σ_j |o_j| over the group; no std scaling.
    lengths: [P, G] completion lengths in tokens (≥ 0). Reading for a group whose
    lengths sum to 0: b falls back to the plain group mean.
    """
    r, valid = _group_rewards("rewards", rewards)
    lengths = as_float(lengths)
    check_shape("lengths", lengths, r.shape)
    w = jnp.where(valid, lengths, 0.0)
    tot = jnp.sum(w, axis=-1, keepdims=True)
    dev, _, _ = _group_center(r, valid, unbiased=False)
    rs = jnp.where(valid, r - _group_shift(r, valid), 0.0)
    weighted = rs - jnp.sum(w * rs, axis=-1, keepdims=True) / jnp.where(tot > 0, tot, 1.0)
    return jnp.where(valid, jnp.where(tot > 0, weighted, dev), 0.0)


def pass_at_k_advantages(
    rewards: Array,
    *,
    k: int,
    normalize_std: bool = False,
    eps: float = 1e-6,
    unbiased_std: bool = True,
    success_threshold: float = 0.0,
) -> Array:
    """Pass@k advantage (arXiv 2503.19595; PKPO, arXiv 2505.15201).

    k = G (verl ``grpo_passk``): objective max_j r_j; leave-one-out advantage
      A_i = max_j r_j − max_{j≠i} r_j, nonzero only for the arg-max sample (ties: the
      first). Any real-valued rewards.
    k < G (PKPO, binary rewards; a reward > ``success_threshold`` is a success; c of
      n = G succeed): the unbiased gradient weight of sample i is
      s_i = k/n if correct, (k/n)·ρ(n−1, c, k−1) otherwise, ρ(n, c, k) = 1 − C(n−c, k)/C(n, k).
      Reading chosen for the baseline: b_i = (k/n)·ρ(n−1, c_{−i}, k−1), the weight i would
      get were it incorrect; it does not depend on sample i, so the estimator stays
      unbiased. Hence A_i = (k/n)·C(n−c, k−1)/C(n−1, k−1) for correct samples and 0 for
      incorrect ones; at k = n this equals the LOO-max formula above.
    ``normalize_std`` divides by std_G(r) + eps (unbiased by default, verl's choice).
    A missing reward counts as the worst sample (a failure) and gets advantage 0.
    """
    r, valid = _group_rewards("rewards", rewards)
    p, n = r.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= G={n}, got k={k}")
    if k == n:
        finite_min = jnp.min(jnp.where(valid, r, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(valid, r, jnp.where(jnp.isfinite(finite_min), finite_min, 0.0))
        order = jnp.argsort(-x, axis=-1, stable=True)
        top1 = jnp.take_along_axis(x, order[:, :1], axis=-1)
        top2 = jnp.take_along_axis(x, order[:, 1:2], axis=-1)
        is_arg = jnp.arange(n)[None, :] == order[:, :1]
        adv = jnp.where(is_arg, top1 - top2, 0.0)
    else:
        correct = valid & (r > success_threshold)
        c = jnp.sum(correct.astype(r.dtype), axis=-1, keepdims=True)
        prod = jnp.ones_like(c)
        for i in range(k - 1):  # C(n−c, k−1) / C(n−1, k−1) as a product
            prod = prod * jnp.maximum(n - c - i, 0.0) / (n - 1 - i)
        adv = jnp.where(correct, (k / n) * prod, 0.0)
    if normalize_std:
        _, std, _ = _group_center(r, valid, unbiased=unbiased_std)
        adv = adv / (std + eps)
    return jnp.where(valid, adv, 0.0)


# ------------------------------------------------------------------- REINFORCE++
def outcome_token_rewards(
    rewards: Array, mask: Array, *, kl: Array | None = None, beta: float = 0.0
) -> Array:
    """Token rewards: the outcome at the last valid token, minus β·KL on every token.

    r_t = 1[t = last valid token]·R − β·KL_t·m_t  (REINFORCE++, arXiv 2501.03262,
    with KL_t e.g. the k1 estimate log π_old − log π_ref). rewards: [B] or [P, G];
    mask: [B, T]; kl: [B, T]. A row without valid tokens gets no outcome reward.
    """
    mask = jnp.asarray(mask)
    check_rank("mask", mask, 2)
    rw = as_float(rewards)
    check_rank("rewards", rw, (1, 2))
    rw = rw.reshape(-1)
    b, t = mask.shape
    if rw.shape[0] != b:
        raise ValueError(f"rewards has {rw.shape[0]} rows but mask has {b} rows")
    m = mask.astype(bool)
    last = t - 1 - jnp.argmax(m[:, ::-1], axis=1)
    at_last = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(m, axis=1)[:, None]
    out = jnp.where(at_last, rw[:, None], 0.0)
    if kl is not None:
        kl = as_float(kl)
        check_shape("kl", kl, mask.shape)
        out = out - beta * jnp.where(m, kl, 0.0)
    return out


def discounted_returns(token_rewards: Array, mask: Array, *, gamma: float = 1.0) -> Array:
    """Return-to-go G_t = Σ_{t'≥t, valid} γ^{(t'−t)} r_{t'} (backward ``lax.scan``).

    Discounting counts positions, masked positions contribute no reward, and the output
    is 0 outside the mask. token_rewards, mask: [B, T].
    """
    x = as_float(token_rewards)
    check_rank("token_rewards", x, 2)
    check_shape("mask", jnp.asarray(mask), x.shape)
    m = jnp.asarray(mask).astype(bool)
    xr = jnp.where(m, x, 0.0)

    def step(carry, r_t):
        g = r_t + gamma * carry
        return g, g

    init = jnp.zeros_like(xr[:, 0])  # zeros_like keeps shard_map's varying type
    _, rets = jax.lax.scan(step, init, xr.T, reverse=True)
    return jnp.where(m, rets.T, 0.0)


def reinforce_pp_advantages(
    token_rewards: Array,
    mask: Array,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    axis_name=None,
) -> Array:
    """REINFORCE++ advantage (arXiv 2501.03262, OpenRLHF reference).

    G_t = Σ_{t'≥t} γ^{t'−t} r_{t'};  A_t = (G_t − μ) / sqrt(max(σ², eps)) where μ, σ²
    are the (biased) mean/variance over all valid tokens of the global batch (psum over
    ``axis_name`` under data parallelism). token_rewards, mask: [B, T] -> [B, T].
    A row with a non-finite token reward on a valid token is a missing sample: left out
    of μ, σ² and given zero advantage.
    """
    x = as_float(token_rewards)
    check_rank("token_rewards", x, 2)
    check_shape("mask", jnp.asarray(mask), x.shape)
    m = jnp.asarray(mask).astype(bool)
    row_ok = jnp.all(jnp.isfinite(x) | ~m, axis=1, keepdims=True)
    m = m & row_ok
    rets = discounted_returns(jnp.where(m, x, 0.0), m, gamma=gamma)
    return whiten(rets, m, eps=eps, axis_name=axis_name)


def reinforce_pp_baseline_advantages(
    rewards: Array,
    mask: Array,
    *,
    kl_penalty: Array | None = None,
    eps: float = 1e-8,
    axis_name=None,
) -> Array:
    """REINFORCE++-baseline (arXiv 2501.03262): group-mean baseline, then whitening.

    R'_i = R_i − mean_G R;  r_t = 1[t = last]·R'_i − kl_penalty_t;  G_t = Σ_{t'≥t} r_{t'}
    (γ = 1, as OpenRLHF forces); A = global masked whitening of G over valid tokens.
    ``kl_penalty`` [B, T] is the already-scaled per-token penalty β·KL_t (None: no KL
    in the reward, the recommended RLVR setting keeps KL in the loss).
    rewards: [P, G], mask: [B, T] with B = P·G. Returns [B, T].
    """
    r = as_float(rewards)
    check_rank("rewards", r, 2)
    check_group_size("rewards", r.shape[1])
    centered = dr_grpo_advantages(r)
    centered = jnp.where(jnp.isfinite(r), centered, jnp.nan)  # keep "missing" marker
    tok = outcome_token_rewards(centered, mask)
    if kl_penalty is not None:
        kp = as_float(kl_penalty)
        check_shape("kl_penalty", kp, tok.shape)
        tok = tok - jnp.where(jnp.asarray(mask).astype(bool), kp, 0.0)
    return reinforce_pp_advantages(tok, mask, gamma=1.0, eps=eps, axis_name=axis_name)


# -------------------------------------------------------------------------- GAE
def gae(
    token_rewards: Array,
    values: Array,
    mask: Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Array, Array]:
    """Generalized Advantage Estimation (Schulman et al., arXiv 1506.02438).

    δ_t = r_t + γ·V_{t+1} − V_t;  A_t = δ_t + γλ·A_{t+1};  returns_t = A_t + V_t.
    Computed with a backward ``lax.scan``. "t+1" is the next *valid* token: masked
    positions are skipped (they neither carry reward nor bootstrap), and after the last
    valid token V = 0 and A = 0 (the episode ends there). So right-padded masks give the
    textbook result on the valid prefix, and values/rewards under the padding are
    ignored. token_rewards, values, mask: [B, T]. Returns (advantages, returns), both
    [B, T] and 0 outside the mask (not whitened).
    """
    r = as_float(token_rewards)
    check_rank("token_rewards", r, 2)
    v = as_float(values)
    check_shape("values", v, r.shape)
    check_shape("mask", jnp.asarray(mask), r.shape)
    m = jnp.asarray(mask).astype(bool)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gamma * lam * next_a
        new = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
        return new, jnp.where(m_t, a_t, 0.0)

    rm, vm = jnp.where(m, r, 0.0), jnp.where(m, v, 0.0)
    zeros = jnp.zeros_like(rm[:, 0] + vm[:, 0])  # keeps shard_map's varying type
    xs = (rm.T, vm.T, m.T)
    _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    adv = adv.T
    return adv, jnp.where(m, adv + v, 0.0)


# ------------------------------------------------------------------------- BNPO
def _beta_inv_pdf(p: Array, alpha, beta, max_inv: float) -> Array:
    logpdf = (
        jax.scipy.special.xlogy(alpha - 1.0, p)
        + jax.scipy.special.xlog1py(beta - 1.0, -p)
        - jax.scipy.special.betaln(alpha, beta)
    )
    return jnp.clip(jnp.exp(-logpdf), 0.0, max_inv)


def bnpo_advantages(
    rewards: Array,
    *,
    alpha,
    beta,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_inv_density: float = 1e6,
) -> Array:
    """BNPO advantage (arXiv 2506.02864): Beta-density normalisation.

    R̃ = clip((R − r_min)/(r_max − r_min), 0, 1);  p = mean_G R̃;
    A_i = (R̃_i − p) / f_Beta(p; α, β), with 1/f clamped to [0, ``max_inv_density``]
    (official code). α = β = 1 is REINFORCE with a mean baseline; α = β = 3/2 is GRPO
    for binary rewards up to a constant. α, β (scalars or traced, e.g. from
    :class:`BNPOState`) come from :func:`bnpo_update`. rewards: [P, G], G ≥ 2 (the
    paper's code sets p = 0 for single-sample groups; rlx rejects G = 1 instead).
    """
    if not r_max > r_min:
        raise ValueError(f"r_max must exceed r_min, got r_min={r_min}, r_max={r_max}")
    r, valid = _group_rewards("rewards", rewards)
    rt = jnp.clip((r - r_min) / (r_max - r_min), 0.0, 1.0)
    dev, _, p = _group_center(rt, valid, unbiased=False)
    inv = _beta_inv_pdf(p, jnp.asarray(alpha, rt.dtype), jnp.asarray(beta, rt.dtype),
                        max_inv_density)
    return jnp.where(valid, dev * inv, 0.0)


@struct.dataclass
class BNPOState:
    """BNPO Beta parameters carried in the training state.

    alpha, beta: current normaliser parameters (1, 1 before the first update).
    mean, var: the (EMA of the) batch moments of per-prompt success rates they came from.
    count: number of updates so far. momentum: static; 0 = refit from each batch.
    """

    alpha: Array
    beta: Array
    mean: Array
    var: Array
    count: Array
    momentum: float = struct.field(pytree_node=False, default=0.0)


def bnpo_init(*, momentum: float = 0.0) -> BNPOState:
    """Initial BNPO state: α = β = 1 (mean baseline) until the first update."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    one = jnp.ones((), jnp.float32)
    return BNPOState(alpha=one, beta=one, mean=jnp.zeros((), jnp.float32),
                     var=jnp.ones((), jnp.float32), count=jnp.zeros((), jnp.int32),
                     momentum=float(momentum))


def bnpo_update(
    state: BNPOState,
    rewards: Array,
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    var_floor: float = 1e-6,
) -> BNPOState:
    """Method-of-moments Beta fit of the per-prompt success rates (BNPO, §3).

    p_q = mean_G R̃ per prompt; m = mean_q p, v = unbiased var_q p;
    a = (m(1−m)/v − 1)·m, b = (m(1−m)/v − 1)·(1−m);  α = max(1, 1 + a/3), β = max(1, 1 + b/3).
    momentum 0 (default): refit from this batch alone, as the paper's code does.
    momentum μ > 0 (rlx extension): EMA of the moments, m ← μ m + (1−μ) m_batch, same for
    v, then refit; the first update takes the batch moments. Readings for degenerate
    batches: fewer than 2 prompts with valid rewards gives m = 0, v = 1 (the official
    code's single-prompt case, α = β = 1); v is floored at ``var_floor`` so identical
    success rates give a large but finite concentration instead of a division by zero.
    """
    if not r_max > r_min:
        raise ValueError(f"r_max must exceed r_min, got r_min={r_min}, r_max={r_max}")
    r, valid = _group_rewards("rewards", rewards)
    rt = jnp.clip((r - r_min) / (r_max - r_min), 0.0, 1.0)
    _, _, p = _group_center(rt, valid, unbiased=False)
    p = p[:, 0]
    has = jnp.any(valid, axis=-1)
    mom = masked_moments(p, has, unbiased=True)
    enough = mom.count >= 2
    m_b = jnp.where(enough, mom.mean, 0.0)
    v_b = jnp.where(enough, mom.var, 1.0)
    mu = state.momentum
    first = state.count == 0
    m = jnp.where(first, m_b, mu * state.mean + (1.0 - mu) * m_b)
    v = jnp.where(first, v_b, mu * state.var + (1.0 - mu) * v_b)
    common = m * (1.0 - m) / jnp.maximum(v, var_floor) - 1.0
    alpha = jnp.maximum(1.0, 1.0 + common * m / 3.0)
    beta = jnp.maximum(1.0, 1.0 + common * (1.0 - m) / 3.0)
    return state.replace(
        alpha=alpha.astype(jnp.float32), beta=beta.astype(jnp.float32),
        mean=m.astype(jnp.float32), var=v.astype(jnp.float32), count=state.count + 1,
    )


# ------------------------------------------------------------ multi-reward, GDPO
def _component_rewards(component_rewards: Array, weights):
    c = as_float(component_rewards)
    check_rank("component_rewards", c, 3)
    check_group_size("component_rewards", c.shape[1])
    k = c.shape[2]
    w = jnp.ones((k,), c.dtype) if weights is None else as_float(weights)
    check_shape("weights", w, (k,))
    return c, w


def gdpo_advantages(
    component_rewards: Array,
    *,
    weights: Array | None = None,
    eps: float = 1e-4,
    unbiased_std: bool = True,
    axis_name=None,
) -> Array:
    """GDPO: group reward-decoupled normalisation (arXiv 2601.05242, official TRL code).

    A^(k)_i = (r^(k)_i − mean_G r^(k)) / (std_G r^(k) + eps) per component k;
    S_i = Σ_k w_k A^(k)_i;  A_i = (S_i − mean_batch S) / (std_batch S + eps).
    NaN component rewards are replaced by 0 first (paper). std is unbiased (torch) by
    default, in both steps. The batch step is over the P·G sequences (TRL reading, not
    verl's token-weighted whitening); with ``axis_name`` it is global under data
    parallelism. component_rewards: [P, G, K], weights: [K] (default 1). Returns [P, G].
    """
    c, w = _component_rewards(component_rewards, weights)
    c = jnp.where(jnp.isnan(c), 0.0, c)
    ct = jnp.moveaxis(c, 2, 0)  # [K, P, G]
    valid = jnp.isfinite(ct)
    ct = jnp.where(valid, ct, 0.0)
    dev, std, _ = _group_center(ct, valid, unbiased=unbiased_std)
    per = jnp.where(valid, dev / (std + eps), 0.0)
    s = jnp.einsum("k,kpg->pg", w, per)
    mom = masked_moments(s, jnp.ones_like(s, bool), unbiased=unbiased_std,
                         axis_name=axis_name)
    return (s - mom.mean) / (jnp.sqrt(mom.var) + eps)


def combine_rewards(
    component_rewards: Array,
    *,
    weights: Array | None = None,
    mode: str = "sum_then_normalize",
    eps: float = 1e-6,
    unbiased_std: bool = False,
) -> Array:
    """Multi-reward advantage: weights with either order of sum and group normalisation.

    "sum_then_normalize" (GRPO on the total): A = grpo(Σ_k w_k r^(k)); a sample missing
      any component is missing.
    "normalize_then_sum": A = Σ_k w_k · grpo(r^(k)); a missing component contributes 0.
      (GDPO, :func:`gdpo_advantages`, adds a batch renormalisation on top of this.)
    component_rewards: [P, G, K], weights: [K] (default 1). Returns [P, G].
    """
    c, w = _component_rewards(component_rewards, weights)
    if mode == "sum_then_normalize":
        total = jnp.einsum("pgk,k->pg", c, w)
        return grpo_advantages(total, eps=eps, unbiased_std=unbiased_std)
    if mode == "normalize_then_sum":
        per = jax.vmap(
            lambda x: grpo_advantages(x, eps=eps, unbiased_std=unbiased_std),
            in_axes=2, out_axes=2,
        )(c)
        return jnp.einsum("pgk,k->pg", per, w)
    raise ValueError(
        f"mode must be 'sum_then_normalize' or 'normalize_then_sum', got {mode!r}"
    )
