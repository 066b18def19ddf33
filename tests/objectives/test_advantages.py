"""Tests for rlx.objectives.advantages against hand values and float64 NumPy transcriptions."""

import functools
import itertools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.objectives import advantages as adv

SETTINGS = settings(max_examples=20, deadline=None)
_gae_jit = jax.jit(adv.gae, static_argnames=("gamma", "lam"))  # eager scan re-traces
RTOL, ATOL = 1e-4, 1e-5


# ------------------------------------------------------------ NumPy transcriptions
def np_grpo(r, eps=1e-6, unbiased=False, scale=True):
    r = np.asarray(r, np.float64)
    out = r - r.mean(-1, keepdims=True)
    if scale:
        out = out / (r.std(-1, ddof=int(unbiased), keepdims=True) + eps)
    return out


def np_batch_std(r, eps=1e-6):
    r = np.asarray(r, np.float64)
    return (r - r.mean(-1, keepdims=True)) / (r.std() + eps)


def np_rloo(r):
    r = np.asarray(r, np.float64)
    p, g = r.shape
    out = np.zeros_like(r)
    for i in range(p):
        for j in range(g):
            others = np.delete(r[i], j)
            out[i, j] = r[i, j] - others.mean()
    return out


def np_opo(r, lengths):
    r = np.asarray(r, np.float64)
    ln = np.asarray(lengths, np.float64)
    return r - (ln * r).sum(-1, keepdims=True) / ln.sum(-1, keepdims=True)


def np_pass_at_k(r, k):
    """Brute force over subsets: s_i − b_i (PKPO effective reward minus LOO-(k−1) baseline)."""
    r = np.asarray(r, np.float64)
    p, n = r.shape
    out = np.zeros_like(r)
    for row in range(p):
        for i in range(n):
            subsets = [s for s in itertools.combinations(range(n), k) if i in s]
            s_i = sum(max(r[row, j] for j in s) for s in subsets) / math.comb(n, k)
            others = [j for j in range(n) if j != i]
            if k == 1:
                b_i = 0.0
            else:
                sub = list(itertools.combinations(others, k - 1))
                b_i = (k / n) * sum(max(r[row, j] for j in s) for s in sub) / len(sub)
            out[row, i] = s_i - b_i
    return out


def np_returns(x, m, gamma):
    x = np.where(m, x, 0.0)
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        g = 0.0
        for t in reversed(range(x.shape[1])):
            g = x[b, t] + gamma * g
            out[b, t] = g
    return np.where(m, out, 0.0)


def np_whiten(x, m, eps=1e-8):
    v = x[m]
    var = max(v.var(), eps)
    return np.where(m, (x - v.mean()) / np.sqrt(var), 0.0)


def np_gae_right_padded(r, v, lengths, gamma, lam):
    b, t = r.shape
    a = np.zeros((b, t))
    for i in range(b):
        last = 0.0
        for s in reversed(range(lengths[i])):
            nv = v[i, s + 1] if s + 1 < lengths[i] else 0.0
            delta = r[i, s] + gamma * nv - v[i, s]
            last = delta + gamma * lam * last
            a[i, s] = last
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    return a, np.where(mask, a + v, 0.0)


def np_beta_pdf(p, a, b):
    logb = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1) * math.log(p) + (b - 1) * math.log1p(-p) - logb)


def np_bnpo(r, a, b, r_min=0.0, r_max=1.0):
    rt = np.clip((np.asarray(r, np.float64) - r_min) / (r_max - r_min), 0, 1)
    out = np.zeros_like(rt)
    for i in range(rt.shape[0]):
        p = rt[i].mean()  # random continuous rewards: 0 < p < 1
        out[i] = (rt[i] - p) * min(1.0 / np_beta_pdf(p, a, b), 1e6)
    return out


def np_bnpo_fit(r):
    p = np.asarray(r, np.float64).mean(-1)
    m, v = p.mean(), p.var(ddof=1)
    c = m * (1 - m) / v - 1
    return max(1.0, 1 + c * m / 3), max(1.0, 1 + c * (1 - m) / 3)


