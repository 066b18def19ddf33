import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlx.objectives as O
from rlx.objectives import presets

P, G, T = 2, 4, 5
B = P * G


def _data(seed=0):
    k = jax.random.split(jax.random.key(seed), 7)
    lengths = jax.random.randint(k[0], (B,), 1, T + 1)
    mask = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.float32)
    rewards = jax.random.bernoulli(k[1], 0.5, (P, G)).astype(jnp.float32).at[:, 0].set(1.0) \
        .at[:, 1].set(0.0)
    old = -jax.random.uniform(k[2], (B, T)) * 2
    ref = old + 0.1 * jax.random.normal(k[3], (B, T))
    values = jax.random.normal(k[4], (B, T))
    logp = old + 0.1 * jax.random.normal(k[5], (B, T))
    comp = jax.random.normal(k[6], (P, G, 3))
    return dict(lengths=lengths, mask=mask, rewards=rewards, old=old, ref=ref, values=values,
                logp=logp, comp=comp)


@functools.lru_cache(maxsize=None)
def _step(name):
    obj = presets.PRESETS[name]()

    @jax.jit
    def step(d):
        rewards = d["comp"] if name == "gdpo" else d["rewards"]
        rb = O.RewardBatch(rewards=rewards, mask=d["mask"], lengths=d["lengths"],
                           values=d["values"], kl=d["old"] - d["ref"])
        ao = obj.advantages(rb)
        batch = O.PolicyBatch(mask=ao.mask, old_logp=d["old"], advantages=ao.advantages,
                              ref_logp=d["ref"], old_values=d["values"],
                              returns=ao.returns if ao.returns is not None else d["values"])
        state = obj.init()

        def loss(lp, v):
            out = obj.loss(O.TokenOutputs(logp=lp, entropy=jnp.ones_like(lp), values=v), batch, state)
            return out.loss, out

        (l, out), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(d["logp"], d["values"] + 0.1)
        return l, g, out.metrics, obj.update(state, out.metrics)

    return step


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_runs_end_to_end_under_jit(name):
    l, g, metrics, new_state = _step(name)(_data(0))
    assert np.isfinite(float(l))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    assert float(jnp.abs(g[0]).sum()) > 0.0
    for k in ("ratio/mean", "ratio/clip_frac_low", "ratio/approx_kl", "adv/mean", "entropy/mean"):
        assert np.isfinite(float(metrics[k])), k
    jax.tree.map(lambda x: np.isfinite(np.asarray(x)).all() or pytest.fail(name), new_state)


def test_all_required_presets_exist():
    assert set(presets.PRESETS) >= {"grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo",
                                    "reinforce_pp", "ppo", "bnpo", "gdpo", "bapo", "r2vpo",
                                    "sapo", "gmpo"}


def test_dapo_is_the_composition_it_claims():
    d = _data(1)
    rb = O.RewardBatch(rewards=d["rewards"], mask=d["mask"], lengths=d["lengths"] + 20478)
    mine = O.compose(
        advantages=O.group_advantages(
            O.grpo_advantages, filter_zero_variance=True,
            reward_shaping=functools.partial(O.overlong_penalty, max_length=20480, buffer=4096)),
        surrogate=functools.partial(O.ppo_clip_loss, eps_low=0.2, eps_high=0.28, dual_clip=10.0),
        aggregation=O.token_mean)
    preset = presets.dapo()
    a1, a2 = mine.advantages(rb), preset.advantages(rb)
    np.testing.assert_allclose(a1.advantages, a2.advantages)
    batch = O.PolicyBatch(mask=a1.mask, old_logp=d["old"], advantages=a1.advantages)
    out = O.TokenOutputs(logp=d["logp"])
    assert float(preset.loss(out, batch, preset.init()).loss) == pytest.approx(
        float(mine.loss(out, batch, mine.init()).loss))


