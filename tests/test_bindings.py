"""No silent settings: every shipped binding and every documented configurable
parameter either takes effect on the object the recipe builds, or the run refuses it
before anything is written, trained or compiled."""

import dataclasses
import os

import gin
import gin.config as gin_config
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import cli
from rlx import sharding as sh
from rlx.recipes import prepare
from rlx.recipes.experiment import Experiment, run
from rlx.tasks import ArithmeticTask

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
SHIPPED = sorted(f[:-4] for f in os.listdir(CONFIGS) if f.endswith(".gin"))
SMALL = ["rlx.Experiment.train_problems = 40", "rlx.Experiment.eval_problems = 8",
         'rlx.rewards.RewardPool.backend = "inline"']


class Tok:
    """The tokenizer facts the sampler is built from."""
    eos_id, pad_id, bos_id, vocab_size = 2, 0, 1, 64
    stop_ids = (2, 5)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def build(params=(), files=(), kind="train"):
    """Parses, then builds everything a run constructs before its first compilation:
    the experiment, the plan (objective, task, problems, reward spec, mesh), sampler,
    reward pool, RL optimizer, model config and partition rules."""
    gin.clear_config()
    cli.parse_config(list(files), list(params))
    if kind == "train":
        exp = Experiment()
    else:
        from rlx.recipes import rlhf
        exp = (rlhf.RLHFExperiment() if kind == "rlhf" else rlhf.DPOExperiment()).base
    planned = prepare.plan(exp)
    pool = prepare.RewardPool(planned.spec)
    pool.close()
    built = dict(exp=exp, plan=planned, sampler=prepare.make_sampler(exp, Tok()), pool=pool,
                 tx=prepare.rl_optimizer(exp), rules=sh.partition_rules())
    if not exp.hf_checkpoint:
        built["model"] = prepare.model_config_for(exp, Tok.vocab_size)
    return built


def first_update(tx, grads):
    params = {"w": jnp.ones((3,))}
    updates, _ = tx.update({"w": jnp.asarray(grads, jnp.float32)}, tx.init(params), params)
    return np.asarray(updates["w"])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_binding_of_a_shipped_config_is_operative(name):
    path = os.path.join(CONFIGS, f"{name}.gin")
    kind = "rlhf" if name == "rlhf" else "dpo" if name == "dpo" else "train"
    build(SMALL, [path], kind)
    bound = {(scope, sel, p) for (scope, sel), ps in gin_config._CONFIG.items() for p in ps}
    used = {(scope, sel, p) for (scope, sel), ps in gin_config._OPERATIVE_CONFIG.items()
            for p in ps}
    assert bound and bound <= used, sorted(bound - used)


# (binding, what the built objects show when it took effect)
TAKES_EFFECT = [
    ('rlx.Experiment.objective = "dapo"', lambda b: b["plan"].objective.label == "dapo"),
    ("rlx.Experiment.num_generations = 3", lambda b: b["sampler"].num_generations == 3),
    ("rlx.Experiment.max_new_tokens = 12", lambda b: b["sampler"].max_new_tokens == 12
     and 12 in b["sampler"].completion_buckets),
    ("rlx.Experiment.temperature = 0.7", lambda b: b["sampler"].temperature == 0.7),
    ("rlx.Experiment.seed = 3", lambda b: b["plan"].train == ArithmeticTask(
        **prepare.DEFAULT_TASK_KWARGS).train(40, seed=3)),
    ('rlx.Experiment.rewards = ("numeric_exact_match", "format")',
     lambda b: b["plan"].spec.names == ("numeric_exact_match", "format")),
    ('rlx.Experiment.task = "sorting"', lambda b: b["plan"].task.name == "sorting"),
    ('rlx.Experiment.model_overrides = {"num_layers": 1}', lambda b: b["model"].num_layers == 1),
    ("rlx.train.RLConfig.minibatches = 2", lambda b: b["exp"].rl.minibatches == 2),
    ("rlx.train.RLConfig.steps = 7", lambda b: b["exp"].rl.steps == 7),
    ("SamplerConfig.top_k = 5", lambda b: b["sampler"].top_k == 5),
    ("SamplerConfig.top_p = 0.9", lambda b: b["sampler"].top_p == 0.9),
    ("SamplerConfig.stop_token_ids = (9,)", lambda b: b["sampler"].stop_token_ids == (2, 5, 9)),
    ('SamplerConfig.prefix_cache = "repeat"', lambda b: b["sampler"].prefix_cache == "repeat"),
    ('rlx.rewards.RewardPool.backend = "thread"', lambda b: b["pool"].backend == "thread"),
    ("rlx.rewards.RewardPool.timeout_s = 2.5", lambda b: b["pool"].timeout_s == 2.5),
    ("rlx.tasks.ArithmeticTask.heldout_fraction = 0.2",
     lambda b: b["plan"].task.heldout_fraction == 0.2),
    ("rlx.models.config.model_config.num_layers = 1", lambda b: b["model"].num_layers == 1),
]


