import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlx.objectives import surrogates as S
from rlx.objectives.aggregation import safe_div, seq_mean_token_mean


# ----------------------------------------------------------- float64 transcriptions
def _r(logp, old, clamp=20.0):
    return np.exp(np.clip(np.float64(logp) - old, -clamp, clamp))


def np_ppo(logp, old, a, m, el, eh, c=None):
    r = _r(logp, old)
    loss = np.maximum(-a * r, -a * np.clip(r, 1 - el, 1 + eh))
    if c is not None:
        loss = np.where(a < 0, np.minimum(loss, -a * c), loss)
    return loss * m


def _rows(m):
    return [np.flatnonzero(m[i] > 0) for i in range(m.shape[0])]


def np_gspo(logp, old, a, m, el, eh, clamp=10.0):
    out = np.zeros(m.shape)
    for i, idx in enumerate(_rows(m)):
        if len(idx) == 0:
            continue
        s = np.exp(np.clip(np.mean(np.float64(logp[i, idx]) - old[i, idx]), -clamp, clamp))
        ai = np.mean(a[i, idx])
        out[i, idx] = max(-ai * s, -ai * np.clip(s, 1 - el, 1 + eh))
    return out


def np_gspo_token(logp, old, a, m, el, eh, clamp=10.0):
    out = np.zeros(m.shape)
    for i, idx in enumerate(_rows(m)):
        if len(idx) == 0:
            continue
        s = np.exp(min(np.mean(np.float64(logp[i, idx]) - old[i, idx]), clamp))
        at = a[i, idx]
        out[i, idx] = np.maximum(-at * s, -at * np.clip(s, 1 - el, 1 + eh))
    return out


def np_gmpo(logp, old, a, m, el, eh):
    out = np.zeros(m.shape)
    for i, idx in enumerate(_rows(m)):
        if len(idx) == 0:
            continue
        d = np.clip(np.float64(logp[i, idx]) - old[i, idx], -20, 20)
        ai = np.mean(a[i, idx])
        sgn = np.sign(ai)
        dt = sgn * np.minimum(sgn * d, sgn * np.clip(d, -el, eh))
        out[i, idx] = -ai * np.exp(dt.mean())
    return out


def np_cispo(logp, old, a, m, el, eh):
    return -np.clip(_r(logp, old), 1 - el, 1 + eh) * a * logp * m


def np_sapo(logp, old, a, m, tp, tn):
    r = _r(logp, old)
    tau = np.where(a > 0, tp, tn)
    return -(1 / (1 + np.exp(-tau * (r - 1)))) * 4 / tau * a * m


def _inputs(seed, b=5, t=6, scale=0.4, seq_adv=False):
    rng = np.random.default_rng(seed)
    old = (-rng.random((b, t)) * 3).astype(np.float32)
    logp = (old + scale * rng.normal(size=(b, t))).astype(np.float32)
    a = rng.normal(size=(b, t)).astype(np.float32)
    lengths = rng.integers(1, t + 1, size=b)
    m = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    if seq_adv:
        a = np.repeat(a[:, :1], t, axis=1)
    return logp, old, a * m, m


