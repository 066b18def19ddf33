import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.objectives.preference import (
    bradley_terry_loss, distillation_reverse_kl, dpo_loss, ipo_loss, simpo_loss,
)


def np_logsig(x):
    return -np.log1p(np.exp(-np.float64(x)))


def _pairs(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return [(-rng.random(n) * 20).astype(np.float32) for _ in range(4)]


def test_bradley_terry_hand_computed_and_margin():
    assert float(bradley_terry_loss(jnp.asarray([1.0]), jnp.asarray([1.0]))[0]) == pytest.approx(np.log(2))
    got = bradley_terry_loss(jnp.asarray([2.0]), jnp.asarray([1.0]), margin=1.0)
    assert float(got[0]) == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="rejected_rewards"):
        bradley_terry_loss(jnp.ones(2), jnp.ones(3))


def test_dpo_matches_numpy_and_hand_value():
    pc, pr, rc, rr = _pairs(1)
    h = (np.float64(pc) - rc) - (np.float64(pr) - rr)
    got = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.1)
    np.testing.assert_allclose(got, -np_logsig(0.1 * h), rtol=1e-5)
    ls = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.1, label_smoothing=0.2)
    np.testing.assert_allclose(ls, -0.8 * np_logsig(0.1 * h) - 0.2 * np_logsig(-0.1 * h), rtol=1e-5)
    z = jnp.zeros(1)
    assert float(dpo_loss(z, z, z, z)[0]) == pytest.approx(np.log(2))


def test_ipo_matches_numpy_and_minimum_at_target_margin():
    pc, pr, rc, rr = _pairs(2)
    h = (np.float64(pc) - rc) - (np.float64(pr) - rr)
    np.testing.assert_allclose(ipo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), tau=0.5),
                               (h - 1.0) ** 2, rtol=1e-5)
    z = jnp.zeros(1)
    assert float(ipo_loss(jnp.asarray([1.0]), z, z, z, tau=0.5)[0]) == 0.0


def test_simpo_matches_numpy_and_validates_lengths():
    pc, pr, _, _ = _pairs(3)
    lc, lr = np.array([1, 2, 3, 4, 5]), np.array([5, 4, 3, 2, 1])
    got = simpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(lc), jnp.asarray(lr),
                     beta=2.0, gamma=1.0)
    want = -np_logsig(2.0 * np.float64(pc) / lc - 2.0 * np.float64(pr) / lr - 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        simpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.zeros(5), jnp.asarray(lr))
    jitted = jax.jit(simpo_loss)(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(lc), jnp.asarray(lr))
    assert np.all(np.isfinite(np.asarray(jitted)))


def test_preference_gradients_push_chosen_up():
    pc, pr, rc, rr = map(jnp.asarray, _pairs(4))
    for fn in (lambda a, b: dpo_loss(a, b, rc, rr), lambda a, b: ipo_loss(a, b, rc, rr, tau=10.0),
               lambda a, b: simpo_loss(a, b, jnp.ones(5), jnp.ones(5))):
        gc, gr = jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1))(pc, pr)
        h = (pc - rc) - (pr - rr)
        assert np.all(np.asarray(gc)[np.asarray(h) < 0] < 0)  # lowering loss raises log π(chosen)
        np.testing.assert_allclose(gc, -gr, rtol=1e-5)


def test_distillation_reverse_kl_value_and_score_function_gradient():
    rng = np.random.default_rng(5)
    logp = jnp.asarray(-rng.random((2, 3)).astype(np.float32))
    teacher = jnp.asarray(-rng.random((2, 3)).astype(np.float32))
    m = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    v = distillation_reverse_kl(logp, teacher, m)
    np.testing.assert_allclose(v, (logp - teacher) * m, rtol=1e-6)
    g = jax.grad(lambda lp: distillation_reverse_kl(lp, teacher, m).sum())(logp)
    np.testing.assert_allclose(g, (logp - teacher) * m, rtol=1e-6)
    # exact reverse KL on a full distribution: E_π[sg(k1)∇logπ] = ∇KL(π‖q)
    z = jnp.asarray([0.3, -0.2, 0.5])
    q = jnp.log(jnp.asarray([0.2, 0.5, 0.3]))

    def surrogate(z):
        lp = jax.nn.log_softmax(z)
        p = jax.lax.stop_gradient(jnp.exp(lp))
        return (p * distillation_reverse_kl(lp[None], q[None], jnp.ones((1, 3)))[0]).sum()

    exact = jax.grad(lambda z: (jnp.exp(jax.nn.log_softmax(z)) * (jax.nn.log_softmax(z) - q)).sum())(z)
    np.testing.assert_allclose(jax.grad(surrogate)(z), exact, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="teacher_logp"):
        distillation_reverse_kl(logp, teacher[:, :2], m)
