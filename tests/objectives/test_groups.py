"""Tests for rlx.objectives.groups: layout helpers, masked moments, whitening."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.objectives import groups
from rlx.objectives.advantages import grpo_advantages


def np_whiten(x, m, eps=1e-8, unbiased=False):
    x = np.asarray(x, np.float64)
    m = np.asarray(m, bool)
    v = x[m]
    mean = v.mean()
    var = ((v - mean) ** 2).sum() / (len(v) - (1 if unbiased else 0))
    return np.where(m, (x - mean) / np.sqrt(max(var, eps)), 0.0)


def test_group_ids_are_prompt_major():
    np.testing.assert_array_equal(groups.group_ids(2, 3), [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="group_size"):
        groups.group_ids(2, 0)


def test_to_groups_and_from_groups_round_trip():
    x = jnp.arange(12.0).reshape(6, 2)
    g = groups.to_groups(x, group_size=3)
    assert g.shape == (2, 3, 2)
    np.testing.assert_array_equal(g[1, 0], [6.0, 7.0])
    np.testing.assert_array_equal(groups.from_groups(g), x)
    with pytest.raises(ValueError, match="group_size=4"):
        groups.to_groups(x, group_size=4)
    with pytest.raises(ValueError, match="rank"):
        groups.from_groups(jnp.arange(3.0))


def test_scatter_to_groups_by_hand():
    out = groups.scatter_to_groups(
        jnp.arange(5.0), jnp.array([1, 0, 1, 0, 0]), num_groups=2, group_size=2
    )
    np.testing.assert_array_equal(out.values, [[1.0, 3.0], [0.0, 2.0]])
    # the third member of group 0 does not fit: it maps to fill on the way back
    back = groups.gather_from_groups(out.values * 10, out.slot, fill=-1.0)
    np.testing.assert_array_equal(back, [0.0, 10.0, 20.0, 30.0, -1.0])


def test_scatter_shuffled_rows_gives_same_advantages_as_prompt_major():
    rng = np.random.default_rng(0)
    p, g = 3, 4
    r = rng.normal(size=(p, g)).astype(np.float32)
    ids = np.repeat(np.arange(p), g)
    perm = rng.permutation(p * g)
    out = groups.scatter_to_groups(r.reshape(-1)[perm], ids[perm], num_groups=p,
                                   group_size=g)
    adv_rows = groups.gather_from_groups(grpo_advantages(out.values), out.slot)
    expected = np.asarray(grpo_advantages(r)).reshape(-1)[perm]
    np.testing.assert_allclose(adv_rows, expected, rtol=1e-5, atol=1e-6)


def test_ragged_group_slots_are_missing_samples():
    # group 1 has only 2 of 3 rollouts: the empty slot is NaN -> advantage 0, and the
    # present rollouts are normalised among themselves
    out = groups.scatter_to_groups(jnp.array([1.0, 0.0, 0.0, 2.0, 4.0]),
                                   jnp.array([0, 0, 0, 1, 1]), num_groups=2,
                                   group_size=3)
    assert np.isnan(out.values[1, 2])
    adv = grpo_advantages(out.values)
    assert np.all(np.isfinite(adv))
    np.testing.assert_allclose(adv[1], [-1.0, 1.0, 0.0], atol=1e-5)


def test_broadcast_to_tokens_masks_padding():
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    adv = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    out = groups.broadcast_to_tokens(adv, mask)
    np.testing.assert_array_equal(
        out, [[1, 1, 0], [-2, 0, 0], [3, 3, 3], [0, 0, 0]])
    np.testing.assert_array_equal(groups.broadcast_to_tokens(adv.reshape(-1), mask), out)
    with pytest.raises(ValueError, match="mask has 3 rows"):
        groups.broadcast_to_tokens(adv, mask[:3])


def test_masked_moments_match_numpy_and_ignore_masked_nan():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6))
    m = rng.random((4, 6)) < 0.6
    x_bad = np.where(m, x, np.nan)
    for unbiased in (False, True):
        mom = groups.masked_moments(jnp.asarray(x_bad, jnp.float32), m, unbiased=unbiased)
        v = x[m]
        np.testing.assert_allclose(mom.mean, v.mean(), rtol=1e-5)
        np.testing.assert_allclose(mom.var, v.var(ddof=int(unbiased)), rtol=1e-5)
        assert float(mom.count) == m.sum()


def test_whiten_matches_numpy_transcription():
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 3.0, size=(5, 7))
    m = rng.random((5, 7)) < 0.7
    for unbiased in (False, True):
        out = groups.whiten(jnp.asarray(x, jnp.float32), m, unbiased=unbiased)
        np.testing.assert_allclose(out, np_whiten(x, m, unbiased=unbiased), rtol=1e-4,
                                   atol=1e-5)
    # shift_mean=False keeps the mean and rescales only
    out = groups.whiten(jnp.asarray(x, jnp.float32), m, shift_mean=False)
    expected = np.where(m, np_whiten(x, m) + x[m].mean(), 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_whiten_empty_or_constant_input_gives_zeros_not_nan():
    out = groups.whiten(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    np.testing.assert_array_equal(out, np.zeros((2, 3)))
    out = groups.whiten(jnp.full((2, 3), 5.0), jnp.ones((2, 3)))
    np.testing.assert_array_equal(out, np.zeros((2, 3)))


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from rlx.objectives.groups import whiten, masked_moments
    from rlx.objectives.advantages import batch_std_advantages, reinforce_pp_advantages

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(8, 5)), jnp.float32)
    m = jnp.asarray(rng.random((8, 5)) < np.linspace(0.2, 0.95, 8)[:, None])
    r = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)

    def sharded(fn):
        f = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data")),
                          out_specs=P("data"))
        put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, P("data")))
        return lambda a, b: f(put(a), put(b))

    out = {}
    glob = whiten(x, m)
    out["whiten_global"] = float(jnp.max(jnp.abs(
        sharded(lambda a, b: whiten(a, b, axis_name="data"))(x, m) - glob)))
    out["whiten_local"] = float(jnp.max(jnp.abs(
        sharded(lambda a, b: whiten(a, b))(x, m) - glob)))
    out["rpp_global"] = float(jnp.max(jnp.abs(
        sharded(lambda a, b: reinforce_pp_advantages(a, b, axis_name="data"))(x, m)
        - reinforce_pp_advantages(x, m))))
    out["batch_std_global"] = float(jnp.max(jnp.abs(
        sharded(lambda a, b: batch_std_advantages(a, axis_name="data") + 0 * b[:, :4])(
            r, x) - batch_std_advantages(r))))
    print(json.dumps(out))
    """
)


def test_whiten_is_global_under_shard_map_over_4_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["whiten_global"] < 1e-5
    assert out["rpp_global"] < 1e-5
    assert out["batch_std_global"] < 1e-5
    # without the psum each shard whitens alone: clearly different
    assert out["whiten_local"] > 1e-2