def test_gin_binds_preset_hyperparameters():
    d = _data(2)
    batch = O.PolicyBatch(mask=d["mask"], old_logp=d["old"], advantages=d["mask"])  # A = 1
    out = O.TokenOutputs(logp=d["old"] + jnp.log(1.4))  # every ratio 1.4

    def dapo_loss():
        obj = presets.dapo(overlong=False)
        return float(obj.loss(out, batch, obj.init()).loss)

    with gin.unlock_config():
        gin.parse_config(["rlx.objectives.dapo.eps_high = 0.5",
                          "rlx.objectives.grpo.kl_coef = 0.0"])
    try:
        assert dapo_loss() == pytest.approx(-1.4)  # not clipped at 1 + 0.5
        assert presets.grpo().init() == {}  # KL left out when its coefficient is 0
    finally:
        gin.clear_config()
    assert dapo_loss() == pytest.approx(-1.28)  # paper default ε_high = 0.28
    assert set(presets.grpo().init()) == {"kl"}


def test_ppo_needs_critic_values():
    d = _data(3)
    with pytest.raises(ValueError, match="RewardBatch.values"):
        presets.ppo().advantages(O.RewardBatch(rewards=d["rewards"], mask=d["mask"]))


def test_grpo_needs_reference_logps_for_its_kl():
    d = _data(4)
    obj = presets.grpo()
    batch = O.PolicyBatch(mask=d["mask"], old_logp=d["old"], advantages=jnp.zeros_like(d["old"]))
    with pytest.raises(ValueError, match="ref_logp"):
        obj.loss(O.TokenOutputs(logp=d["logp"]), batch, obj.init())


def _np_whiten(x, m):
    v = x[m > 0]
    return (x - v.mean()) / np.sqrt(max(v.var(), 1e-8)) * m


def test_ppo_advantages_are_gae_on_outcome_minus_kl_rewards():
    d = _data(5)
    beta, gamma, lam = 0.1, 0.9, 0.8
    obj = presets.ppo(kl_reward_coef=beta, gamma=gamma, lam=lam)
    kl = d["old"] - d["ref"]
    out = obj.advantages(O.RewardBatch(rewards=d["rewards"], mask=d["mask"], values=d["values"],
                                       kl=kl))
    m, v, R = (np.asarray(x, np.float64) for x in (d["mask"], d["values"], d["rewards"]))
    R = R.reshape(-1)
    adv = np.zeros_like(m)
    for i in range(B):
        n = int(m[i].sum())
        r = -beta * np.asarray(kl, np.float64)[i, :n]
        r[n - 1] += R[i]
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * nxt_v - v[i, t]
            adv[i, t] = nxt_a = delta + gamma * lam * nxt_a
            nxt_v = v[i, t]
    np.testing.assert_allclose(out.returns, (adv + v) * m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.advantages, _np_whiten(adv, m), rtol=1e-4, atol=1e-5)


def test_reinforce_pp_without_baseline_whitens_kl_shaped_returns():
    d = _data(6)
    obj = presets.reinforce_pp(baseline=False, kl_reward_coef=0.05, gamma=1.0)
    kl = np.asarray(d["old"] - d["ref"], np.float64)
    out = obj.advantages(O.RewardBatch(rewards=d["rewards"], mask=d["mask"], kl=jnp.asarray(kl)))
    m = np.asarray(d["mask"], np.float64)
    r = -0.05 * kl * m
    last = m.sum(-1).astype(int) - 1
    r[np.arange(B), last] += np.asarray(d["rewards"], np.float64).reshape(-1)
    ret = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * m
    np.testing.assert_allclose(out.advantages, _np_whiten(ret, m), rtol=1e-4, atol=1e-5)
    base = presets.reinforce_pp().advantages(O.RewardBatch(rewards=d["rewards"], mask=d["mask"]))
    R = np.asarray(d["rewards"], np.float64)
    r = np.zeros_like(m)
    r[np.arange(B), last] = (R - R.mean(1, keepdims=True)).reshape(-1)
    ret = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * m
    np.testing.assert_allclose(base.advantages, _np_whiten(ret, m), rtol=1e-4, atol=1e-5)
