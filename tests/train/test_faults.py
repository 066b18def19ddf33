"""Faults met in-process: SIGINT / SIGTERM during a phase (``rlx.train.signals``, the
``PhaseLoop`` of the fixed-length phases) and a metrics file torn by a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from rlx.train import checkpoint as ck
from rlx.train import signals
from rlx.train.logger import RunLogger


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_guarded_phase_at_once_with_its_exit_code(sig):
    before = signal.getsignal(sig)
    with pytest.raises(signals.Interrupted) as err:
        with signals.guard("a phase"):
            os.kill(os.getpid(), sig)
            for _ in range(10_000_000):          # interrupted long before the end
                pass
            raise AssertionError("not interrupted")
    assert err.value.code == 128 + sig and err.value.signum == sig
    assert signal.getsignal(sig) is before      # the previous handler is back


def test_a_signal_during_a_deferred_block_waits_for_its_end():
    done = []
    with pytest.raises(signals.Interrupted):
        with signals.guard("a phase") as g:
            with g.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(100_000))             # the handler ran here and only recorded
                done.append("save started")
            done.append("after")                # never reached: raised at the block's end
    assert done == ["save started"]


def test_a_swallowed_signal_is_raised_again_at_the_next_step_boundary():
    with signals.guard("a phase") as g:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(100_000))
        except SystemExit:                      # some library swallowed it
            pass
        with pytest.raises(signals.Interrupted):
            g.check()


def test_a_second_signal_exits_at_once_in_one_line(tmp_path):
    code = textwrap.dedent("""
        import os, signal, time
        from rlx.train import signals
        with signals.guard("the test phase") as g:
            with g.deferred():                  # e.g. a save that takes a while
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
        print("not reached")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 128 + signal.SIGTERM
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "rlx: second signal (SIGTERM) during the test phase: exiting now"), out.stderr
    assert "not reached" not in out.stdout


def _state(x):
    return {"w": jnp.full((4, 4), x, jnp.float32), "n": jnp.asarray(x, jnp.int32)}


def test_phase_loop_stopped_by_a_signal_keeps_its_last_save_and_resumes(tmp_path, capsys):
    directory = str(tmp_path / "phase")
    config = ck.PhaseCheckpoints(every_steps=2, every_minutes=None, keep=2)

    def run(stop_at=None):
        with ck.PhaseLoop(directory, phase="the toy phase", steps=6,
                          identity={"toy": 1}, config=config) as loop:
            start, state, data, _ = loop.restore(_state(0))
            rng = np.random.default_rng(0)
            if data:
                rng.bit_generator.state = data["rng"]
            for i in range(start, 6):
                state = {"w": state["w"] + rng.normal(), "n": state["n"] + 1}
                if i + 1 == stop_at:
                    os.kill(os.getpid(), signal.SIGINT)
                loop.done(i + 1, state, data_state={"rng": rng.bit_generator.state})
        return state

    want = run()
    capsys.readouterr()
    import shutil
    shutil.rmtree(directory)
    with pytest.raises(signals.Interrupted):
        run(stop_at=5)
    err = capsys.readouterr().err
    assert "rlx: stopped by SIGINT during the toy phase (4 of 6 steps done); rerun the same " \
           "command to resume from checkpoint step 4" in err
    assert sorted(int(p) for p in os.listdir(directory) if p.isdigit()) == [2, 4]
    got = run()
    assert "resumed the toy phase from checkpoint step 4 of 6" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
    assert int(got["n"]) == 6


def test_phase_loop_refuses_a_save_of_other_settings(tmp_path):
    directory = str(tmp_path / "phase")
    with ck.PhaseLoop(directory, phase="p", steps=2, identity={"lr": 0.1}) as loop:
        loop.restore(_state(0))
        loop.done(1, _state(1))
        loop.done(2, _state(2))
    with pytest.raises(ck.CheckpointMismatch, match=r"lr: saved 0.1, now 0.2"):
        with ck.PhaseLoop(directory, phase="p", steps=2, identity={"lr": 0.2}) as loop:
            loop.restore(_state(0))
    assert sorted(os.listdir(directory)) == ["2"]


def test_a_torn_metrics_line_is_set_aside_not_appended_to(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')   # killed mid-write
    logger = RunLogger(str(tmp_path), total_steps=3, tensorboard=False, console=False)
    logger.log(2, {"loss": 0.25})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.25
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 2, "lo\n'
    assert logger.torn == len('{"step": 2, "lo')
    # A complete file is left alone.
    RunLogger(str(tmp_path), total_steps=3, tensorboard=False, console=False).close()
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 2, "lo\n'


def test_nested_guards_report_once_and_the_outer_one_covers_the_gaps(capsys):
    def run(where):
        with signals.guard("the run") as outer:
            try:
                with ck.PhaseLoop(None, phase="the phase", steps=2) as loop:
                    assert loop.guard is outer             # one handler for both
                    if where == "phase":
                        os.kill(os.getpid(), signal.SIGTERM)
                        sum(range(100_000))
                if where == "between":
                    os.kill(os.getpid(), signal.SIGTERM)
                    sum(range(100_000))
            except signals.Interrupted as err:
                signals.stop(err, phase="the run", resume_from=lambda: "its checkpoints")
                raise

    for where, phase in (("phase", "the phase (0 of 2 steps done)"), ("between", "the run;")):
        with pytest.raises(signals.Interrupted):
            run(where)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rlx: stopped by SIGTERM during {phase}")


def test_phase_loop_fresh_mode_starts_beside_a_save_of_other_settings(tmp_path):
    directory = str(tmp_path / "phase")
    with ck.PhaseLoop(directory, phase="p", steps=2, identity={"lr": 0.1}) as loop:
        loop.restore(_state(0))
        loop.done(2, _state(2))
    before = sorted(os.listdir(directory))
    for _ in range(2):                  # the second rerun resumes the fresh directory
        with ck.PhaseLoop(directory, phase="p", steps=2, identity={"lr": 0.2},
                          on_mismatch="fresh") as loop:
            start, state, _, _ = loop.restore(_state(0))
            if start < 2:
                loop.done(2, _state(5))
    assert start == 2 and int(state["n"]) == 5
    assert sorted(os.listdir(directory)) == before
    assert sorted(os.listdir(directory + ".fresh-1")) == ["2"]
