import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.objectives.regularizers import (
    entropy_bonus, kl_penalty, r2vpo_init, r2vpo_update, ratio_variance, ratio_variance_penalty,
)
from rlx.objectives.types import PolicyBatch, TokenOutputs


def _inputs(seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    old = (-rng.random((4, 5)) * 2).astype(np.float32)
    logp = (old + scale * rng.normal(size=(4, 5))).astype(np.float32)
    m = (rng.random((4, 5)) < 0.7).astype(np.float32)
    m[0, 0] = 1
    return logp, old, m


def np_var(logp, old, m, about):
    r = np.exp(np.float64(logp) - old)[m > 0]
    return ((r - 1) ** 2).mean() if about == "one" else r.var()


def test_ratio_variance_hand_computed():
    logp = jnp.log(jnp.asarray([[0.5, 1.5, 9.0]]))
    m = jnp.asarray([[1.0, 1.0, 0.0]])
    assert float(ratio_variance(logp, jnp.zeros((1, 3)), m)) == pytest.approx(0.25)
    assert float(ratio_variance(logp, jnp.zeros((1, 3)), m, about="one")) == pytest.approx(0.25)
    logp = jnp.log(jnp.asarray([[1.5, 1.5]]))
    assert float(ratio_variance(logp, jnp.zeros((1, 2)), jnp.ones((1, 2)))) == pytest.approx(0.0, abs=1e-7)
    assert float(ratio_variance(logp, jnp.zeros((1, 2)), jnp.ones((1, 2)), about="one")) == pytest.approx(0.25)


@pytest.mark.parametrize("about", ["mean", "one"])
def test_ratio_variance_matches_numpy_and_is_global_under_axis_name(about):
    logp, old, m = _inputs(1)
    full = ratio_variance(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(m), about=about)
    assert float(full) == pytest.approx(np_var(logp, old, m, about), rel=1e-4)
    sh = lambda x: jnp.asarray(x).reshape(2, 2, -1)  # noqa: E731
    dev = jax.vmap(lambda a, b, c: ratio_variance(a, b, c, about=about, axis_name="d"),
                   axis_name="d")(sh(logp), sh(old), sh(m))
    np.testing.assert_allclose(dev, float(full), rtol=1e-5)


def test_ratio_variance_gradient_matches_analytic():
    logp, old, m = _inputs(2)
    g = jax.grad(lambda lp: ratio_variance(lp, old, m))(jnp.asarray(logp))
    r = np.exp(np.float64(logp) - old)
    mu = r[m > 0].mean()
    np.testing.assert_allclose(g, 2 * (r - mu) * r * m / m.sum(), rtol=1e-4, atol=1e-7)


def test_dual_variable_rises_above_delta_and_decays_to_zero_never_negative():
    st = r2vpo_init(0.1)
    up = r2vpo_update(st, jnp.asarray(0.5), delta=0.1, eta=0.5)
    assert float(up.lam) == pytest.approx(0.1 + 0.5 * 0.4)
    lam = st
    for _ in range(10):
        lam = r2vpo_update(lam, jnp.asarray(0.0), delta=0.1, eta=0.3)
        assert float(lam.lam) >= 0.0
    assert float(lam.lam) == 0.0
    with pytest.raises(ValueError, match="lambda_init"):
        r2vpo_init(-0.1)


def test_r2vpo_regularizer_term_state_and_update_loop():
    logp, old, m = _inputs(3, scale=0.8)
    reg = ratio_variance_penalty(delta=0.01, eta=1.0, lambda_init=0.2)
    batch = PolicyBatch(mask=jnp.asarray(m), old_logp=jnp.asarray(old), advantages=jnp.zeros_like(m))
    st = reg.init()
    tok, scalar, metrics = reg.apply(TokenOutputs(logp=jnp.asarray(logp)), batch, st)
    var = np_var(logp, old, m, "mean")
    assert tok is None
    assert float(scalar) == pytest.approx(0.2 * (var - 0.01), rel=1e-4)
    assert float(metrics["r2vpo/lambda"]) == pytest.approx(0.2)
    st2 = reg.update(st, metrics)  # Var ≫ δ: λ rises
    assert float(st2.lam) == pytest.approx(0.2 + var - 0.01, rel=1e-4)
    # on-policy (ρ ≡ 1): Var = 0 < δ, λ decays to 0 and stays there
    st3 = st2
    for _ in range(int(np.ceil(float(st2.lam) / 0.01)) + 2):
        _, _, mt = reg.apply(TokenOutputs(logp=jnp.asarray(old)), batch, st3)
        st3 = reg.update(st3, mt)
    assert float(st3.lam) == 0.0
    # λ enters as a constant (no gradient to the dual variable through the loss)
    g = jax.grad(lambda s: reg.apply(TokenOutputs(logp=jnp.asarray(logp)), batch, s)[1])(st)
    assert float(g.lam) == 0.0


def test_kl_penalty_fixed_and_adaptive():
    logp, ref, m = _inputs(4)
    batch = PolicyBatch(mask=jnp.asarray(m), old_logp=jnp.asarray(ref), advantages=jnp.zeros_like(m),
                        ref_logp=jnp.asarray(ref))
    out = TokenOutputs(logp=jnp.asarray(logp))
    fixed = kl_penalty(coef=0.5, estimator="k1")
    tok, scalar, metrics = fixed.apply(out, batch, fixed.init())
    d = (np.float64(logp) - ref) * m
    np.testing.assert_allclose(tok, 0.5 * d, rtol=1e-5, atol=1e-6)
    assert scalar is None
    assert float(metrics["kl/mean"]) == pytest.approx(d[m > 0].mean(), rel=1e-4)
    assert fixed.update(fixed.init(), metrics) == fixed.init()
    adaptive = kl_penalty(coef=0.5, estimator="k3", target=1e-6, horizon=10.0)
    _, _, mt = adaptive.apply(out, batch, adaptive.init())
    assert float(adaptive.update(adaptive.init(), mt).coef) == pytest.approx(0.5 * 1.02)


def test_missing_fields_raise_clear_errors():
    x = jnp.zeros((1, 2))
    batch = PolicyBatch(mask=x, old_logp=x, advantages=x)
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(coef=0.1).apply(TokenOutputs(logp=x), batch, kl_penalty(coef=0.1).init())
    with pytest.raises(ValueError, match="entropy"):
        entropy_bonus(coef=0.1).apply(TokenOutputs(logp=x), batch, ())
    with pytest.raises(ValueError, match="about"):
        ratio_variance(x, x, x, about="median")


def test_entropy_bonus_rewards_entropy():
    ent = jnp.asarray([[1.0, 2.0]])
    tok, _, _ = entropy_bonus(coef=0.01).apply(
        TokenOutputs(logp=jnp.zeros((1, 2)), entropy=ent),
        PolicyBatch(mask=jnp.ones((1, 2)), old_logp=jnp.zeros((1, 2)), advantages=jnp.zeros((1, 2))), ())
    np.testing.assert_allclose(tok, [[-0.01, -0.02]])
