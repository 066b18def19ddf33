"""A run SIGKILLed at any point and restarted with the same command ends with bitwise
the same training state (params, optimizer state, step, key) as an uninterrupted run.

The run is ``scripts/resume_run.py`` (RLTrainer, tiny model, 6 GRPO iterations with a
checkpoint after each). Its hooks pause it at a chosen point and signal the test,
which then kills it: in the middle of an iteration (state updated in memory, not yet
saved) and in the middle of an asynchronous save (files written to orbax's temporary
directory, not yet renamed). The uninterrupted reference compiles without a cache;
the killed/restarted runs share a persistent compilation cache, so restarts are
quick and the comparison also covers independently compiled programs.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"
TIMEOUT_S = 240
STEPS = 6


def _start(run_dir, out, log_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("RLX_TEST_")}
    full.update(env)
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(out)], env=full,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file, proc.log_path = log, log_path
    return proc


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.log_file.close()


def _finish(proc):
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill(proc)
    assert rc == 0, f"run failed ({rc}):\n" + Path(proc.log_path).read_text()[-4000:]


def _wait_for(proc, marker: Path):
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError("run ended before its pause hook fired:\n"
                                 + Path(proc.log_path).read_text()[-4000:])
        time.sleep(0.05)


def _committed_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _metrics_by_step(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row                      # a redone step: the last one counts
    return rows


def _assert_same_run(ref_dir, ref_npz, run_dir, run_npz):
    ref, got = np.load(ref_npz), np.load(run_npz)
    assert sorted(ref.files) == sorted(got.files)
    assert any("params" in k for k in ref.files) and any("opt_state" in k for k in ref.files)
    for name in ref.files:
        assert ref[name].dtype == got[name].dtype, name
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)   # bitwise
    assert int(ref[".step"]) == STEPS
    want, have = _metrics_by_step(ref_dir), _metrics_by_step(run_dir)
    assert sorted(want) == sorted(have) == list(range(1, STEPS + 1))
    for step in want:
        for k in ("reward_mean", "grad_norm", "loss", "response_length"):
            assert have[step][k] == want[step][k], (step, k)
    # Not vacuous: the policy actually moved at every step.
    assert all(want[s]["grad_norm"] > 0 for s in want)


def test_killed_mid_iteration_and_mid_save_resumes_bitwise(tmp_path):
    ref_dir, run_dir, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "jax_cache"
    ref = _start(ref_dir, tmp_path / "ref.npz", tmp_path / "ref.log")
    try:
        # (a) killed in the middle of iteration 3: updated in memory, newest checkpoint 2.
        marker = tmp_path / "paused_a"
        proc = _start(run_dir, tmp_path / "run.npz", tmp_path / "run.log",
                      RLX_TEST_CACHE=str(cache), RLX_TEST_PAUSE="step:3",
                      RLX_TEST_MARKER=str(marker))
        _wait_for(proc, marker)
        _kill(proc)
        assert _committed_steps(run_dir) == [1, 2]
        assert not (tmp_path / "run.npz").exists()

        # (b) restarted, then killed in the middle of the save of iteration 5.
        marker = tmp_path / "paused_b"
        proc = _start(run_dir, tmp_path / "run.npz", tmp_path / "run.log",
                      RLX_TEST_CACHE=str(cache), RLX_TEST_PAUSE="save:5",
                      RLX_TEST_MARKER=str(marker))
        _wait_for(proc, marker)
        _kill(proc)
        assert _committed_steps(run_dir) == [2, 3, 4]
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()
                     if p.name.startswith("5.orbax-checkpoint-tmp")]
        assert leftovers, "the save of step 5 was not in progress when killed"

        # (c) restarted with the same command: finishes from step 4.
        _finish(_start(run_dir, tmp_path / "run.npz", tmp_path / "run.log",
                       RLX_TEST_CACHE=str(cache)))
        _finish(ref)
    finally:
        _kill(ref)
    _assert_same_run(ref_dir, tmp_path / "ref.npz", run_dir, tmp_path / "run.npz")


@pytest.mark.slow
def test_killed_at_random_moments_resumes_bitwise(tmp_path):
    """SIGKILL at random times (during generation, updates, logging or saves) until
    the run gets through; the result still equals the uninterrupted run's."""
    ref_dir, run_dir, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "jax_cache"
    ref = _start(ref_dir, tmp_path / "ref.npz", tmp_path / "ref.log", RLX_TEST_CACHE=str(cache))
    _finish(ref)
    rng = random.Random(0)
    kills = 0
    metrics = run_dir / "metrics.jsonl"
    for attempt in range(6):
        proc = _start(run_dir, tmp_path / "run.npz", tmp_path / "run.log",
                      RLX_TEST_CACHE=str(cache))
        if attempt < 5:
            rows = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
            target = rows() + rng.randint(1, 2)
            deadline = time.monotonic() + TIMEOUT_S
            while proc.poll() is None and rows() < target and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                _kill(proc)
                kills += 1
                continue
        _finish(proc)
        break
    assert kills >= 3
    _assert_same_run(ref_dir, tmp_path / "ref.npz", run_dir, tmp_path / "run.npz")
