"""The RL engine runs every objective rlx ships, as one compiled update per iteration.

Each test drives the real ``RLTrainer`` on a tiny model and observes the feature
acting inside the loop (not the objective function on its own).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import api, config
from rlx.objectives import advantages as adv_lib
from rlx.objectives import compose, group_advantages, presets, surrogates, token_mean
from rlx.rewards.pool import RewardResult
from rlx.sampling.config import SamplerConfig
from rlx.tasks import Problem
from rlx.train import optim, state as st
from rlx.train.data import ProblemStream
from rlx.train.rl import Critic, RLConfig, RLTrainer

from test_rl_loop import DigitTokenizer

G = 4
P = 4


class TwoPartPool:
    """Two reward components that vary within a group: parity of the completion's
    length and the share of digit '1' in it. Weighted total = c0 + 0.5 · c1."""

    weights = np.array([1.0, 0.5], np.float32)

    def __init__(self):
        self.calls = 0

    def score(self, completions, problems):
        self.calls += 1
        c = np.array([[float(len(t) % 2), t.count("1") / 4.0] for t in completions],
                     np.float32)
        return RewardResult(scores=c @ self.weights, components=c, names=("parity", "ones"),
                            failed=np.zeros(len(c), bool), failures=0, timeouts=0, errors=(),
                            seconds=0.0)


def _problems(n=12):
    return [Problem(prompt=f"{i % 10}{(3 * i) % 10}", answer="0", meta={}) for i in range(n)]


def _model():
    return api.init(config.model_config("tiny", vocab_size=13), seed=0)


def _trainer(tmp_path, objective, *, pool=None, problems=None, critic=False, seed=0,
             temperature=1.0, sampler_kw=None, **cfg):
    graphdef, params = _model()
    tx = optim.optimizer(learning_rate=3e-3)
    crit = None
    if critic:
        vgraph, vparams = api.init(config.model_config("tiny", vocab_size=13), kind="value",
                                   seed=1)
        ctx = optim.optimizer(learning_rate=3e-3)
        crit = Critic(graphdef=vgraph, tx=ctx, state=st.create(vparams, ctx, seed=1))
    cfg = {"steps": 2, "prompts_per_step": P, "checkpoint_every": None, **cfg}
    trainer = RLTrainer(
        graphdef=graphdef,
        state=st.create(params, tx, seed=seed, objective_state=objective.init()),
        tx=tx, objective=objective, tokenizer=DigitTokenizer(),
        stream=ProblemStream(problems or _problems(), seed=0), reward_pool=pool or TwoPartPool(),
        sampler=SamplerConfig(max_new_tokens=4, num_generations=G, stop_token_ids=(2,),
                              completion_buckets=(4,), temperature=temperature,
                              **(sampler_kw or {})),
        config=RLConfig(**cfg), run_dir=str(tmp_path), critic=crit)
    return trainer


def _params_changed(a, b):
    return any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


class Spy:
    """Records concrete values from inside the compiled update (jax.debug.callback)."""

    def __init__(self):
        self.seen = []

    def __call__(self, **arrays):
        jax.debug.callback(lambda **a: self.seen.append(
            {k: np.asarray(v) for k, v in a.items()}), **arrays)


def _check_gdpo(monkeypatch):
    shapes = []
    real = adv_lib.gdpo_advantages

    def recording(component_rewards, **kw):
        shapes.append(component_rewards.shape)
        return real(component_rewards, **kw)

    monkeypatch.setattr(adv_lib, "gdpo_advantages", recording)
    obj = presets.gdpo()

    def check(trainer, metrics):
        assert shapes and shapes[-1] == (P, G, 2), shapes      # K = 2 components

    return obj, {}, check


def _check_ppo(monkeypatch):
    spy = Spy()
    real = adv_lib.outcome_token_rewards
    beta = 0.5

    def recording(rewards, mask, *, kl=None, beta=0.0):
        out = real(rewards, mask, kl=kl, beta=beta)
        plain = real(rewards, mask)
        spy(shift=jnp.sum(out - plain), kl=jnp.sum(kl) if kl is not None else jnp.nan)
        return out

    monkeypatch.setattr(adv_lib, "outcome_token_rewards", recording)
    obj = presets.ppo(vf_coef=0.0, kl_reward_coef=beta)

    def check(trainer, metrics):
        assert len(spy.seen) == 2
        last = spy.seen[-1]        # iteration 2: the policy has moved from the reference
        assert abs(float(last["kl"])) > 0
        np.testing.assert_allclose(last["shift"], -beta * last["kl"], rtol=1e-4, atol=1e-7)
        assert "critic/old_value_mean" in metrics and "value_loss" in metrics

    return obj, {"critic": True}, check


def _check_state_changed(key_fn):
    def check(trainer, metrics, init=None):
        before = key_fn(trainer.initial_objective_state)
        after = key_fn(jax.device_get(trainer.state.objective_state))
        assert not np.allclose(before, after), (before, after)
    return check


def _bapo_check(trainer, metrics):
    for k in ("surrogate/bapo/c_low", "surrogate/bapo/c_high", "bapo/c_low", "bapo/c_high"):
        if k in metrics:
            break
    else:
        raise AssertionError(f"no BAPO bound metric in {sorted(metrics)}")
    lo = metrics.get("bapo/c_low", metrics.get("surrogate/bapo/c_low"))
    assert 0.6 <= lo <= 0.9


def _finite_loss_check(*required):
    def check(trainer, metrics):
        for k in ("loss", *required):
            assert k in metrics and np.isfinite(metrics[k]), k
    return check


CASES = {
    "grpo": lambda mp: (presets.grpo(), {}, _finite_loss_check("kl/mean")),
    "dr_grpo": lambda mp: (presets.dr_grpo(max_length=4), {}, _finite_loss_check()),
    "dapo": lambda mp: (presets.dapo(max_length=4, overlong_buffer=2), {"dynamic_sampling": True},
                        _finite_loss_check("adv/kept_groups", "dynamic_sampling/rounds")),
    "gspo": lambda mp: (presets.gspo(), {}, _finite_loss_check()),
    "cispo": lambda mp: (presets.cispo(), {}, _finite_loss_check()),
    "rloo": lambda mp: (presets.rloo(), {}, _finite_loss_check()),
    "reinforce_pp": lambda mp: (presets.reinforce_pp(), {}, _finite_loss_check("kl/mean")),
    "ppo": _check_ppo,
    "bnpo": lambda mp: (presets.bnpo(momentum=0.5), {},
                        _check_state_changed(lambda s: np.asarray(s["advantages"].count))),
    "gdpo": _check_gdpo,
    "bapo": lambda mp: (presets.bapo(), {}, _bapo_check),
    "r2vpo": lambda mp: (presets.r2vpo(), {"minibatches": 2},
                         _check_state_changed(lambda s: np.asarray(jax.tree.leaves(s)[0]))),
    "sapo": lambda mp: (presets.sapo(), {}, _finite_loss_check()),
    "gmpo": lambda mp: (presets.gmpo(), {}, _finite_loss_check()),
    "d3s": lambda mp: (presets.d3s(total_iterations=2), {},
                       _finite_loss_check("d3s/kept_rows", "selection/kept_tokens")),
    "forking_tokens": lambda mp: (presets.forking_tokens(), {},
                                  _finite_loss_check("selection/kept_tokens")),
}


def test_every_preset_has_a_loop_case():
    assert set(CASES) == set(presets.PRESETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_preset_runs_two_iterations_and_its_feature_acts(name, tmp_path, monkeypatch):
    obj, kw, check = CASES[name](monkeypatch)
    trainer = _trainer(tmp_path, obj, **kw)
    trainer.initial_objective_state = jax.device_get(trainer.state.objective_state)
    start = jax.device_get(trainer.state.params)
    metrics = [trainer.iteration() for _ in range(2)]
    assert _params_changed(start, trainer.state.params)
    check(trainer, metrics[-1])
    trainer.close()


def test_d3s_keeps_the_scheduled_number_of_rows(tmp_path):
    trainer = _trainer(tmp_path, presets.d3s(total_iterations=2, sample_frac_init=0.5))
    m0 = trainer.iteration()
    m1 = trainer.iteration()
    assert m0["d3s/kept_rows"] == pytest.approx(0.5)      # N_s(0) = 0.5 · P·G rows
    assert m1["d3s/kept_rows"] == pytest.approx(0.75)     # halfway to 1.0
    assert m0["selection/kept_tokens"] < m1["selection/kept_tokens"] <= 1.0
    trainer.close()


def test_is_correction_weights_differ_from_one_under_a_temperature_mismatch(tmp_path):
    def objective():
        return compose(
            advantages=group_advantages(adv_lib.grpo_advantages),
            surrogate=functools.partial(surrogates.ppo_clip_loss, eps_low=0.2),
            aggregation=token_mean,
            is_correction=functools.partial(surrogates.truncated_is_weights, cap=2.0))

    matched = _trainer(tmp_path / "a", objective(), temperature=0.7)
    m = matched.iteration()
    assert m["is/mean_weight"] == pytest.approx(1.0, abs=1e-4)   # trainer scores at τ
    matched.close()
    mismatched = _trainer(tmp_path / "b", objective(), temperature=0.7, logprob_temperature=1.0)
    m = mismatched.iteration()
    assert abs(m["is/mean_weight"] - 1.0) > 1e-3
    mismatched.close()



def test_first_on_policy_ratio_is_one_at_a_sampling_temperature_below_one(tmp_path):
    trainer = _trainer(tmp_path, presets.grpo(kl_coef=0.0), temperature=0.6,
                       recompute_old_logp=True)
    m = trainer.iteration()
    assert m["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["ratio/max"] == pytest.approx(1.0, abs=1e-4)
    trainer.close()


def test_skipped_old_forward_gives_the_parameters_of_the_two_pass_path(tmp_path):
    one = _trainer(tmp_path / "one", presets.grpo())
    two = _trainer(tmp_path / "two", presets.grpo(), recompute_old_logp=True)
    for t in (one, two):
        t.iteration()
    for a, b in zip(jax.tree.leaves(jax.device_get(one.state.params)),
                    jax.tree.leaves(jax.device_get(two.state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert _params_changed(one.state.params, jax.device_get(
        api.init(config.model_config("tiny", vocab_size=13), seed=0)[1]))
    one.close()
    two.close()


def test_minibatch_metrics_describe_every_optimizer_step(tmp_path):
    trainer = _trainer(tmp_path, presets.rloo(), minibatches=2, epochs=2)
    seen = {}
    real = trainer.iteration_batch

    def recording(got):
        batch = real(got)
        seen["tokens"] = float(np.asarray(jax.device_get(batch.mask)).sum())
        return batch

    trainer.iteration_batch = recording
    m = trainer.iteration()
    assert m["update/optimizer_steps"] == 4
    # token-mean denominators: each epoch's minibatches split the batch's tokens
    assert m["loss_tokens"] * 2 == pytest.approx(seen["tokens"])
    assert "loss/last" in m and "grad_norm/last" in m
    trainer.close()


class ScriptedStream:
    """Fixed batches per call; only the prompts starting with '1' are informative."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self, n):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


