"""Smoke runs of the RLHF and DPO experiments (tiny sizes), their CLI and configs."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from rlx import cli

TINY = [
    'rlx.Experiment.model = "tiny"',
    'rlx.Experiment.model_overrides = {"num_layers": 1}',
    "rlx.Experiment.train_problems = 120",
    "rlx.Experiment.eval_problems = 8",
    "rlx.Experiment.sft_steps = 3",
    "rlx.Experiment.sft_batch = 8",
    "rlx.Experiment.num_generations = 4",
    "rlx.Experiment.max_new_tokens = 4",
    "rlx.Experiment.export_hf = False",
    "rlx.train.RLConfig.steps = 2",
    "rlx.train.RLConfig.prompts_per_step = 4",
    "rlx.train.RLConfig.eval_every = 0",
    "rlx.train.RLConfig.checkpoint_every = 1",
    "rlx.train.RLConfig.log_samples_every = 0",
]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_rlhf_smoke_run_trains_reward_model_then_rl_against_it(tmp_path, capsys):
    run_dir = str(tmp_path / "rlhf")
    params = TINY + [f'rlx.Experiment.run_dir = "{run_dir}"',
                     "rlx.RLHFExperiment.preference_problems = 40",
                     "rlx.RLHFExperiment.eval_pairs = 8",
                     "rlx.RLHFExperiment.rm_steps = 3",
                     "rlx.RLHFExperiment.rm_batch = 8"]
    summary = cli.preference_main("rlhf", gin_params=params)
    for name in ("summary.json", "operative_config.gin", "metrics.jsonl",
                 "reward_model", "checkpoints"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    rl_rows = [r for r in _rows(run_dir) if r["step"] > 0]
    assert [r["step"] for r in rl_rows] == [1, 2]
    # RL optimised the learned reward; the verifier only watched.
    assert all("reward/learned" in r and "reward/verifiable/mean" in r and "loss" in r
               for r in rl_rows)
    assert any("rm_loss" in r for r in _rows(run_dir) if r["step"] <= 0)
    assert 0.0 <= summary["rm_accuracy"] <= 1.0 and summary["rm_train_pairs"] >= 40
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0
    assert "reward model" in capsys.readouterr().out



def test_saved_phase_results_are_reused_by_the_same_command(tmp_path):
    from rlx.recipes import prepare

    calls = []
    params = {"w": np.arange(3, dtype=np.float32)}

    def compute():
        calls.append(1)
        return {"w": params["w"] + 1}, {"rm/accuracy": 0.75}

    first = prepare.cached(str(tmp_path / "rm"), params, compute, step=5)
    again = prepare.cached(str(tmp_path / "rm"), params, compute, step=5)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(again[0]["w"]), [1, 2, 3])
    assert first[1] == again[1] == {"rm/accuracy": 0.75}
    skipped = prepare.cached(str(tmp_path / "none"), params, compute, skip=True)
    assert skipped == (params, {}) and len(calls) == 1


def test_dpo_smoke_run_reports_accuracy_before_and_after(tmp_path):
    run_dir = str(tmp_path / "dpo")
    params = TINY + [f'rlx.Experiment.run_dir = "{run_dir}"',
                     "rlx.DPOExperiment.preference_problems = 40",
                     "rlx.DPOExperiment.eval_pairs = 8",
                     "rlx.DPOExperiment.dpo_steps = 3",
                     "rlx.DPOExperiment.dpo_batch = 8"]
    summary = cli.preference_main("dpo", gin_params=params)
    assert os.path.exists(os.path.join(run_dir, "dpo"))
    assert os.path.exists(os.path.join(run_dir, "summary.json"))
    dpo_rows = [r for r in _rows(run_dir) if "pref_loss" in r]
    assert [r["step"] for r in dpo_rows] == [3]
    for key in ("accuracy_before_dpo", "accuracy_after_dpo", "pref_accuracy",
                "pref_logp_accuracy_before"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["pref_accuracy_before"] == 0.0   # h ≡ 0 while policy = reference


def test_user_preference_file_replaces_synthetic_pairs(tmp_path):
    from rlx.recipes import rlhf
    parse_config = cli.parse_config

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1),
                                         "rejected": str(a + 2)}) + "\n" for a in range(5)))
    parse_config([], TINY + [f'rlx.DPOExperiment.preference_file = "{pairs}"',
                             "rlx.DPOExperiment.eval_pairs = 2"])
    exp = rlhf.DPOExperiment()
    assert exp.base.model == "tiny" and exp.preference_file == str(pairs)

    class Tok:   # character-level stand-in: the pair layout only needs encode/ids
        bos_id, eos_id, pad_id = 1, 2, 0

        def encode(self, text):
            return [3 + ord(c) % 50 for c in text]

    class P:
        tok = Tok()

    train, heldout = rlhf.preference_pairs(exp, P())
    assert train.chosen.tokens.shape[0] == 3 and heldout.chosen.tokens.shape[0] == 2
    with pytest.raises(ValueError, match="need more than eval_pairs=9"):
        rlhf.preference_pairs(rlhf.DPOExperiment(preference_file=str(pairs), eval_pairs=9), P())


@pytest.mark.parametrize("kind", ["rlhf", "dpo"])
def test_configs_parse_and_cli_registers_commands(kind):
    from rlx.recipes import rlhf
    parse_config = cli.parse_config

    here = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
    parse_config([os.path.join(here, f"{kind}.gin")])
    exp = rlhf.RLHFExperiment() if kind == "rlhf" else rlhf.DPOExperiment()
    assert exp.base.run_dir == f"runs/{kind}"
    assert kind in cli.commands()
    with pytest.raises(SystemExit) as err:
        cli.main([kind, "--help"])
    assert err.value.code == 0


def test_ppo_option_gets_a_critic_from_the_sft_trunk():
    from rlx.models import api
    from rlx.models.config import model_config
    from rlx.recipes import prepare
    from rlx.recipes.components import resolve_objective
    from rlx.recipes.experiment import Experiment

    assert resolve_objective("ppo").separate_critic
    assert not resolve_objective("grpo").separate_critic
    cfg = model_config("tiny", vocab_size=32, num_layers=1)
    _, params = api.init(cfg, seed=5)
    critic = prepare.make_critic(Experiment(objective="ppo"), cfg, params)
    assert critic.graphdef is not None
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), critic.state.params["trunk"],
                        params["trunk"])
    assert all(jax.tree.leaves(same))


def test_unknown_preference_binding_fails_before_anything_runs():
    with pytest.raises(ValueError, match="rm_stepz"):
        cli.preference_main("rlhf", gin_params=["rlx.RLHFExperiment.rm_stepz = 3"])
