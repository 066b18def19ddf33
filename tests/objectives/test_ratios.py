import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlx.objectives.ratios import log_ratio, masked_stats, ratio_metrics


def np_ratio_metrics(logp, old, mask, eps_low, eps_high, clamp=20.0):
    lr = np.clip(np.asarray(logp, np.float64) - old, -clamp, clamp)
    v = np.asarray(mask) > 0
    r = np.exp(lr[v])
    return {
        "ratio/mean": r.mean(), "ratio/min": r.min(), "ratio/max": r.max(),
        "ratio/clip_frac_low": (r < 1 - eps_low).mean(),
        "ratio/clip_frac_high": (r > 1 + eps_high).mean(),
        "ratio/approx_kl": (r - 1 - lr[v]).mean(), "ratio/valid_tokens": v.sum(),
    }


def _inputs(seed, b=4, t=5, scale=0.5):
    rng = np.random.default_rng(seed)
    old = -rng.random((b, t)).astype(np.float32) * 3
    logp = (old + scale * rng.normal(size=(b, t))).astype(np.float32)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    mask[0, 0] = 1
    return logp, old, mask


def test_hand_computed_metrics():
    old = jnp.zeros((1, 3))
    logp = jnp.log(jnp.asarray([[0.5, 1.0, 2.0]]))
    m = ratio_metrics(logp, old, jnp.asarray([[1.0, 1.0, 0.0]]), eps_low=0.2, eps_high=0.2)
    assert float(m["ratio/mean"]) == pytest.approx(0.75)
    assert float(m["ratio/min"]) == pytest.approx(0.5)
    assert float(m["ratio/max"]) == pytest.approx(1.0)
    assert float(m["ratio/clip_frac_low"]) == pytest.approx(0.5)
    assert float(m["ratio/clip_frac_high"]) == 0.0
    assert float(m["ratio/approx_kl"]) == pytest.approx(0.5 * (0.5 - 1 - np.log(0.5)))
    assert float(m["ratio/valid_tokens"]) == 2


def test_matches_numpy_reference():
    logp, old, mask = _inputs(3)
    got = ratio_metrics(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask),
                        eps_low=0.2, eps_high=0.28)
    want = np_ratio_metrics(logp, old, mask, 0.2, 0.28)
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 3.0))
def test_clip_fractions_in_unit_interval(seed, scale):
    logp, old, mask = _inputs(seed, scale=scale)
    m = ratio_metrics(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask),
                      eps_low=0.2, eps_high=0.28)
    for k in ("ratio/clip_frac_low", "ratio/clip_frac_high"):
        assert 0.0 <= float(m[k]) <= 1.0
    assert float(m["ratio/approx_kl"]) >= -1e-6
    assert float(m["ratio/min"]) <= float(m["ratio/mean"]) + 1e-6 <= float(m["ratio/max"]) + 2e-6


def test_global_under_axis_name_equals_full_batch():
    logp, old, mask = _inputs(5, b=4)
    full = ratio_metrics(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask),
                         eps_low=0.2, eps_high=0.2)
    shard = lambda x: jnp.asarray(x).reshape(2, 2, -1)  # noqa: E731
    per_dev = jax.vmap(
        lambda a, b, c: ratio_metrics(a, b, c, eps_low=0.2, eps_high=0.2, axis_name="d"),
        axis_name="d")(shard(logp), shard(old), shard(mask))
    for k in full:
        np.testing.assert_allclose(per_dev[k], float(full[k]), rtol=1e-5, err_msg=k)


def test_all_masked_gives_neutral_finite_metrics():
    m = ratio_metrics(jnp.full((2, 2), jnp.nan), jnp.zeros((2, 2)), jnp.zeros((2, 2)),
                      eps_low=0.2, eps_high=0.2)
    assert all(np.isfinite(float(v)) for v in m.values())
    assert float(m["ratio/min"]) == 1.0 and float(m["ratio/valid_tokens"]) == 0.0


def test_log_ratio_clamped_and_masked():
    lr = log_ratio(jnp.asarray([[100.0, -100.0, 5.0]]), jnp.zeros((1, 3)),
                   jnp.asarray([[1.0, 1.0, 0.0]]), clamp=20.0)
    np.testing.assert_allclose(lr, [[20.0, -20.0, 0.0]])


def test_metrics_carry_no_gradient():
    logp, old, mask = _inputs(0)
    g = jax.grad(lambda lp: sum(ratio_metrics(lp, old, mask, eps_low=.2, eps_high=.2).values()))(
        jnp.asarray(logp))
    assert float(jnp.abs(g).sum()) == 0.0


def test_masked_stats_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    mask = (rng.random((3, 4)) < 0.6).astype(np.float32)
    mask[0, 0] = 1
    s = masked_stats(jnp.asarray(x), jnp.asarray(mask), prefix="adv")
    v = x[mask > 0].astype(np.float64)
    for k, want in (("mean", v.mean()), ("std", v.std()), ("min", v.min()), ("max", v.max())):
        assert float(s[f"adv/{k}"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