class PrefixPool:
    """Mixed rewards for prompts starting with '1', all-zero otherwise."""

    def score(self, completions, problems):
        s = np.array([float(p.prompt.startswith("1") and i % 2 == 0)
                      for i, p in enumerate(problems)], np.float32)
        return RewardResult(scores=s, components=s[:, None], names=("p",),
                            failed=np.zeros(len(s), bool), failures=0, timeouts=0, errors=(),
                            seconds=0.0)


def test_dynamic_sampling_refills_groups_across_prompt_buckets(tmp_path):
    short_good, short_bad = Problem("12", "0", {}), Problem("23", "0", {})
    long_good = Problem("1" + "5" * 20, "0", {})     # 22 tokens with BOS: bucket 32
    long_bad = Problem("2" + "5" * 20, "0", {})
    stream = ScriptedStream([[short_good, long_bad], [long_good, short_bad]])
    trainer = _trainer(tmp_path, presets.dapo(max_length=4, overlong_buffer=2),
                       pool=PrefixPool(), prompts_per_step=2, dynamic_sampling=True)
    trainer.stream = stream
    got = trainer.collect(trainer.sampling_key())
    assert [q.prompt for q in got.problems] == [short_good.prompt, long_good.prompt]
    assert got.rollout.prompt_ids.shape[1] == 32
    # the short prompt keeps its tokens, left-padded into the longer bucket
    row = np.asarray(got.rollout.prompt_ids[0])[np.asarray(got.rollout.prompt_mask[0])]
    assert row.tolist() == [1, 4, 5]
    stream.i = 0
    m = trainer.iteration()
    assert m["dynamic_sampling/kept_groups"] == 2 and np.isfinite(m["loss"])
    trainer.close()


