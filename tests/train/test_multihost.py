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
