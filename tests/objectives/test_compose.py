import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.objectives import surrogates as S
from rlx.objectives.advantages import grpo_advantages
from rlx.objectives.aggregation import seq_mean_token_mean, token_mean
from rlx.objectives.compose import compose, group_advantages
from rlx.objectives.regularizers import entropy_bonus, kl_penalty, ratio_variance_penalty
from rlx.objectives.types import PolicyBatch, RewardBatch, TokenOutputs

P, G, T = 2, 3, 4
B = P * G


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    old = (-rng.random((B, T)) * 2).astype(np.float32)
    logp = (old + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
    ref = (old + 0.2 * rng.normal(size=(B, T))).astype(np.float32)
    ent = rng.random((B, T)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    m = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv = (rng.normal(size=(B, 1)) * m).astype(np.float32)
    return logp, old, ref, ent, m, adv


def _obj(aggregation=token_mean, regs=None):
    regs = (kl_penalty(coef=0.1, estimator="k3"), entropy_bonus(coef=0.01)) if regs is None else regs
    return compose(advantages=group_advantages(grpo_advantages),
                   surrogate=functools.partial(S.ppo_clip_loss, eps_low=0.2, eps_high=0.28),
                   aggregation=aggregation, regularizers=regs, metric_eps=(0.2, 0.28))


def _batch(old, ref, m, adv):
    return PolicyBatch(mask=jnp.asarray(m), old_logp=jnp.asarray(old), advantages=jnp.asarray(adv),
                       ref_logp=jnp.asarray(ref))


def test_loss_equals_hand_composition_in_numpy():
    logp, old, ref, ent, m, adv = _arrays(0)
    obj = _obj()
    out = obj.loss(TokenOutputs(logp=jnp.asarray(logp), entropy=jnp.asarray(ent)),
                   _batch(old, ref, m, adv), obj.init())
    r = np.exp(np.float64(logp) - old)
    ppo = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.28))
    d = np.float64(logp) - ref
    k3 = np.exp(-d) - 1 + d
    tok = (ppo + 0.1 * k3 - 0.01 * ent) * m
    assert float(out.loss) == pytest.approx(tok.sum() / m.sum(), rel=1e-5)
    assert float(out.denominator) == m.sum()
    assert float(out.metrics["loss/policy"]) == pytest.approx((ppo * m).sum() / m.sum(), rel=1e-5)
    for k in ("ratio/mean", "ratio/min", "ratio/max", "ratio/clip_frac_low", "ratio/clip_frac_high",
              "ratio/approx_kl", "adv/mean", "adv/std", "adv/min", "adv/max", "entropy/mean",
              "surrogate/clip_frac_low", "surrogate/clip_frac_high", "kl/mean", "loss/total"):
        assert k in out.metrics and np.isfinite(float(out.metrics[k])), k
    assert float(out.metrics["entropy/mean"]) == pytest.approx(ent[m > 0].mean(), rel=1e-5)


@pytest.mark.parametrize("aggregation", [token_mean, seq_mean_token_mean])
def test_micro_batch_numerators_give_exact_full_batch_loss_and_gradient(aggregation):
    logp, old, ref, ent, m, adv = _arrays(1)
    obj = _obj(aggregation)
    st = obj.init()

    def f(lp, sl):
        b = PolicyBatch(mask=jnp.asarray(m[sl]), old_logp=jnp.asarray(old[sl]),
                        advantages=jnp.asarray(adv[sl]), ref_logp=jnp.asarray(ref[sl]))
        out = obj.loss(TokenOutputs(logp=lp, entropy=jnp.asarray(ent[sl])), b, st)
        return out.numerator, out

    full_grad, full = jax.grad(lambda lp: (obj.loss(
        TokenOutputs(logp=lp, entropy=jnp.asarray(ent)), _batch(old, ref, m, adv), st).loss, 0.0),
        has_aux=True)(jnp.asarray(logp))
    parts = [slice(0, 2), slice(2, 5), slice(5, 6)]
    grads, nums, dens = [], 0.0, 0.0
    for sl in parts:
        g, out = jax.grad(f, has_aux=True)(jnp.asarray(logp[sl]), sl)
        grads.append(g)
        nums, dens = nums + out.numerator, dens + out.denominator
    total = obj.loss(TokenOutputs(logp=jnp.asarray(logp), entropy=jnp.asarray(ent)),
                     _batch(old, ref, m, adv), st).loss
    assert float(nums / dens) == pytest.approx(float(total), rel=1e-5)
    np.testing.assert_allclose(jnp.concatenate(grads) / dens, full_grad, rtol=1e-4, atol=1e-7)