def np_gdpo(c, w, eps=1e-4):
    c = np.nan_to_num(np.asarray(c, np.float64), nan=0.0)
    per = (c - c.mean(1, keepdims=True)) / (c.std(1, ddof=1, keepdims=True) + eps)
    s = (per * np.asarray(w)[None, None, :]).sum(-1)
    return (s - s.mean()) / (s.std(ddof=1) + eps)


# ------------------------------------------------------------------ strategies
# few distinct shapes: every new shape costs XLA compilations of each primitive
PROMPTS, GROUPS, LENGTHS = st.sampled_from([1, 3]), st.sampled_from([2, 5]), \
    st.sampled_from([1, 4])


def reward_groups():
    return st.tuples(PROMPTS, GROUPS).flatmap(
        lambda s: hnp.arrays(np.float32, s, elements=st.floats(-5, 5, width=32)))


def binary_groups():
    return st.tuples(PROMPTS, st.sampled_from([2, 3, 6])).flatmap(
        lambda s: hnp.arrays(np.float32, s, elements=st.sampled_from([0.0, 1.0])))


# ------------------------------------------------------------- hand-computed values
def test_grpo_by_hand():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_allclose(adv.grpo_advantages(r, eps=0.0)[0], [1, -1, -1, 1],
                               rtol=1e-6)
    np.testing.assert_array_equal(adv.grpo_advantages(r)[1], [0, 0, 0, 0])
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    np.testing.assert_allclose(adv.grpo_advantages(r, eps=0.0, unbiased_std=True)[0],
                               np.array([1, -1, -1, 1]) * 0.5 / s, rtol=1e-6)
    np.testing.assert_allclose(adv.grpo_advantages(r, scale_by_std=False)[0],
                               [0.5, -0.5, -0.5, 0.5])


def test_dr_grpo_by_hand():
    np.testing.assert_array_equal(adv.dr_grpo_advantages(jnp.array([[3.0, 1.0]])),
                                  [[1.0, -1.0]])


def test_batch_std_by_hand():
    out = adv.batch_std_advantages(jnp.array([[1.0, 0.0], [3.0, 3.0]]), eps=0.0)
    s = math.sqrt(6.75 / 4)  # std of (1, 0, 3, 3)
    np.testing.assert_allclose(out, [[0.5 / s, -0.5 / s], [0, 0]], rtol=1e-6)


def test_rloo_by_hand():
    np.testing.assert_allclose(adv.rloo_advantages(jnp.array([[1.0, 2.0, 6.0]])),
                               [[-3.0, -1.5, 4.5]])


def test_remax_by_hand():
    np.testing.assert_allclose(
        adv.remax_advantages(jnp.array([[1.0, 0.0], [2.0, 3.0]]), jnp.array([0.5, 2.0])),
        [[0.5, -0.5], [0.0, 1.0]])


def test_opo_by_hand():
    out = adv.opo_advantages(jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 1.0]]))
    np.testing.assert_allclose(out, [[0.25, -0.75]])
    # lengths summing to zero fall back to the plain mean
    out = adv.opo_advantages(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.5, -0.5]])


def test_pass_at_k_by_hand():
    r = jnp.array([[0.2, 0.9, 0.5]])
    np.testing.assert_allclose(adv.pass_at_k_advantages(r, k=3), [[0.0, 0.4, 0.0]],
                               rtol=1e-6)
    # PKPO, n=4, c=1, k=2: the correct sample gets (k/n)·C(3,1)/C(3,1) = 1/2
    b = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(adv.pass_at_k_advantages(b, k=2),
                               [[0.5, 0, 0, 0], [1 / 3, 0, 0, 1 / 3]], rtol=1e-6)
    # k=1 is plain REINFORCE with a zero baseline scaled by 1/n
    np.testing.assert_allclose(adv.pass_at_k_advantages(b, k=1),
                               [[0.25, 0, 0, 0], [0.25, 0, 0, 0.25]], rtol=1e-6)
    out = adv.pass_at_k_advantages(r, k=3, normalize_std=True, eps=0.0)
    np.testing.assert_allclose(out, [[0.0, 0.4 / np.std([0.2, 0.9, 0.5], ddof=1), 0.0]],
                               rtol=1e-5)


