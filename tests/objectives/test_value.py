import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.objectives.types import PolicyBatch, TokenOutputs
from rlx.objectives.value import clipped_value_loss, value_loss


def np_value(v, vo, ret, m, eps):
    v, vo, ret = map(np.float64, (v, vo, ret))
    return 0.5 * np.maximum((v - ret) ** 2, (np.clip(v, vo - eps, vo + eps) - ret) ** 2) * m


def test_hand_computed():
    v = jnp.asarray([[1.0, 0.0, 0.5]])
    vo = jnp.zeros((1, 3))
    ret = jnp.asarray([[0.0, 1.0, 0.0]])
    loss, clipped = clipped_value_loss(v, vo, ret, jnp.ones((1, 3)), clip_eps=0.2)
    # v=1 clipped to .2: max(1, .04) -> .5 ; v=0: max(1, 1) -> .5 ; v=.5 -> clip .2: max(.25,.04)
    np.testing.assert_allclose(loss, [[0.5, 0.5, 0.125]])
    np.testing.assert_allclose(clipped, [[0, 0, 0]])
    loss, clipped = clipped_value_loss(jnp.asarray([[0.5]]), vo[:, :1], jnp.asarray([[1.0]]),
                                       jnp.ones((1, 1)), clip_eps=0.2)
    assert float(loss[0, 0]) == pytest.approx(0.5 * 0.64) and float(clipped[0, 0]) == 1.0


def test_matches_numpy_and_gradient_vanishes_when_clipped_branch_wins():
    rng = np.random.default_rng(0)
    v, vo, ret = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    m = (rng.random((3, 4)) < 0.7).astype(np.float32)
    loss, clipped = clipped_value_loss(*map(jnp.asarray, (v, vo, ret, m)), clip_eps=0.2)
    np.testing.assert_allclose(loss, np_value(v, vo, ret, m, 0.2), rtol=1e-5, atol=1e-6)
    g = np.asarray(jax.grad(lambda x: clipped_value_loss(x, vo, ret, m)[0].sum())(jnp.asarray(v)))
    outside = np.abs(v - vo) > 0.2
    frozen = (np.asarray(clipped) > 0) & outside
    assert np.all(g[frozen] == 0.0)
    live = (np.asarray(clipped) == 0) & (m > 0)
    np.testing.assert_allclose(g[live], (v - ret)[live], rtol=1e-5)


def test_unclipped_option():
    loss, _ = clipped_value_loss(jnp.asarray([[2.0]]), jnp.zeros((1, 1)), jnp.zeros((1, 1)),
                                 jnp.ones((1, 1)), clip_eps=None)
    assert float(loss[0, 0]) == pytest.approx(2.0)


def test_value_loss_term_and_errors():
    x = jnp.ones((1, 2))
    batch = PolicyBatch(mask=x, old_logp=x, advantages=x, old_values=x, returns=2 * x)
    tok, scalar, metrics = value_loss(coef=0.5).apply(TokenOutputs(logp=x, values=x), batch, ())
    np.testing.assert_allclose(tok, [[0.25, 0.25]])
    assert scalar is None and float(metrics["value/loss"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="TokenOutputs.values"):
        value_loss().apply(TokenOutputs(logp=x), batch, ())
    with pytest.raises(ValueError, match="PolicyBatch.returns"):
        value_loss().apply(TokenOutputs(logp=x, values=x), batch.replace(returns=None), ())
    with pytest.raises(ValueError, match="returns"):
        clipped_value_loss(x, x, jnp.ones((1, 3)), x)
