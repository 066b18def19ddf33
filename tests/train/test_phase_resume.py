"""Every phase resumes after a real kill: a run stopped (SIGKILL, SIGTERM or SIGINT) in
the SFT warm-up, the reward model, DPO or the RL phase with its critic, then started
again with the same command, continues from the phase's last save and ends bitwise
where an uninterrupted run ends (every saved array: parameters, optimizer state, step,
key; and every logged loss).

The runs go through the console entry (``scripts/phase_run.py`` calls ``rlx.cli.main``)
with tiny sizes; its hooks pause a run at a chosen point (a phase step finished in
memory but not saved, an RL iteration updated but not saved, a save with its files
written but not renamed) and the test then kills or signals it. The uninterrupted
reference runs alongside (it compiles without the shared cache the restarts use, so
the comparison covers independently compiled programs too).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rlx.train import checkpoint as ck

SCRIPT = Path(__file__).parent / "scripts" / "phase_run.py"
TIMEOUT_S = 900            # per wait; the machine is shared and heavily loaded

TINY = [
    'rlx.Experiment.model = "tiny"',
    'rlx.Experiment.model_overrides = {"num_layers": 1}',
    "rlx.Experiment.train_problems = 120",
    "rlx.Experiment.eval_problems = 4",
    "rlx.Experiment.sft_steps = 6",
    "rlx.Experiment.sft_batch = 4",
    "rlx.Experiment.num_generations = 2",
    "rlx.Experiment.max_new_tokens = 4",
    "rlx.Experiment.export_hf = False",
    'rlx.rewards.RewardPool.backend = "inline"',
    "rlx.train.PhaseCheckpoints.every_steps = 2",
    "rlx.train.RLConfig.prompts_per_step = 2",
    "rlx.train.RLConfig.eval_every = 0",
    "rlx.train.RLConfig.checkpoint_every = 1",
    "rlx.train.RLConfig.log_samples_every = 0",
]
PAIRS = ["preference_problems = 16", "eval_pairs = 4"]


def _params(kind, run_dir, extra):
    cls = {"rlhf": "RLHFExperiment", "dpo": "DPOExperiment"}.get(kind)
    own = [f"rlx.{cls}.{p}" for p in PAIRS] if cls else []
    return TINY + own + extra + [f'rlx.Experiment.run_dir = "{run_dir}"']


def _start(kind, params, log_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("RLX_TEST_")}
    full.update(env)
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), kind, *params], env=full,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file, proc.log_path = log, log_path
    return proc


def _kill(proc, sig=signal.SIGKILL):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    if sig == signal.SIGKILL:
        proc.wait()
        proc.log_file.close()


def _wait(proc) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill(proc)


def _finish(proc):
    rc = _wait(proc)
    assert rc == 0, f"run failed ({rc}):\n" + Path(proc.log_path).read_text()[-4000:]


def _pause(proc, marker: Path):
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError("run ended before its pause hook fired:\n"
                                 + Path(proc.log_path).read_text()[-4000:])
        time.sleep(0.05)


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.exists() else []


def _same_arrays(ref: Path, got: Path) -> int:
    a, b = ck.saved_arrays(ref), ck.saved_arrays(got)
    assert sorted(a) == sorted(b), (ref, got)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(b[name], a[name], err_msg=f"{got.name} {name}")
    return len(a)


def _rows(run_dir: Path) -> dict[tuple, dict]:
    """Logged rows by (phase key, step); a redone step: the last row counts."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = next((k for k in ("sft_loss", "rm_loss", "pref_loss", "loss", "eval/accuracy")
                    if k in row), "other")
        out[(key, row["step"])] = row
    return out


def _same_metrics(ref_dir: Path, run_dir: Path, keys):
    want, have = _rows(ref_dir), _rows(run_dir)
    assert sorted(want) == sorted(have)
    compared = 0
    for k, row in want.items():
        for name in keys:
            if name in row:
                assert have[k][name] == row[name], (k, name)
                compared += 1
    return compared