def test_outcome_token_rewards_by_hand():
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    out = adv.outcome_token_rewards(jnp.array([2.0, 3.0, 4.0]), mask,
                                    kl=jnp.ones((3, 3)), beta=0.1)
    np.testing.assert_allclose(out, [[-0.1, 1.9, 0.0], [-0.1, -0.1, 2.9], [0, 0, 0]],
                               rtol=1e-6)


def test_reinforce_pp_by_hand():
    tok = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    out = adv.reinforce_pp_advantages(tok, jnp.ones((2, 2)))
    np.testing.assert_allclose(out, [[1.0, 1.0], [-1.0, -1.0]], rtol=1e-6)
    # gamma discounts by position
    out = adv.discounted_returns(tok, jnp.ones((2, 2)), gamma=0.5)
    np.testing.assert_allclose(out, [[0.5, 1.0], [0.0, 0.0]])


def test_reinforce_pp_baseline_by_hand():
    # group means 0.5 and 2: centred outcomes (0.5, -0.5, 0, 0), one valid token each
    mask = jnp.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    out = adv.reinforce_pp_baseline_advantages(jnp.array([[1.0, 0.0], [2.0, 2.0]]), mask)
    # valid-token returns: 0.5, -0.5, 0, 0, 0 -> mean 0, var 0.1
    s = math.sqrt(0.1)
    np.testing.assert_allclose(out, [[0.5 / s, 0], [-0.5 / s, 0], [0, 0], [0, 0]],
                               rtol=1e-5, atol=1e-6)


def test_gae_by_hand():
    a, ret = adv.gae(jnp.array([[0.0, 0.0, 1.0]]), jnp.full((1, 3), 0.5),
                     jnp.ones((1, 3)), gamma=1.0, lam=0.5)
    np.testing.assert_allclose(a, [[0.125, 0.25, 0.5]])
    np.testing.assert_allclose(ret, [[0.625, 0.75, 1.0]])


def test_bnpo_by_hand():
    r = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    # alpha = beta = 1: f = 1, a mean baseline
    np.testing.assert_allclose(adv.bnpo_advantages(r, alpha=1.0, beta=1.0),
                               r - r.mean(-1, keepdims=True), rtol=1e-6)
    # p = (0.25, 0.75): m = 0.5, v = 0.125, m(1−m)/v − 1 = 1, a = b = 0.5 -> 1 + 1/6
    state = adv.bnpo_update(adv.bnpo_init(), r)
    np.testing.assert_allclose([state.alpha, state.beta], [7 / 6, 7 / 6], rtol=1e-6)
    assert int(state.count) == 1


def test_bnpo_three_halves_is_grpo_times_pi_over_8_for_binary_rewards():
    r = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(adv.bnpo_advantages(r, alpha=1.5, beta=1.5),
                               np.pi / 8 * np_grpo(r, eps=0.0), rtol=1e-5)


def test_bnpo_update_momentum_is_ema_of_moments():
    r1 = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # m=.5, v=.125
    r2 = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # m=.375, v=.03125
    s = adv.bnpo_update(adv.bnpo_update(adv.bnpo_init(momentum=0.5), r1), r2)
    np.testing.assert_allclose([s.mean, s.var], [0.4375, 0.078125], rtol=1e-6)
    c = 0.4375 * 0.5625 / 0.078125 - 1
    np.testing.assert_allclose([s.alpha, s.beta],
                               [1 + c * 0.4375 / 3, 1 + c * 0.5625 / 3], rtol=1e-5)
    s0 = adv.bnpo_update(adv.bnpo_update(adv.bnpo_init(), r1), r2)
    np.testing.assert_allclose(s0.alpha, max(1.0, np_bnpo_fit(r2)[0]), rtol=1e-5)


def test_bnpo_degenerate_batches_stay_finite():
    one_prompt = adv.bnpo_update(adv.bnpo_init(), jnp.array([[1.0, 0.0]]))
    np.testing.assert_array_equal([one_prompt.alpha, one_prompt.beta], [1.0, 1.0])
    same = adv.bnpo_update(adv.bnpo_init(), jnp.array([[1.0, 0.0], [0.0, 1.0]]))
    assert np.isfinite(same.alpha) and np.isfinite(same.beta) and same.alpha > 1
    out = adv.bnpo_advantages(jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
                              alpha=same.alpha, beta=same.beta)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[2], [0.0, 0.0])


