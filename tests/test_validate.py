"""Every bad size, count, rate, path and name of a run is refused when the configuration
is built: one error naming the binding and the value, before the run directory (or a
tokenizer, an SFT step, a compilation) exists."""

import os

import gin
import pytest

from rlx import cli
from rlx.recipes import validate
from rlx.recipes.experiment import Experiment
from rlx.recipes.rlhf import DPOExperiment, RLHFExperiment


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


BAD = [  # (binding, text the error must contain)
    ("rlx.train.RLConfig.steps = -1", "RLConfig.steps=-1"),
    ('rlx.train.RLConfig.steps = "3"', "RLConfig.steps='3'"),
    ("rlx.train.RLConfig.keep_checkpoints = 0", "RLConfig.keep_checkpoints=0"),
    ("rlx.train.RLConfig.epochs = 0", "RLConfig.epochs=0"),
    ("rlx.train.RLConfig.minibatches = 0", "RLConfig.minibatches=0"),
    ("rlx.Experiment.sft_steps = -5", "rlx.Experiment.sft_steps=-5"),
    ("rlx.Experiment.eval_problems = 0", "rlx.Experiment.eval_problems=0"),
    ("rlx.Experiment.rl_lr = -0.0001", "rlx.Experiment.rl_lr=-0.0001"),
    ("rlx.Experiment.sft_lr = 0.0", "rlx.Experiment.sft_lr=0.0"),
    ('rlx.Experiment.critic_lr = "fast"', "rlx.Experiment.critic_lr='fast'"),
    ("rlx.Experiment.num_generations = 0", "rlx.Experiment.num_generations=0"),
    ("rlx.Experiment.sft_batch = 2.5", "rlx.Experiment.sft_batch=2.5"),
    ("rlx.Experiment.train_problems = True", "rlx.Experiment.train_problems=True"),
    ("rlx.Experiment.temperature = -1.0", "rlx.Experiment.temperature=-1.0"),
    ("rlx.Experiment.mesh_shape = (2, 0, 1)", "rlx.Experiment.mesh_shape=(2, 0, 1)"),
    ('rlx.Experiment.hf_checkpoint = "/no/such/folder"', "no such folder"),
    ('rlx.Experiment.data_file = "/no/such/file.jsonl"', "rlx.Experiment.data_file="),
    ('rlx.Experiment.tokenizer = "/no/tok.model"', "rlx.Experiment.tokenizer="),
    ('rlx.Experiment.objective = "grpoo"', "unknown objective 'grpoo'"),
    ('rlx.Experiment.task = "chess"', "unknown task name 'chess'"),
    ('rlx.Experiment.rewards = ("no_such_reward",)', "rlx.Experiment.rewards='no_such_reward'"),
    ('rlx.Experiment.rewards = "format"', "must be a tuple of reward names"),
    ('rlx.Experiment.model = "huge"', "rlx.Experiment.model='huge': unknown preset"),
    ("rlx.train.PhaseCheckpoints.keep = 0", "PhaseCheckpoints.keep=0"),
    ("rlx.train.optimizer.weight_decay = -0.1", "rlx.train.optimizer.weight_decay=-0.1"),
    ("rlx.train.optimizer.b2 = 1.5", "rlx.train.optimizer.b2=1.5"),
]


@pytest.mark.parametrize("binding, text", BAD, ids=[b for b, _ in BAD])
def test_bad_setting_is_refused_naming_binding_and_value_before_anything_exists(
        tmp_path, capsys, binding, text):
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--gin_param", binding,
                     "--gin_param", f'rlx.Experiment.run_dir = "{run_dir}"'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rlx: error:") and text in err, err
    assert "Traceback" not in err
    assert not run_dir.exists()                       # no tokenizer, no SFT, no config


def test_every_bad_setting_is_listed_in_one_error():
    with pytest.raises(ValueError) as err:
        validate.check(Experiment(sft_steps=-5, eval_problems=0, rl_lr=-1.0, run_dir="r"))
    text = str(err.value)
    for part in ("sft_steps=-5", "eval_problems=0", "rl_lr=-1.0"):
        assert part in text
    assert len(text.splitlines()) == 4


def test_a_checkpoint_folder_without_config_json_is_named(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ValueError, match=r"hf_checkpoint=.*has no config.json"):
        validate.check(Experiment(hf_checkpoint=str(tmp_path / "hf"), run_dir=str(tmp_path)))


def test_a_run_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"run_dir=.*exists and is not a directory"):
        validate.check(Experiment(run_dir=str(tmp_path / "f")))


def test_the_default_experiment_is_valid():
    validate.check(Experiment())
    validate.check(RLHFExperiment())
    validate.check(DPOExperiment())


@pytest.mark.parametrize("kind, binding, text", [
    ("rlhf", "rlx.RLHFExperiment.rm_steps = 0", "rlx.RLHFExperiment.rm_steps=0"),
    ("rlhf", "rlx.RLHFExperiment.rm_lr = -1.0", "rlx.RLHFExperiment.rm_lr=-1.0"),
    ("rlhf", 'rlx.RLHFExperiment.reward_normalize = "zscore"', "reward_normalize='zscore'"),
    ("rlhf", 'rlx.RLHFExperiment.corruptions = ("offset", "typo")', "corruptions='typo'"),
    ("rlhf", 'rlx.RLHFExperiment.preference_file = "/no/pairs.jsonl"', "preference_file="),
    ("dpo", "rlx.DPOExperiment.dpo_steps = -2", "rlx.DPOExperiment.dpo_steps=-2"),
    ("dpo", 'rlx.DPOExperiment.loss = "kto"', "rlx.DPOExperiment.loss='kto'"),
    ("dpo", "rlx.DPOExperiment.beta = 0.0", "rlx.DPOExperiment.beta=0.0"),
    ("dpo", "rlx.DPOExperiment.eval_pairs = 0", "rlx.DPOExperiment.eval_pairs=0"),
    ("dpo", "rlx.Experiment.sft_steps = -1", "rlx.Experiment.sft_steps=-1"),
])
def test_preference_settings_are_checked_before_anything_exists(tmp_path, capsys, kind,
                                                                binding, text):
    run_dir = tmp_path / "run"
    code = cli.main([kind, "--gin_param", binding,
                     "--gin_param", f'rlx.Experiment.run_dir = "{run_dir}"'])
    err = capsys.readouterr().err
    assert code == 2 and text in err, err
    assert not run_dir.exists()


def test_plan_runs_the_checks_for_recipes_called_from_python(tmp_path):
    from rlx.recipes import prepare
    with pytest.raises(ValueError, match="rlx.Experiment.eval_problems=0"):
        prepare.plan(Experiment(eval_problems=0, run_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_python_m_rlx_cli_train_works(tmp_path):
    """``python -m rlx.cli train`` runs the train command (here: refusing a bad value,
    which it reports without a traceback, exit code 2)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "rlx.cli", "train", "--gin_param",
                          "rlx.Experiment.sft_steps = -5", "--gin_param",
                          f'rlx.Experiment.run_dir = "{tmp_path / "run"}"'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("rlx: error: bad settings") and "Traceback" not in out.stderr
    assert "rlx.Experiment.sft_steps=-5" in out.stderr
    assert "kernels:" in out.stdout               # the train command itself ran