def test_rlhf_with_a_critic_killed_in_every_phase_resumes_bitwise(tmp_path):
    """SIGKILL in the SFT warm-up, SIGTERM in reward-model training, SIGKILL mid-save
    in the RL phase (PPO: policy + critic), SIGINT in an RL iteration: each rerun
    continues from the phase's last save; the final state equals the reference's."""
    ref_dir, run_dir, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "jax_cache"
    extra = ['rlx.Experiment.objective = "ppo"', "rlx.train.RLConfig.steps = 4",
             "rlx.RLHFExperiment.rm_steps = 6", "rlx.RLHFExperiment.rm_batch = 4"]
    ref = _start("rlhf", _params("rlhf", ref_dir, extra), tmp_path / "ref.log")
    params = _params("rlhf", run_dir, extra)
    log = tmp_path / "run.log"
    try:
        # 1. SIGKILL after SFT step 4 (in memory; step 2 saved).
        marker = tmp_path / "m1"
        proc = _start("rlhf", params, log, RLX_TEST_CACHE=str(cache),
                      RLX_TEST_PAUSE="done:sft_progress:4", RLX_TEST_MARKER=str(marker))
        _pause(proc, marker)
        _kill(proc)
        assert _steps(run_dir / "sft_progress") == [2]
        assert (run_dir / "operative_config.gin").exists()      # written at the start
        assert not (run_dir / "sft").exists() or not _steps(run_dir / "sft")

        # 2. SIGTERM after reward-model step 4: the save of step 2 is kept, one line.
        marker = tmp_path / "m2"
        proc = _start("rlhf", params, log, RLX_TEST_CACHE=str(cache),
                      RLX_TEST_PAUSE="done:reward_model:4", RLX_TEST_MARKER=str(marker))
        _pause(proc, marker)
        _kill(proc, signal.SIGTERM)
        assert _wait(proc) == 128 + signal.SIGTERM
        text = log.read_text()
        assert "resumed the SFT warm-up from checkpoint step 2 of 6" in text
        assert "rlx: stopped by SIGTERM during reward-model training (3 of 6 steps done); " \
               "rerun the same command to resume from checkpoint step 2" in text
        assert "Traceback" not in text
        assert _steps(run_dir / "reward_model") == [2]
        assert _steps(run_dir / "sft") == [6]

        # 3. SIGKILL in the middle of the save of RL iteration 3 (files not renamed).
        marker = tmp_path / "m3"
        proc = _start("rlhf", params, log, RLX_TEST_CACHE=str(cache),
                      RLX_TEST_PAUSE="save:checkpoints:3", RLX_TEST_MARKER=str(marker))
        _pause(proc, marker)
        _kill(proc)
        assert "resumed reward-model training from checkpoint step 2 of 6" in log.read_text()
        assert _steps(run_dir / "checkpoints") == [1, 2]
        assert any(p.name.startswith("3.orbax-checkpoint-tmp")
                   for p in (run_dir / "checkpoints").iterdir())

        # 4. SIGINT after the update of RL iteration 4 (3 is saved this time).
        marker = tmp_path / "m4"
        proc = _start("rlhf", params, log, RLX_TEST_CACHE=str(cache),
                      RLX_TEST_PAUSE="iter:4", RLX_TEST_MARKER=str(marker))
        _pause(proc, marker)
        _kill(proc, signal.SIGINT)
        assert _wait(proc) == 128 + signal.SIGINT
        text = log.read_text()
        assert "resumed from checkpoint step 2" in text
        assert "rlx: stopped by SIGINT during the RL phase (3 of 4 steps done); rerun the " \
               "same command to resume from checkpoint step 3" in text
        assert "Traceback" not in text

        # 5. The same command finishes from RL step 3.
        _finish(_start("rlhf", params, log, RLX_TEST_CACHE=str(cache)))
        assert "resumed from checkpoint step 3" in log.read_text()
        _finish(ref)
    finally:
        _kill(ref)
    compared = 0
    for sub, step in (("sft", 6), ("sft_progress", 6), ("reward_model", 6),
                      ("checkpoints", 4)):
        compared += _same_arrays(ref_dir / sub / str(step), run_dir / sub / str(step))
    assert compared > 20
    assert any("critic" in k for k in ck.saved_arrays(run_dir / "checkpoints" / "4"))
    n = _same_metrics(ref_dir, run_dir, ("sft_loss", "rm_loss", "loss", "value_loss",
                                         "reward_mean", "grad_norm", "eval/accuracy"))
    assert n >= 10
    summary = json.loads((run_dir / "summary.json").read_text())
    want = json.loads((ref_dir / "summary.json").read_text())
    for key in ("rm_accuracy", "accuracy_before_rl", "accuracy_after_rl",
                "learned_reward_last"):
        assert summary[key] == want[key], key


