"""Two processes × two CPU devices (gloo collectives over 127.0.0.1) train exactly like
one process on one device: SFT steps, then GRPO (kl_coef=0) policy steps from a fresh
state built on the SFT parameters, then a checkpoint save/restore.

Meshes (data, fsdp, tensor) over the global devices [p0:0, p0:1, p1:0, p1:1]:
  (4,1,1) pure data parallelism across both processes;
  (1,2,2) parameters FSDP-sharded across the processes, tensor-parallel within one
          (no host holds a whole parameter);
  (2,1,2) data across processes, tensor-parallel within one (slow: mostly covered
          by the two above).

Tolerance: float32 — |Δθ| ≤ 1e-6 + 1e-5·|θ| per parameter after 2 SFT + 2 policy
steps (observed ≈ 2e-8: only the order of the cross-device reductions differs), and
losses within rtol 1e-5. A hung collective fails the test after TIMEOUT_S.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "multihost_steps.py"
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, env, log):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _run_all(tmp_path, meshes):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(SFT_STEPS="2", POLICY_STEPS="2")
    port = _free_port()
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("p0", "p1", "ref")}
    shared = {**env, "CKPT_DIR": str(tmp_path / "ckpt")}
    procs = {
        "p0": _launch([2, 0, port, tmp_path / "p0.npz", *meshes], shared, logs["p0"]),
        "p1": _launch([2, 1, port, tmp_path / "p1.npz", *meshes], shared, logs["p1"]),
        "ref": _launch([1, 0, 0, tmp_path / "ref.npz", "1,1,1"],
                       {**env, "LOCAL_DEVICES": "1", "CKPT_DIR": str(tmp_path / "ckpt_ref")},
                       logs["ref"]),
    }
    failures = []
    try:
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = "timeout (hung collective?)"
            if rc != 0:
                failures.append((name, rc))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs.values():
            log.close()
    if failures:
        tails = "\n".join(f"--- {n} ({rc}):\n" + (tmp_path / f"{n}.log").read_text()[-3000:]
                          for n, rc in failures)
        raise AssertionError(f"worker failures {failures}\n{tails}")
    return (np.load(tmp_path / "ref.npz"), np.load(tmp_path / "p0.npz"),
            np.load(tmp_path / "p1.npz"))


@pytest.mark.parametrize("meshes", [
    ("4,1,1", "1,2,2"),
    pytest.param(("2,1,2",), marks=pytest.mark.slow),
])
def test_two_processes_agree_with_one_device(tmp_path, meshes):
    ref, p0, p1 = _run_all(tmp_path, meshes)
    base = ref["params:1,1,1"]
    assert np.max(np.abs(base - ref["params:init"])) > 1e-3, "the steps changed nothing"
    assert ref["checkpoint:1,1,1"].all()
    for mesh in meshes:
        # Every host gathers the same global parameters, bit for bit.
        np.testing.assert_array_equal(p0["params:" + mesh], p1["params:" + mesh])
        np.testing.assert_allclose(p0["params:" + mesh], base, rtol=1e-5, atol=1e-6,
                                   err_msg=mesh)
        np.testing.assert_allclose(p0["losses:" + mesh], ref["losses:1,1,1"], rtol=1e-5,
                                   err_msg=mesh)
        assert int(p0["step:" + mesh]) == 2
        # The state really spanned both processes (not a per-host replica).
        assert not p0["addressable:" + mesh].any()
        # Saved by both processes into one directory and restored exactly: step, every
        # array bitwise, data-iterator state, extra, and the shardings.
        for proc in (p0, p1):
            assert proc["checkpoint:" + mesh].all(), (mesh, proc["checkpoint:" + mesh])
        step_dir = tmp_path / "ckpt" / mesh / "2" / "state"
        assert (step_dir / "ocdbt.process_0").is_dir() and (step_dir / "ocdbt.process_1").is_dir()


# --------------------------------------------------------------- rlx train itself
CLI_TINY = [
    'rlx.Experiment.model = "tiny"',
    "rlx.Experiment.train_problems = 64",
    "rlx.Experiment.eval_problems = 8",
    "rlx.Experiment.sft_steps = 2",
    "rlx.Experiment.sft_batch = 8",
    "rlx.Experiment.num_generations = 2",
    "rlx.Experiment.max_new_tokens = 4",
    "rlx.Experiment.mesh_shape = (1, 2, 1)",          # FSDP: parameters split over hosts
    "rlx.train.RLConfig.prompts_per_step = 4",
    "rlx.train.RLConfig.eval_every = 1",
    "rlx.train.RLConfig.log_samples_every = 1",
    "rlx.train.RLConfig.checkpoint_every = 1",
    'rlx.Experiment.rewards = ("numeric_exact_match", "lengths.score")',
]
# A user reward that differs within groups, so that every RL step moves the parameters.
LENGTHS = "def score(completion, problem):\n    return (len(completion) % 3) / 2\n"


def _rlx_train(run_dir, steps, *, process=None, port=None, log):
    """``rlx train`` on the tiny default experiment: one process with 2 CPU devices, or
    process ``process`` of 2 with one device each (``--coordinator_address``, gloo)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(run_dir).parent),
                                         env.get("PYTHONPATH", "")])
    devices = 1 if process is not None else 2
    env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    params = CLI_TINY + [f'rlx.Experiment.run_dir = "{run_dir}"',
                         f"rlx.train.RLConfig.steps = {steps}"]
    cmd = [sys.executable, "-m", "rlx.cli", "train", *[f"--gin_param={b}" for b in params]]
    if process is not None:
        cmd += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                "--process_id", str(process)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_all(procs, logs, tmp_path):
    failures = []
    try:
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = "timeout (hung collective?)"
            if rc != 0:
                failures.append((name, rc))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs.values():
            log.close()
    if failures:
        tails = "\n".join(f"--- {n} ({rc}):\n" + (tmp_path / f"{n}.log").read_text()[-3000:]
                          for n, rc in failures)
        raise AssertionError(f"rlx train failures {failures}\n{tails}")