@pytest.mark.parametrize("binding, took_effect", TAKES_EFFECT, ids=[t[0] for t in TAKES_EFFECT])
def test_documented_binding_takes_effect_on_the_built_object(binding, took_effect):
    built = build(SMALL + [binding])
    assert took_effect(built)
    assert not took_effect(build(SMALL))      # ... and the default differs


def test_mesh_shape_reaches_the_mesh():
    with pytest.raises(ValueError, match=r"mesh shape \(2, 1, 1\) needs 2 devices"):
        build(SMALL + ["rlx.Experiment.mesh_shape = (2, 1, 1)"])
    assert dict(build(SMALL + ["rlx.Experiment.mesh_shape = (-1, 1, 1)"])["plan"].mesh.shape) \
        == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}


def test_objective_preset_bindings_reach_the_objective():
    build(SMALL + ['rlx.Experiment.objective = "dapo"', "rlx.objectives.dapo.eps_high = 0.31"])
    assert gin_config._OPERATIVE_CONFIG[("", "rlx.objectives.dapo")]["eps_high"] == 0.31


def test_reward_spec_weights_apply_to_the_listed_rewards():
    spec = build(SMALL + ['rlx.Experiment.rewards = ("numeric_exact_match", "format")',
                          "rlx.rewards.reward_spec.weights = (1.0, 0.25)"])["plan"].spec
    np.testing.assert_array_equal(spec.weights, [1.0, 0.25])


def test_rl_learning_rate_and_adamw_settings_reach_the_rl_optimizer():
    # Adam's first step moves every parameter by lr (sign of the gradient).
    step = first_update(build(SMALL + ["rlx.Experiment.rl_lr = 0.5"])["tx"], [1.0, -2.0, 3.0])
    np.testing.assert_allclose(step, [-0.5, 0.5, -0.5], rtol=1e-5)
    # With a zero gradient only weight decay moves the parameters: -lr * wd * w.
    tx = build(SMALL + ["rlx.Experiment.rl_lr = 0.5",
                        "rlx.train.optimizer.weight_decay = 0.1"])["tx"]
    np.testing.assert_allclose(first_update(tx, [0.0, 0.0, 0.0]), [-0.05] * 3, rtol=1e-5)
    assert np.all(first_update(build(SMALL)["tx"], [0.0, 0.0, 0.0]) == 0)


def test_partition_rules_from_gin_change_the_state_shardings():
    from rlx.models import api
    from rlx.models.config import model_config

    _, params = api.init(model_config("tiny", vocab_size=32, num_layers=1), seed=0)
    mesh = sh.make_mesh()

    def embed_spec():
        found = []
        jax.tree_util.tree_map_with_path(
            lambda path, s: found.append(s.spec)
            if sh.path_string(path).startswith("trunk/embed/embedding") else None,
            sh.state_shardings(params, mesh))
        (spec,) = found
        return spec

    assert tuple(embed_spec()) == ("tensor", "fsdp")
    rules = build(SMALL + ['rlx.sharding.partition_rules.extra = '
                           '(("embed/embedding$", (None, "tensor")),)'])["rules"]
    assert rules[0] == ("embed/embedding$", (None, "tensor"))
    assert tuple(embed_spec()) == (None, "tensor")