def test_scalar_regularizer_is_global_under_axis_name():
    logp, old, ref, ent, m, adv = _arrays(2)
    obj = _obj(regs=(ratio_variance_penalty(delta=0.0, lambda_init=0.5),))
    st = obj.init()
    full = obj.loss(TokenOutputs(logp=jnp.asarray(logp)), _batch(old, ref, m, adv), st)
    sh = lambda x: jnp.asarray(x).reshape(2, B // 2, T)  # noqa: E731

    def dev(lp, o, r, mm, a):
        return obj.loss(TokenOutputs(logp=lp), PolicyBatch(mask=mm, old_logp=o, advantages=a,
                                                           ref_logp=r), st, axis_name="d")

    out = jax.vmap(dev, axis_name="d")(*map(sh, (logp, old, ref, m, adv)))
    np.testing.assert_allclose(out.loss, float(full.loss), rtol=1e-5)
    assert float(out.numerator.sum() / out.denominator.sum()) == pytest.approx(float(full.loss), rel=1e-5)
    for k in ("r2vpo/ratio_var", "ratio/max", "adv/std", "loss/policy"):
        np.testing.assert_allclose(out.metrics[k], float(full.metrics[k]), rtol=1e-5, err_msg=k)


def test_update_threads_regularizer_states():
    logp, old, ref, ent, m, adv = _arrays(3)
    obj = _obj(regs=(kl_penalty(coef=0.1, target=1e-6, horizon=10.0),
                     ratio_variance_penalty(delta=0.0, eta=1.0, lambda_init=0.0)))
    st = obj.init()
    out = obj.loss(TokenOutputs(logp=jnp.asarray(logp)), _batch(old, ref, m, adv), st)
    st2 = jax.jit(obj.update)(st, out.metrics)
    assert float(st2["kl"].coef) > 0.1 and float(st2["r2vpo"].lam) > 0.0


def test_is_correction_weights_the_surrogate():
    logp, old, ref, ent, m, adv = _arrays(4)
    obj = compose(advantages=group_advantages(grpo_advantages), surrogate=S.policy_gradient_loss,
                  is_correction=functools.partial(S.truncated_is_weights, cap=1.5))
    sampler = old - 0.5
    b = _batch(old, ref, m, adv).replace(sampler_logp=jnp.asarray(sampler))
    out = obj.loss(TokenOutputs(logp=jnp.asarray(logp)), b, obj.init())
    w = np.minimum(np.exp(0.5), 1.5)
    assert float(out.loss) == pytest.approx((-adv * logp * w * m).sum() / m.sum(), rel=1e-5)
    assert float(out.metrics["is/frac_corrected"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sampler_logp"):
        obj.loss(TokenOutputs(logp=jnp.asarray(logp)), _batch(old, ref, m, adv), obj.init())


def test_all_masked_batch_gives_zero_loss_and_finite_gradients():
    logp, old, ref, ent, m, adv = _arrays(5)
    obj = _obj(regs=(kl_penalty(coef=0.1), ratio_variance_penalty()))
    b = _batch(old, ref, np.zeros_like(m), adv)

    def f(lp):
        out = obj.loss(TokenOutputs(logp=lp, entropy=jnp.asarray(ent)), b, obj.init())
        return out.loss, out

    g, out = jax.jit(jax.grad(f, has_aux=True))(jnp.asarray(logp))
    assert float(out.loss) == 0.0 and float(out.denominator) == 0.0
    assert np.all(np.isfinite(np.asarray(g)))
    assert all(np.isfinite(float(v)) for v in out.metrics.values())


def test_malformed_inputs_raise_clear_errors():
    logp, old, ref, ent, m, adv = _arrays(6)
    obj = _obj()
    with pytest.raises(ValueError, match="PolicyBatch.advantages"):
        obj.loss(TokenOutputs(logp=jnp.asarray(logp)), _batch(old, ref, m, adv[:, :2]), obj.init())
    with pytest.raises(ValueError, match="TokenOutputs.entropy"):
        obj.loss(TokenOutputs(logp=jnp.asarray(logp), entropy=jnp.zeros((B, T + 1))),
                 _batch(old, ref, m, adv), obj.init())
    with pytest.raises(ValueError, match="group_ids"):
        obj.loss(TokenOutputs(logp=jnp.asarray(logp)),
                 _batch(old, ref, m, adv).replace(group_ids=jnp.zeros(B + 1)), obj.init())
    with pytest.raises(ValueError, match="unique"):
        _obj(regs=(entropy_bonus(coef=0.1), entropy_bonus(coef=0.2)))
    with pytest.raises(ValueError, match="RewardBatch.mask"):
        obj.advantages(RewardBatch(rewards=jnp.zeros((P, G)), mask=jnp.ones((B + 1, T))))
    with pytest.raises(ValueError, match="RewardBatch.rewards"):
        obj.advantages(RewardBatch(rewards=jnp.zeros((B,)), mask=jnp.ones((B, T))))


def test_group_advantages_filter_and_shaping():
    m = np.ones((B, T), np.float32)
    rewards = jnp.asarray([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    est = group_advantages(functools.partial(grpo_advantages, eps=1e-6), filter_zero_variance=True)
    out = est(RewardBatch(rewards=rewards, mask=jnp.asarray(m)))
    np.testing.assert_allclose(out.mask[:G], 0.0)
    np.testing.assert_allclose(out.mask[G:], 1.0)
    assert float(out.metrics["adv/kept_groups"]) == 0.5
    want = np.asarray(grpo_advantages(rewards, eps=1e-6)).reshape(-1)[G:]
    np.testing.assert_allclose(out.advantages[G:, 0], want, rtol=1e-5)
    # shaping by length: group 0 becomes distinguishable, but the filter uses raw rewards
    shaped = group_advantages(functools.partial(grpo_advantages, eps=1e-6),
                              filter_zero_variance=True,
                              reward_shaping=lambda ln: -0.1 * ln.astype(jnp.float32))
    lengths = jnp.asarray([1, 2, 3, 1, 1, 1])
    out = shaped(RewardBatch(rewards=rewards, mask=jnp.asarray(m), lengths=lengths))
    np.testing.assert_allclose(out.mask[:G], 0.0)
    unfiltered = group_advantages(grpo_advantages, reward_shaping=lambda ln: -0.1 * ln)
    a = unfiltered(RewardBatch(rewards=rewards, mask=jnp.asarray(m), lengths=lengths)).advantages
    assert float(a[0, 0]) > float(a[1, 0]) > float(a[2, 0])


_SHARD_MAP_SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as Ps
import rlx.objectives as O
rng = np.random.default_rng(0)
old = jnp.asarray(-rng.random((4, 5)) * 2, jnp.float32)
logp = old + 0.3 * jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
m = jnp.asarray(rng.random((4, 5)) < .7, jnp.float32).at[:, 0].set(1.)
adv = jnp.asarray(rng.normal(size=(4, 1)), jnp.float32) * m
ref = old + 0.1
mesh = jax.make_mesh((2,), ("d",))
sh = lambda x: jax.device_put(x, NamedSharding(mesh, Ps("d")))
for name in ("r2vpo", "bapo", "grpo"):
    obj = O.PRESETS[name]()
    st = obj.init()
    def loss(lp, o, a, mm, r, axis_name=None):
        return obj.loss(O.TokenOutputs(logp=lp), O.PolicyBatch(mask=mm, old_logp=o, advantages=a,
                        ref_logp=r), st, axis_name=axis_name).loss
    full_l, full_g = jax.value_and_grad(loss)(logp, old, adv, m, ref)
    f = jax.shard_map(lambda *x: loss(*x, axis_name="d"), mesh=mesh, in_specs=(Ps("d"),) * 5,
                      out_specs=Ps())
    args = [sh(x) for x in (old, adv, m, ref)]
    l, g = jax.jit(jax.value_and_grad(lambda lp: f(lp, *args)))(sh(logp))
    np.testing.assert_allclose(float(l), float(full_l), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(full_g), rtol=1e-5, atol=1e-7)
print("OK")
'''


def test_loss_and_gradient_exact_under_shard_map_data_parallelism():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_surrogate_and_is_metrics_are_global_under_axis_name():
    logp, old, ref, ent, m, adv = _arrays(7)
    obj = compose(advantages=group_advantages(grpo_advantages),
                  surrogate=functools.partial(S.ppo_clip_loss, eps_low=0.1, dual_clip=1.1),
                  is_correction=functools.partial(S.truncated_is_weights, cap=1.2))
    sampler = old - 0.3 * np.sign(np.arange(B * T).reshape(B, T) % 3 - 1)
    b = _batch(old, ref, m, adv).replace(sampler_logp=jnp.asarray(sampler, jnp.float32))
    full = obj.loss(TokenOutputs(logp=jnp.asarray(logp)), b, obj.init())
    assert 0.0 < float(full.metrics["surrogate/dual_clip_frac"]) < 1.0
    assert 0.0 < float(full.metrics["is/frac_corrected"]) < 1.0
    sh = lambda x: jnp.asarray(x).reshape(2, B // 2, T)  # noqa: E731
    out = jax.vmap(lambda lp, bb: obj.loss(TokenOutputs(logp=lp), bb, obj.init(), axis_name="d"),
                   axis_name="d")(sh(logp), jax.tree.map(sh, b))
    for k in ("surrogate/dual_clip_frac", "is/frac_corrected", "is/mean_weight", "loss/total"):
        np.testing.assert_allclose(out.metrics[k], float(full.metrics[k]), rtol=1e-5, err_msg=k)