def test_forced_completion_prefix_from_the_record_is_fed_and_masked(tmp_path):
    problems = [Problem(f"{i}{i}", "0", {"completion_prefix": "77"}) for i in range(4)]
    trainer = _trainer(tmp_path, presets.grpo(kl_coef=0.0), problems=problems)
    got = trainer.collect(trainer.sampling_key())
    ids = np.asarray(got.rollout.completion_ids)
    assert (ids[:, :2] == 10).all()                  # '7' -> id 10, fed to every row
    batch = trainer.iteration_batch(got)
    mask = np.asarray(jax.device_get(batch.mask))
    assert not mask[:, :2].any()                     # forced tokens leave the loss
    trainer.close()


def test_one_seed_drives_sampling_through_the_train_state_key(tmp_path):
    a = _trainer(tmp_path / "a", presets.grpo(kl_coef=0.0), seed=3)
    b = _trainer(tmp_path / "b", presets.grpo(kl_coef=0.0), seed=3)
    c = _trainer(tmp_path / "c", presets.grpo(kl_coef=0.0), seed=4)
    ids = [np.asarray(t.collect(t.sampling_key()).rollout.completion_ids) for t in (a, b, c)]
    np.testing.assert_array_equal(ids[0], ids[1])
    assert not np.array_equal(ids[0], ids[2])
    with pytest.raises(TypeError):
        RLConfig(seed=0)
    for t in (a, b, c):
        t.close()