def test_bnpo_state_is_a_pytree_carried_through_jit():
    step = jax.jit(lambda s, r: adv.bnpo_update(s, r))
    s = adv.bnpo_init(momentum=0.9)
    r = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    s = step(step(s, r), r)
    assert int(s.count) == 2 and s.momentum == 0.9
    np.testing.assert_allclose(s.alpha, 7 / 6, rtol=1e-5)


def test_gdpo_distinguishes_reward_combinations_that_grpo_collapses():
    c = jnp.stack([jnp.array([[1.0, 0.0, 0.0, 0.0]]),
                   jnp.array([[0.0, 1.0, 1.0, 0.0]])], axis=-1)
    summed = adv.combine_rewards(c, mode="sum_then_normalize")
    np.testing.assert_allclose(summed[0, 0], summed[0, 1], rtol=1e-6)
    g = adv.gdpo_advantages(c)
    assert abs(float(g[0, 0] - g[0, 1])) > 0.1
    np.testing.assert_allclose(g, np_gdpo(c, [1.0, 1.0]), rtol=RTOL, atol=ATOL)


def test_gdpo_nan_component_rewards_become_zero():
    rng = np.random.default_rng(3)
    c = rng.integers(0, 2, size=(3, 4, 2)).astype(np.float32)
    c_nan = c.copy()
    c_nan[0, 1, 0] = np.nan
    c_zero = c.copy()
    c_zero[0, 1, 0] = 0.0
    out = adv.gdpo_advantages(c_nan)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, adv.gdpo_advantages(c_zero), rtol=1e-6)


def test_combine_rewards_modes_by_hand():
    c = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])  # P=1, G=2, K=2
    w = jnp.array([1.0, 0.5])
    # sum: (1, 1) -> zero advantage; normalise-then-sum: (1 − 0.5, −1 + 0.5) = 0
    np.testing.assert_allclose(adv.combine_rewards(c, weights=w), [[0.0, 0.0]])
    out = adv.combine_rewards(c, weights=jnp.array([1.0, 2.0]), mode="normalize_then_sum",
                              eps=0.0)
    np.testing.assert_allclose(out, [[1 - 2, -1 + 2]], rtol=1e-6)