# (binding, the owner the error must name)
REFUSED = [
    ("rlx.train.optimizer.learning_rate = 0.1", "rlx.Experiment.rl_lr"),
    ('rlx.train.optimizer.schedule = "cosine"', "schedule"),
    ("rlx.train.optimizer.warmup_steps = 5", "schedule"),
    ("SamplerConfig.temperature = 0.5", "rlx.Experiment.temperature"),
    ("SamplerConfig.num_generations = 2", "rlx.Experiment.num_generations"),
    ("SamplerConfig.max_new_tokens = 9", "rlx.Experiment.max_new_tokens"),
    ("SamplerConfig.pad_id = 3", "pad id"),
    ("rlx.rewards.reward_spec.weights = (0.5,)", "rlx.Experiment.rewards is empty"),
    ('rlx.tasks.get_task.name = "countdown"', "rlx.Experiment.task"),
    ("rlx.tasks.ArithmeticTask.digits = 3", "rlx.Experiment.task_kwargs"),
    ('rlx.models.config.model_config.preset = "tiny"', "rlx.Experiment.model"),
    ("rlx.models.config.model_config.vocab_size = 99", "vocabulary size"),
    ("rlx.data.records_dataset.shuffle = False", "rlx.Experiment.data_file"),
]


@pytest.mark.parametrize("binding, owner", REFUSED, ids=[r[0] for r in REFUSED])
def test_binding_the_recipe_would_ignore_fails_before_anything_is_written(tmp_path, binding,
                                                                          owner):
    run_dir = tmp_path / "run"
    cli.parse_config([], [binding, f'rlx.Experiment.run_dir = "{run_dir}"'])
    with pytest.raises(ValueError, match="set by the recipe") as err:
        run(Experiment())
    assert binding.split(" = ")[0].split(".")[-1] in str(err.value) and owner in str(err.value)
    assert not run_dir.exists()


@pytest.mark.parametrize("params, owner", [
    (['rlx.Experiment.rewards = ("numeric_exact_match",)',
      'rlx.rewards.reward_spec.names = ("format",)'], "rlx.Experiment.rewards"),
    (['rlx.Experiment.objective = "ppo"', "rlx.objectives.ppo.vf_coef = 0.5"], "critic"),
    (['rlx.Experiment.model_overrides = {"num_layers": 1}',
      "rlx.models.config.model_config.num_layers = 2"], "model_overrides"),
    (['rlx.Experiment.hf_checkpoint = "/nowhere"',
      "rlx.models.config.model_config.num_layers = 2"], "hf_checkpoint"),
])
def test_mode_dependent_owners_refuse_the_shadowed_binding(params, owner):
    cli.parse_config([], params)
    with pytest.raises(ValueError, match=owner):
        prepare.plan(Experiment())


def test_python_built_sampler_fields_the_experiment_owns_are_refused():
    from rlx.sampling.config import SamplerConfig
    exp = Experiment(sampler=SamplerConfig(temperature=0.5, top_k=3), train_problems=40)
    with pytest.raises(ValueError, match=r"sampler.temperature=0.5.*rlx.Experiment.temperature"):
        prepare.plan(exp)
    assert prepare.make_sampler(dataclasses.replace(exp, sampler=SamplerConfig(top_k=3)),
                                Tok()).top_k == 3


@pytest.mark.parametrize("binding", ["make_mesh.shape = (1, 1, 1)", "rlx.train.RLConfig.seed = 1",
                                     "rlx.train.optim.optimizer.learning_rate = 0.1"])
def test_names_that_configure_nothing_fail_at_parse_time(binding):
    with pytest.raises(ValueError, match="bad gin configuration"):
        cli.parse_config([], [binding])


def test_bad_partition_rule_is_named():
    with pytest.raises(ValueError, match=r"extra\[0\].*'model'"):
        sh.partition_rules(extra=(("embed", ("model",)),))
    with pytest.raises(ValueError, match=r"rules\[1\]: bad path regex"):
        sh.partition_rules(rules=(("a", ()), ("(", ())))
    assert sh.partition_rules() == sh.PARAM_RULES