def test_no_recompilation_after_the_first_iteration(tmp_path):
    from jax import monitoring

    trainer = _trainer(tmp_path, presets.grpo(), steps=3)
    trainer.iteration()
    count = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            count.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        trainer.iteration()
        trainer.iteration()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert count == [] and trainer.compilations == 1
    trainer.close()


def test_values_without_a_critic_fail_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="critic"):
        _trainer(tmp_path, presets.ppo(vf_coef=0.0))


@pytest.mark.parametrize("field,value", [("steps", -1), ("epochs", 0), ("minibatches", 0),
                                         ("steps", "3"), ("keep_checkpoints", 0),
                                         ("prompts_per_step", 3)])
def test_bad_loop_sizes_are_refused_naming_the_field(field, value):
    kw = {field: value}
    if field == "prompts_per_step":
        kw["minibatches"] = 2
    with pytest.raises(ValueError, match=f"RLConfig.{field}"):
        RLConfig(**kw)


def test_skipped_old_forward_is_not_compiled_into_the_update(tmp_path):
    from rlx.train import update as update_lib

    flops = {}
    for rec in (False, True):        # grpo has a KL loss: the reference pass stays
        t = _trainer(tmp_path / str(rec), presets.grpo(), recompute_old_logp=rec)
        batch = t.iteration_batch(t.collect(t.sampling_key()))
        fn = update_lib.jit_update(t._update_fn, t.mesh, t.state_shardings,
                                   t.critic_shardings, t.ref_shardings, batch)
        cost = fn.lower(t.state, None, t.ref_params, batch).compile().cost_analysis()
        flops[rec] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        t.close()
    # one forward of the three (old, reference, update fwd+bwd ≈ 3) is gone
    assert flops[False] < 0.9 * flops[True], flops