# ------------------------------------------------- NumPy transcriptions, random input
def test_group_estimators_match_numpy_on_random_input():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(5, 6)).astype(np.float32)
    ln = rng.integers(1, 30, size=(5, 6)).astype(np.float32)
    greedy = rng.normal(size=(5,)).astype(np.float32)
    for unbiased in (False, True):
        np.testing.assert_allclose(adv.grpo_advantages(r, unbiased_std=unbiased),
                                   np_grpo(r, unbiased=unbiased), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adv.dr_grpo_advantages(r), np_grpo(r, scale=False),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adv.batch_std_advantages(r), np_batch_std(r), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(adv.rloo_advantages(r), np_rloo(r), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adv.opo_advantages(r, ln), np_opo(r, ln), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(adv.remax_advantages(r, greedy),
                               r.astype(np.float64) - greedy[:, None], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adv.pass_at_k_advantages(r, k=6), np_pass_at_k(r, 6),
                               rtol=RTOL, atol=ATOL)
    c = rng.normal(size=(5, 6, 3)).astype(np.float32)
    w = np.array([1.0, 0.5, 2.0], np.float32)
    np.testing.assert_allclose(adv.gdpo_advantages(c, weights=w), np_gdpo(c, w),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        adv.combine_rewards(c, weights=w),
        np_grpo((c.astype(np.float64) * w).sum(-1)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        adv.combine_rewards(c, weights=w, mode="normalize_then_sum"),
        sum(w[k] * np_grpo(c[..., k]) for k in range(3)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pass_at_k_matches_brute_force_pkpo_for_binary_rewards(k):
    rng = np.random.default_rng(k)
    r = (rng.random((6, 5)) < 0.4).astype(np.float32)
    np.testing.assert_allclose(adv.pass_at_k_advantages(r, k=k), np_pass_at_k(r, k),
                               rtol=1e-5, atol=1e-6)


def test_reinforce_pp_matches_numpy_on_random_input():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 7))
    lengths = np.array([7, 3, 1, 5])
    m = np.arange(7)[None, :] < lengths[:, None]
    for gamma in (1.0, 0.9):
        out = adv.reinforce_pp_advantages(jnp.asarray(x, jnp.float32), m, gamma=gamma)
        np.testing.assert_allclose(out, np_whiten(np_returns(x, m, gamma), m), rtol=RTOL,
                                   atol=ATOL)
    # REINFORCE++-baseline with a KL penalty in the reward
    r = rng.normal(size=(2, 2))
    kl = rng.normal(size=(4, 7)) * 0.1
    out = adv.reinforce_pp_baseline_advantages(jnp.asarray(r, jnp.float32), m,
                                               kl_penalty=jnp.asarray(kl, jnp.float32))
    tok = -np.where(m, kl, 0.0)
    cen = np_grpo(r, scale=False).reshape(-1)
    tok[np.arange(4), lengths - 1] += cen
    np.testing.assert_allclose(out, np_whiten(np_returns(tok, m, 1.0), m), rtol=RTOL,
                               atol=ATOL)


def test_gae_matches_numpy_on_random_right_padded_input():
    rng = np.random.default_rng(6)
    r = rng.normal(size=(4, 6))
    v = rng.normal(size=(4, 6))
    lengths = np.array([6, 4, 1, 0])
    m = np.arange(6)[None, :] < lengths[:, None]
    a, ret = adv.gae(jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32), m,
                     gamma=0.99, lam=0.9)
    a_np, ret_np = np_gae_right_padded(r, v, lengths, 0.99, 0.9)
    np.testing.assert_allclose(a, a_np, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, ret_np, rtol=RTOL, atol=ATOL)


def test_gae_skips_holes_in_the_mask_like_a_compacted_sequence():
    rng = np.random.default_rng(7)
    r = rng.normal(size=(1, 6)).astype(np.float32)
    v = rng.normal(size=(1, 6)).astype(np.float32)
    m = np.array([[1, 0, 1, 1, 0, 1]], bool)
    a, _ = adv.gae(r, v, m, gamma=0.9, lam=0.8)
    keep = m[0]
    a_c, _ = np_gae_right_padded(r[:, keep], v[:, keep], [4], 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(a)[:, keep], a_c, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(a)[:, ~keep], 0.0)


def test_bnpo_matches_numpy_on_random_input():
    rng = np.random.default_rng(8)
    r = rng.random((6, 5)).astype(np.float32) * 4 - 2  # rescaled into [0, 1] below
    s = adv.bnpo_update(adv.bnpo_init(), r, r_min=-2.0, r_max=2.0)
    a_np, b_np = np_bnpo_fit((r.astype(np.float64) + 2) / 4)
    np.testing.assert_allclose([s.alpha, s.beta], [a_np, b_np], rtol=1e-4)
    out = adv.bnpo_advantages(r, alpha=s.alpha, beta=s.beta, r_min=-2.0, r_max=2.0)
    np.testing.assert_allclose(out, np_bnpo(r, a_np, b_np, -2.0, 2.0), rtol=1e-4,
                               atol=1e-5)


# ------------------------------------------------------------------- properties
@SETTINGS
@given(reward_groups())
def test_grpo_advantages_have_zero_group_mean(r):
    a = np.asarray(adv.grpo_advantages(r), np.float64)
    scale = np.maximum(np.abs(a).max(-1), 1.0)
    assert np.all(np.abs(a.mean(-1)) <= 1e-4 * scale)


@SETTINGS
@given(reward_groups())
def test_rloo_equals_reward_minus_mean_of_the_others(r):
    np.testing.assert_allclose(adv.rloo_advantages(r), np_rloo(r), rtol=1e-4, atol=1e-4)


@jax.jit
def _all_group_estimators(r):
    p, g = r.shape
    return {
        "grpo": adv.grpo_advantages(r),
        "grpo_unbiased": adv.grpo_advantages(r, unbiased_std=True),
        "dr_grpo": adv.dr_grpo_advantages(r),
        "batch_std": adv.batch_std_advantages(r),
        "rloo": adv.rloo_advantages(r),
        "opo": adv.opo_advantages(r, jnp.arange(p * g, dtype=jnp.float32).reshape(p, g)),
        "pass_at_G": adv.pass_at_k_advantages(r, k=g),
        "bnpo": adv.bnpo_advantages(jnp.clip(r, 0, 1), alpha=1.3, beta=2.0),
        "combine": adv.combine_rewards(jnp.stack([r, 2 * r], -1),
                                       mode="normalize_then_sum"),
    }


@settings(max_examples=8, deadline=None)
@given(PROMPTS, GROUPS, st.floats(-3, 3, width=32))
def test_zero_variance_group_gives_zero_advantage(p, g, value):
    r = jnp.full((p, g), value, jnp.float32)
    for name, a in _all_group_estimators(r).items():
        np.testing.assert_array_equal(a, 0.0, err_msg=name)


@SETTINGS
@given(binary_groups(), st.integers(1, 6))
def test_pass_at_k_reduces_to_loo_max_at_k_equals_g_and_is_nonnegative(r, k):
    g = r.shape[1]
    k = min(k, g)
    a = np.asarray(adv.pass_at_k_advantages(r, k=k))
    assert np.all(a >= -1e-7)
    assert np.all(a[r == 0] == 0)
    if k == g:
        np.testing.assert_allclose(a, np_pass_at_k(r, g), atol=1e-6)


@SETTINGS
@given(PROMPTS, LENGTHS, st.data())
def test_gae_with_lambda_one_gamma_one_equals_returns_minus_values(b, t, data):
    r = data.draw(hnp.arrays(np.float32, (b, t), elements=st.floats(-3, 3, width=32)))
    v = data.draw(hnp.arrays(np.float32, (b, t), elements=st.floats(-3, 3, width=32)))
    lengths = np.array(data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    m = np.arange(t)[None, :] < lengths[:, None]
    a, ret = _gae_jit(r, v, m, gamma=1.0, lam=1.0)
    mc = np_returns(r.astype(np.float64), m, 1.0)
    np.testing.assert_allclose(a, np.where(m, mc - v, 0.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret, mc, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(PROMPTS, LENGTHS, st.data())
def test_gae_ignores_values_and_rewards_under_padding(b, t, data):
    r = data.draw(hnp.arrays(np.float32, (b, t), elements=st.floats(-3, 3, width=32)))
    v = data.draw(hnp.arrays(np.float32, (b, t), elements=st.floats(-3, 3, width=32)))
    lengths = np.array(data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    m = np.arange(t)[None, :] < lengths[:, None]
    a1, r1 = _gae_jit(r, v, m, gamma=0.9, lam=0.7)
    a2, r2 = _gae_jit(np.where(m, r, 99.0), np.where(m, v, np.nan), m, gamma=0.9, lam=0.7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(r1, r2)


# ----------------------------------------------------- malformed input and NaNs
GROUP_ESTIMATORS = {
    "grpo": adv.grpo_advantages,
    "dr_grpo": adv.dr_grpo_advantages,
    "batch_std": adv.batch_std_advantages,
    "rloo": adv.rloo_advantages,
    "opo": lambda r: adv.opo_advantages(r, jnp.ones_like(r)),
    "pass_at_G": lambda r: adv.pass_at_k_advantages(r, k=r.shape[-1]),
    "pass_at_2": lambda r: adv.pass_at_k_advantages(r, k=2),
    "bnpo": lambda r: adv.bnpo_advantages(r, alpha=1.5, beta=1.5),
    "gdpo": lambda r: adv.gdpo_advantages(r[..., None]),
    "combine": lambda r: adv.combine_rewards(r[..., None]),
}


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_group_estimators_reject_group_size_one_and_wrong_rank(name):
    fn = GROUP_ESTIMATORS[name]
    with pytest.raises(ValueError, match="G >= 2"):
        fn(jnp.ones((3, 1)))
    if name not in ("gdpo", "combine"):
        with pytest.raises(ValueError, match="rank 2"):
            fn(jnp.ones((6,)))


@pytest.mark.parametrize("name", sorted(set(GROUP_ESTIMATORS) - {"gdpo"}))
def test_nan_reward_is_a_missing_sample_with_zero_advantage(name):
    fn = GROUP_ESTIMATORS[name]
    r = jnp.array([[1.0, 0.0, jnp.nan, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    out = np.asarray(fn(r))
    assert np.all(np.isfinite(out)), out
    assert out[0, 2] == 0.0
    if name not in ("batch_std", "pass_at_2"):  # batch statistics / n = G by design
        # the other entries equal the estimator on the group without the missing one
        ref = np.asarray(fn(jnp.array([[1.0, 0.0, 1.0, 0.0]])))
        np.testing.assert_allclose(out[0, [0, 1, 3, 4]], ref[0], rtol=1e-5, atol=1e-6)


def test_rloo_all_missing_group_gives_zero():
    out = adv.rloo_advantages(jnp.array([[jnp.nan, 2.0], [1.0, 3.0]]))
    np.testing.assert_array_equal(out, [[0.0, 0.0], [-2.0, 2.0]])


def test_remax_missing_greedy_reward_zeros_its_group():
    out = adv.remax_advantages(jnp.array([[1.0, 2.0], [1.0, jnp.nan]]),
                               jnp.array([jnp.nan, 0.0]))
    np.testing.assert_array_equal(out, [[0.0, 0.0], [1.0, 0.0]])


def test_reinforce_pp_nan_reward_row_is_left_out():
    mask = jnp.ones((3, 2))
    tok = jnp.array([[0.0, 1.0], [0.0, 0.0], [0.0, jnp.nan]])
    out = adv.reinforce_pp_advantages(tok, mask)
    np.testing.assert_allclose(out, [[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]], rtol=1e-6)
    out = adv.reinforce_pp_baseline_advantages(
        jnp.array([[1.0, 0.0, jnp.nan]]), jnp.ones((3, 2)))
    assert np.all(np.isfinite(out)) and np.all(out[2] == 0.0)


def test_malformed_shapes_raise_value_error_naming_the_field():
    r = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="lengths"):
        adv.opo_advantages(r, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="greedy_rewards"):
        adv.remax_advantages(r, jnp.ones((3,)))
    with pytest.raises(ValueError, match="k must satisfy"):
        adv.pass_at_k_advantages(r, k=4)
    with pytest.raises(ValueError, match="k must satisfy"):
        adv.pass_at_k_advantages(r, k=0)
    with pytest.raises(ValueError, match="values"):
        adv.gae(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="mask"):
        adv.gae(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="mask"):
        adv.reinforce_pp_advantages(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="rows"):
        adv.outcome_token_rewards(jnp.ones((3,)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="kl"):
        adv.outcome_token_rewards(jnp.ones((2,)), jnp.ones((2, 4)), kl=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="kl_penalty"):
        adv.reinforce_pp_baseline_advantages(r, jnp.ones((6, 4)),
                                             kl_penalty=jnp.ones((6, 5)))
    with pytest.raises(ValueError, match="r_max"):
        adv.bnpo_advantages(r, alpha=1.0, beta=1.0, r_min=1.0, r_max=1.0)
    with pytest.raises(ValueError, match="momentum"):
        adv.bnpo_init(momentum=1.0)
    with pytest.raises(ValueError, match="weights"):
        adv.gdpo_advantages(jnp.ones((2, 3, 2)), weights=jnp.ones((3,)))
    with pytest.raises(ValueError, match="mode"):
        adv.combine_rewards(jnp.ones((2, 3, 2)), mode="average")


def test_estimators_are_jittable():
    rng = np.random.default_rng(9)
    r = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    m = jnp.ones((8, 3))
    fns = {
        "grpo": functools.partial(adv.grpo_advantages, unbiased_std=True),
        "rloo": adv.rloo_advantages,
        "pass_at_2": functools.partial(adv.pass_at_k_advantages, k=2),
        "bnpo": lambda x: adv.bnpo_advantages(x, alpha=jnp.float32(1.5), beta=1.2),
        "rpp_baseline": lambda x: adv.reinforce_pp_baseline_advantages(x, m),
        "gdpo": lambda x: adv.gdpo_advantages(jnp.stack([x, x * x], -1)),
        "gae": lambda x: adv.gae(jnp.tile(x, (4, 1))[:, :3], jnp.zeros((8, 3)), m)[0],
    }
    for name, fn in fns.items():
        np.testing.assert_allclose(jax.jit(fn)(r), fn(r), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