def test_dpo_killed_mid_phase_resumes_bitwise(tmp_path):
    """SIGKILL after DPO step 3 (step 2 saved), SIGKILL mid-save of step 4, then the
    same command: the final DPO state and logged losses equal the uninterrupted run's."""
    ref_dir, run_dir, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "jax_cache"
    extra = ["rlx.Experiment.sft_steps = 2", "rlx.DPOExperiment.dpo_steps = 6",
             "rlx.DPOExperiment.dpo_batch = 4"]
    ref = _start("dpo", _params("dpo", ref_dir, extra), tmp_path / "ref.log")
    params = _params("dpo", run_dir, extra)
    log = tmp_path / "run.log"
    try:
        marker = tmp_path / "m1"
        proc = _start("dpo", params, log, RLX_TEST_CACHE=str(cache),
                      RLX_TEST_PAUSE="done:dpo:3", RLX_TEST_MARKER=str(marker))
        _pause(proc, marker)
        _kill(proc)
        assert _steps(run_dir / "dpo") == [2]
        marker = tmp_path / "m2"
        proc = _start("dpo", params, log, RLX_TEST_CACHE=str(cache),
                      RLX_TEST_PAUSE="save:dpo:4", RLX_TEST_MARKER=str(marker))
        _pause(proc, marker)
        _kill(proc)
        assert "resumed DPO training from checkpoint step 2 of 6" in log.read_text()
        assert _steps(run_dir / "dpo") == [2]
        _finish(_start("dpo", params, log, RLX_TEST_CACHE=str(cache)))
        _finish(ref)
    finally:
        _kill(ref)
    assert _same_arrays(ref_dir / "dpo" / "6", run_dir / "dpo" / "6") > 10
    assert _same_metrics(ref_dir, run_dir, ("pref_loss", "eval/accuracy")) >= 2
    summary = json.loads((run_dir / "summary.json").read_text())
    want = json.loads((ref_dir / "summary.json").read_text())
    for key in ("pref_accuracy", "accuracy_after_dpo", "pref_margin"):
        assert summary[key] == want[key], key


@pytest.mark.parametrize("change, match", [
    ("rlx.Experiment.sft_steps = 8", "sft_steps"),
    pytest.param('rlx.Experiment.objective = "dr_grpo"', "objective",
                 marks=pytest.mark.slow),
])
def test_a_changed_configuration_is_refused_and_every_checkpoint_is_kept(tmp_path, change,
                                                                          match):
    """A finished run rerun with another setting stops before any work with an error
    naming it, and every checkpoint file is left exactly as it was."""
    run_dir, cache = tmp_path / "run", tmp_path / "jax_cache"
    params = _params("train", run_dir, ["rlx.train.RLConfig.steps = 2"])
    _finish(_start("train", params, tmp_path / "a.log", RLX_TEST_CACHE=str(cache)))

    def snapshot():
        return {str(p.relative_to(run_dir)): p.read_bytes()
                for p in sorted(run_dir.rglob("*")) if p.is_file()
                and ("checkpoints" in p.parts or "sft" in p.parts
                     or "sft_progress" in p.parts)}
    before = snapshot()
    proc = _start("train", params + [change], tmp_path / "b.log", RLX_TEST_CACHE=str(cache))
    rc = _wait(proc)
    text = (tmp_path / "b.log").read_text()
    assert rc == 2, text[-3000:]
    line = [s for s in text.splitlines() if s.startswith("rlx: error:")]
    assert line and "another configuration" in line[0] and match in line[0], text[-3000:]
    assert snapshot() == before
    assert not any(".corrupt" in p.name or ".fresh" in p.name for p in run_dir.rglob("*"))
