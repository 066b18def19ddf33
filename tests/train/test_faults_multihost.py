"""One truth across hosts: two processes (gloo over 127.0.0.1, one CPU device each) run
the RL loop with a reward that times out on process 1 only, and restore checkpoints that
are corrupt in process 1's view only (``scripts/fault_multihost.py``).

- Rewards: the engine scores on process 0 and broadcasts, so both processes train on
  identical values (the same reward matrices every iteration, bitwise-equal final
  parameters), although process 1's own pool scores the same completions differently
  (every call timed out there).
- Checkpoints: each process checks its own view, one collective agrees, and both
  restore the newest step valid everywhere (step 2, with the arrays saved at iteration
  2), whether step 3 is unreadable (a truncated array file) or fails its metadata digest
  (a tampered data-iterator position) on process 1 alone. The bad step is moved aside
  (never deleted) and nobody hangs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "fault_multihost.py"
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hosts_train_on_one_truth_and_agree_on_the_checkpoint_to_restore(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), str(port), str(tmp_path),
                               str(tmp_path / f"p{i}.json")], env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT, start_new_session=True)
             for i in range(2)]
    failures = []
    try:
        for i, proc in enumerate(procs):
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = "timeout (hung collective?)"
            if rc != 0:
                failures.append((i, rc))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()
    text = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert not failures, f"{failures}\n" + "\n---\n".join(t[-3000:] for t in text)
    p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))

    # One truth for rewards: identical values on both hosts, identical training.
    assert p0["rewards"] == p1["rewards"] and len(p0["rewards"]) == 3
    assert p0["reward_mean"] == p1["reward_mean"]
    assert p0["final_digest"] == p1["final_digest"]
    assert p1["local_timeouts"] == 16                      # process 1's own view differs
    assert p1["local_rewards"] != p1["rewards"][-1]
    assert any(v > 0 for row in p0["rewards"] for group in row for v in group)

    # One truth for checkpoints: both restore step 2, exactly as saved.
    for case in ("truncated", "tampered"):
        for proc in (p0, p1):
            got = proc[case]
            assert got["step"] == 2 and got["iteration"] == 2, (case, got)
            assert got["matches_save"], case
            assert got["corrupt_steps"] == [3]
        # Moved aside, in the view where it is bad and by process 0; never deleted.
        assert p1[case]["listing"] == ["1", "2", "3.corrupt"], p1[case]
        assert p0[case]["listing"] == ["1", "2", "3.corrupt"], p0[case]
    for t in text:
        assert "Traceback" not in t, t[-3000:]
    assert "unreadable or corrupt on process [1]" in text[0]
