"""A signal outside every phase loop (start-up, evaluation, export) stops a recipe's
whole run with one line, exit code 128 + signal and the previous handlers back."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rlx.recipes import experiment, prepare, rlhf
from rlx.train import signals


def _signal_at(sig):
    def deliver(*args, **kwargs):
        os.kill(os.getpid(), sig)
        sum(range(100_000))                 # the handler runs between bytecodes
        raise AssertionError("the signal did not stop the run")
    return deliver


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_start_up_of_rlx_train_stops_with_one_line(tmp_path, monkeypatch,
                                                                 capsys, sig):
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    monkeypatch.setattr(prepare, "plan", _signal_at(sig))
    with pytest.raises(signals.Interrupted) as err:
        experiment.run(experiment.Experiment(run_dir=str(tmp_path / "run")))
    assert err.value.code == 128 + sig
    lines = capsys.readouterr().err.strip().splitlines()
    name = signal.Signals(sig).name
    assert lines == [f"rlx: stopped by {name} during the experiment; rerun the same command "
                     f"to resume from {prepare.resume_from_phase()}"]
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before


def test_signal_between_phases_of_rlx_dpo_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rlhf, "_run_dpo", _signal_at(signal.SIGTERM))
    with pytest.raises(signals.Interrupted):
        rlhf.run_dpo(rlhf.DPOExperiment(base=experiment.Experiment(run_dir=str(tmp_path / "run"))))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlx: stopped by SIGTERM during the DPO run")


def test_rlx_train_process_stopped_at_start_up_exits_143_without_a_traceback(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from rlx import cli
        from rlx.recipes import prepare

        def plan(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(100_000))

        prepare.plan = plan
        sys.exit(cli.main(["train", "--gin_param",
                           'rlx.Experiment.run_dir = "{tmp_path / 'run'}"']))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "rlx: stopped by SIGTERM during the experiment;" in out.stderr