CASES = {
    "ppo": (functools.partial(S.ppo_clip_loss, eps_low=0.2, eps_high=0.28),
            lambda *x: np_ppo(*x, 0.2, 0.28)),
    "ppo_dual": (functools.partial(S.ppo_clip_loss, eps_low=0.2, eps_high=0.28, dual_clip=1.5),
                 lambda *x: np_ppo(*x, 0.2, 0.28, 1.5)),
    "gspo": (functools.partial(S.gspo_loss, eps_low=0.05, eps_high=0.08),
             lambda *x: np_gspo(*x, 0.05, 0.08)),
    "gspo_token": (functools.partial(S.gspo_token_loss, eps_low=0.05, eps_high=0.08),
                   lambda *x: np_gspo_token(*x, 0.05, 0.08)),
    "gmpo": (functools.partial(S.gmpo_loss, eps_low=0.2, eps_high=0.3),
             lambda *x: np_gmpo(*x, 0.2, 0.3)),
    "cispo": (functools.partial(S.cispo_loss, eps_low=0.3, eps_high=0.2),
              lambda *x: np_cispo(*x, 0.3, 0.2)),
    "sapo": (functools.partial(S.sapo_loss, tau_pos=1.0, tau_neg=1.05),
             lambda *x: np_sapo(*x, 1.0, 1.05)),
    "pg": (S.policy_gradient_loss, lambda lp, o, a, m: -a * lp * m),
    "is": (S.importance_sampled_loss, lambda lp, o, a, m: -a * _r(lp, o) * m),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_numpy_transcription(name):
    fn, ref = CASES[name]
    seq = name in ("gspo", "gmpo")
    logp, old, a, m = _inputs(7, seq_adv=seq)
    got, _ = fn(*map(jnp.asarray, (logp, old, a, m)))
    np.testing.assert_allclose(got, ref(logp, old, a, m), rtol=2e-5, atol=2e-6)


def test_ppo_hand_computed():
    logp = jnp.log(jnp.asarray([[1.5, 0.5, 1.1, 3.0]]))
    a = jnp.asarray([[1.0, -2.0, 1.0, -1.0]])
    loss, info = S.ppo_clip_loss(logp, jnp.zeros((1, 4)), a, jnp.ones((1, 4)),
                                 eps_low=0.2, eps_high=0.28, dual_clip=2.0)
    # r=1.5,A=1 -> -1.28 ; r=.5,A=-2 -> max(1, 1.6)=1.6 ; r=1.1 -> -1.1 ; r=3,A=-1 -> min(3, 2)=2
    np.testing.assert_allclose(loss, [[-1.28, 1.6, -1.1, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(info.clipped_high, [[1, 0, 0, 0]])
    np.testing.assert_allclose(info.clipped_low, [[0, 1, 0, 0]])
    assert float(info.scalars["dual_clip_frac"]) == pytest.approx(0.25)


def test_gspo_and_gmpo_hand_computed():
    # one row, 2 tokens with log ratios ln2 and 0: GSPO s = sqrt(2); GMPO clips ln2 at 0.4
    logp = jnp.asarray([[jnp.log(2.0), 0.0]])
    z, a, m = jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.ones((1, 2))
    g, _ = S.gspo_loss(logp, z, a, m, eps_low=1.0, eps_high=1.0)
    np.testing.assert_allclose(g, [[-np.sqrt(2)] * 2], rtol=1e-6)
    gm, info = S.gmpo_loss(logp, z, a, m, eps_low=0.4, eps_high=0.4)
    np.testing.assert_allclose(gm, [[-np.exp(0.2)] * 2], rtol=1e-6)
    np.testing.assert_allclose(info.clipped_high, [[1, 0]])


def test_sapo_and_cispo_hand_computed():
    logp, z, m = jnp.log(jnp.asarray([[2.0, 1.0]])), jnp.zeros((1, 2)), jnp.ones((1, 2))
    a = jnp.asarray([[1.0, -1.0]])
    s, _ = S.sapo_loss(logp, z, a, m, tau_pos=1.0, tau_neg=2.0)
    np.testing.assert_allclose(s, [[-4 / (1 + np.exp(-1.0)), 1.0]], rtol=1e-6)  # 4/2·σ(0)=1
    c, info = S.cispo_loss(logp, z, a, m, eps_low=0.2, eps_high=0.2)
    np.testing.assert_allclose(c, [[-1.2 * np.log(2.0), 0.0]], rtol=1e-6)
    np.testing.assert_allclose(info.clipped_high, [[1, 0]])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.05, 1.5),
       dual=st.sampled_from([None, 2.0]))
def test_ppo_gradient_vanishes_exactly_where_clipped(seed, scale, dual):
    el, eh = 0.2, 0.28
    logp, old, a, m = _inputs(seed, b=6, t=5, scale=scale)
    grad = np.asarray(jax.grad(lambda lp: S.ppo_clip_loss(
        lp, old, a, m, eps_low=el, eps_high=eh, dual_clip=dual)[0].sum())(jnp.asarray(logp)))
    r = _r(logp, old)
    near = (np.abs(r - (1 + eh)) < 1e-3) | (np.abs(r - (1 - el)) < 1e-3)
    if dual is not None:
        near |= np.abs(r - dual) < 1e-3
    frozen = ((a > 0) & (r > 1 + eh)) | ((a < 0) & (r < 1 - el)) | (m == 0) | (a == 0)
    if dual is not None:
        frozen |= (a < 0) & (r > dual)
    ok = ~near
    assert np.all(grad[frozen & ok] == 0.0)
    live = ~frozen & ok
    np.testing.assert_allclose(grad[live], (-a * r)[live], rtol=1e-4)


def _agg_loss(fn, logp, old, a, m):
    return safe_div(*seq_mean_token_mean(fn(logp, old, a, m)[0], m))


def test_gspo_gradient_matches_analytic():
    logp, old, a, m = _inputs(11, seq_adv=True)
    b = m.shape[0]
    fn = functools.partial(S.gspo_loss, eps_low=10.0, eps_high=10.0)  # unclipped
    g = jax.grad(lambda lp: _agg_loss(fn, lp, old, a, m))(jnp.asarray(logp))
    n = m.sum(-1, keepdims=True)
    s = np.exp(((np.float64(logp) - old) * m).sum(-1, keepdims=True) / n)
    np.testing.assert_allclose(g, -a[:, :1] * s / n / b * m, rtol=1e-4, atol=1e-7)


def test_gspo_token_gradient_is_own_token_times_sequence_ratio():
    logp, old, a, m = _inputs(12)
    fn = functools.partial(S.gspo_token_loss, eps_low=10.0, eps_high=10.0)
    g = jax.grad(lambda lp: fn(lp, old, a, m)[0].sum())(jnp.asarray(logp))
    n = m.sum(-1, keepdims=True)
    s = np.exp(((np.float64(logp) - old) * m).sum(-1, keepdims=True) / n)
    np.testing.assert_allclose(g, -a * s * m, rtol=1e-4, atol=1e-7)
    # value equals GSPO's when the advantage is per sequence
    logp, old, a, m = _inputs(12, seq_adv=True)
    tok, _ = fn(*map(jnp.asarray, (logp, old, a, m)))
    seq, _ = S.gspo_loss(*map(jnp.asarray, (logp, old, a, m)), eps_low=10.0, eps_high=10.0)
    np.testing.assert_allclose(tok, seq, rtol=1e-5)


def test_cispo_gradient_is_capped_weight_times_advantage_everywhere():
    logp, old, a, m = _inputs(13, scale=0.8)
    g = jax.grad(lambda lp: S.cispo_loss(lp, old, a, m, eps_low=0.3, eps_high=0.2)[0].sum())(
        jnp.asarray(logp))
    w = np.clip(_r(logp, old), 0.7, 1.2)
    np.testing.assert_allclose(g, -w * a * m, rtol=1e-5, atol=1e-7)


def test_sapo_gradient_matches_analytic():
    logp, old, a, m = _inputs(14, scale=0.8)
    g = jax.grad(lambda lp: S.sapo_loss(lp, old, a, m)[0].sum())(jnp.asarray(logp))
    r = _r(logp, old)
    tau = np.where(a > 0, 1.0, 1.05)
    s = 1 / (1 + np.exp(-tau * (r - 1)))
    np.testing.assert_allclose(g, -4 * s * (1 - s) * r * a * m, rtol=1e-4, atol=1e-7)


def test_gmpo_gradient_freezes_tokens_outside_the_favoured_band():
    logp, old, a, m = _inputs(15, scale=0.6, seq_adv=True)
    g = np.asarray(jax.grad(lambda lp: S.gmpo_loss(lp, old, a, m, eps_low=0.2, eps_high=0.3)[0]
                            .sum())(jnp.asarray(logp)))
    d = np.float64(logp) - old
    s = np.sign(a[:, :1])
    dt = s * np.minimum(s * d, s * np.clip(d, -0.2, 0.3))
    n = m.sum(-1, keepdims=True)
    rho = np.exp((dt * m).sum(-1, keepdims=True) / n)
    # ℓ_i is broadcast to n_i tokens, so Σ_t ℓ = n_i ℓ_i
    want = -a[:, :1] * rho * (dt == d) * m
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


# -------------------------------------------------------------------------- BAPO
def test_bapo_candidates_follow_paper_order():
    c = S.bapo_candidates()
    assert c[0] == (0.6, 1.2) and c[1] == pytest.approx((0.6, 1.25))
    assert c[36] == pytest.approx((0.6, 3.0)) and c[37] == pytest.approx((0.62, 3.0))
    assert c[-1] == pytest.approx((0.9, 3.0)) and len(c) == 1 + 36 + 15
    assert S.bapo_candidates(low_range=(0.6, 0.61), step_low=0.02) == [(0.6, 1.2)]


def np_positive_share(r, a, m, cl, ch):
    """formulas.md §2, Eq. 8 transcribed literally."""
    pos = (a > 0) & (m > 0)
    num = abs(np.sum(np.minimum(r * a, np.clip(r, 0, ch) * a)[pos]))
    den = np.sum(np.abs(np.minimum(r * a, np.clip(r, cl, ch) * a))[m > 0])
    return num / den if den > 0 else 1.0


@pytest.mark.parametrize("seed,neg_bias", [(0, 0.0), (1, 1.0), (2, 1.6), (3, 5.0)])
def test_bapo_bounds_are_first_feasible_in_search_order(seed, neg_bias):
    logp, old, a, m = _inputs(seed, b=8, t=6, scale=0.5)
    a = np.where(a < 0, a * (1 + neg_bias), a) * m
    cl, ch, share, feas = S.bapo_bounds(*map(jnp.asarray, (logp, old, a, m)), rho0=0.4)
    r = _r(logp, old)
    shares = [np_positive_share(r, a, m, lo, hi) for lo, hi in S.bapo_candidates()]
    ok = [s >= 0.4 for s in shares]
    idx = ok.index(True) if any(ok) else len(ok) - 1
    assert bool(feas) == any(ok)
    assert (float(cl), float(ch)) == pytest.approx(S.bapo_candidates()[idx])
    assert float(share) == pytest.approx(shares[idx], rel=1e-5)
    if any(ok):
        assert np_positive_share(r, a, m, float(cl), float(ch)) >= 0.4 - 1e-6


def test_bapo_search_moves_bounds_when_negatives_dominate():
    logp, old, a, m = _inputs(4, b=8, t=6, scale=0.5)
    a = np.where(a < 0, 1.5 * a, 0.5 * a) * m
    cl, ch, share, feas = S.bapo_bounds(*map(jnp.asarray, (logp, old, a, m)), rho0=0.4)
    assert (float(cl), float(ch)) != (0.6, 1.2)


def test_bapo_bounds_global_under_axis_name():
    logp, old, a, m = _inputs(1, b=8, t=6)
    a = np.where(a < 0, 2.0 * a, a) * m
    full = S.bapo_bounds(*map(jnp.asarray, (logp, old, a, m)))
    sh = lambda x: jnp.asarray(x).reshape(2, 4, -1)  # noqa: E731
    dev = jax.vmap(lambda *x: S.bapo_bounds(*x, axis_name="d"), axis_name="d")(
        *map(sh, (logp, old, a, m)))
    for f, d in zip(full, dev):
        np.testing.assert_allclose(d, float(f), rtol=1e-6)


def test_bapo_loss_is_ppo_with_chosen_bounds():
    logp, old, a, m = _inputs(2, b=8, t=6)
    x = list(map(jnp.asarray, (logp, old, a, m)))
    loss, info = S.bapo_loss(*x)
    cl, ch = float(info.scalars["bapo/c_low"]), float(info.scalars["bapo/c_high"])
    np.testing.assert_allclose(loss, np_ppo(logp, old, a, m, 1 - cl, ch - 1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ truncated IS
def test_truncated_is_weights_hand_computed():
    old = jnp.log(jnp.asarray([[3.0, 1.0, 0.5]]))
    samp = jnp.zeros((1, 3))
    m = jnp.ones((1, 3))
    w, frac = S.truncated_is_weights(old, samp, m, level="token", mode="truncate", cap=2.0)
    np.testing.assert_allclose(w, [[2.0, 1.0, 0.5]], rtol=1e-6)
    assert float(frac) == pytest.approx(1 / 3)
    w, _ = S.truncated_is_weights(old, samp, m, level="token", mode="mask", cap=2.0)
    np.testing.assert_allclose(w, [[0.0, 1.0, 0.5]], rtol=1e-6)
    w, frac = S.truncated_is_weights(old, samp, m, level="sequence", mode="truncate", cap=2.0)
    np.testing.assert_allclose(w, [[1.5] * 3], rtol=1e-6)  # product 3·1·0.5
    w, _ = S.truncated_is_weights(old, samp, m, level="sequence", mode="mask", cap=1.4)
    np.testing.assert_allclose(w, [[0.0] * 3])


def test_truncated_is_rejects_bad_options():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="level"):
        S.truncated_is_weights(x, x, x, level="tok")
    with pytest.raises(ValueError, match="mode"):
        S.truncated_is_weights(x, x, x, mode="clip")
    with pytest.raises(ValueError, match="sampler_logp"):
        S.truncated_is_weights(x, jnp.zeros((1, 3)), x)


# ---------------------------------------------------------------- malformed input
@pytest.mark.parametrize("name", list(CASES))
def test_mismatched_shapes_raise_naming_the_field(name):
    fn, _ = CASES[name]
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="advantages"):
        fn(x, x, jnp.zeros((2, 4)), x)


@pytest.mark.parametrize("name", list(CASES))
def test_all_masked_and_garbage_padding_give_finite_zero_loss(name):
    fn, _ = CASES[name]
    nan = jnp.full((2, 3), jnp.nan)
    loss, _ = fn(nan, jnp.zeros((2, 3)), nan, jnp.zeros((2, 3)))
    assert np.all(np.asarray(loss) == 0.0)
    g = jax.grad(lambda lp: fn(lp, jnp.zeros((2, 3)), nan, jnp.zeros((2, 3)))[0].sum())(nan)
    assert np.all(np.isfinite(np.asarray(g)))


def test_dual_clip_must_exceed_one():
    x = jnp.zeros((1, 1))
    with pytest.raises(ValueError, match="dual_clip"):
        S.ppo_clip_loss(x, x, x, x, dual_clip=0.5)