def _two_processes(tmp_path, run_dir, steps, tag):
    port = _free_port()
    logs = {f"{tag}{i}": open(tmp_path / f"{tag}{i}.log", "w") for i in range(2)}
    procs = {name: _rlx_train(run_dir, steps, process=i, port=port, log=logs[name])
             for i, name in enumerate(logs)}
    _wait_all(procs, logs, tmp_path)
    return [(tmp_path / f"{tag}{i}.log").read_text() for i in range(2)]


def test_rlx_train_on_two_processes_resumes_and_exports_like_one(tmp_path):
    """Two ``rlx train`` processes on 127.0.0.1 (gloo CPU collectives, one device each,
    parameters FSDP-split across them) run the whole recipe: tokenizer training on
    process 0 (broadcast), SFT, evaluation, generation, rewards (scored on process 0),
    updates, sample tables, checkpoints; a rerun with one more step resumes from the
    checkpoint of step 2; the export written by process 0 equals the export of one
    process with two devices trained straight through 3 steps (|Δθ| ≤ 1e-6 + 1e-5·|θ|),
    and so do the per-step rewards, losses, gradient norms and held-out accuracies."""
    from safetensors.numpy import load_file

    ref_dir, run_dir = tmp_path / "one", tmp_path / "two"
    (tmp_path / "lengths.py").write_text(LENGTHS)
    # The one-process reference runs beside the first two-process run (whose processes
    # spend much of their time waiting on each other's collectives).
    ref_log = open(tmp_path / "ref.log", "w")
    ref = _rlx_train(ref_dir, 3, log=ref_log)
    try:
        first = _two_processes(tmp_path, run_dir, 2, "a")
    finally:
        _wait_all({"ref": ref}, {"ref": ref_log}, tmp_path)
    assert "=== rlx run summary ===" in first[0] and "=== rlx run summary ===" not in first[1]
    assert sorted(os.listdir(run_dir / "checkpoints"))[-1] == "2"
    second = _two_processes(tmp_path, run_dir, 3, "b")
    assert "resumed from checkpoint step 2" in second[0]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in ref_rows if r["step"] > 0)
    for key in ("reward_mean", "eval/accuracy", "loss", "grad_norm"):   # same rollouts
        got = [r[key] for r in rows if r["step"] > 0]
        want = [r[key] for r in ref_rows if r["step"] > 0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert (run_dir / "samples.md").read_text().count("samples at step") == 3
    assert (run_dir / "tokenizer.model").read_bytes() == (ref_dir / "tokenizer.model").read_bytes()
    two = load_file(str(run_dir / "hf_export" / "model.safetensors"))
    one = load_file(str(ref_dir / "hf_export" / "model.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rl_steps"] == 3 and summary["hf_export"]
    assert json.loads((run_dir / "hf_export" / "config.json").read_text())["eos_token_id"] \
        is not None
