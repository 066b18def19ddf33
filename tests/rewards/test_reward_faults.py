"""Hostile user rewards in the process pool: every fault is scored as failed and counted,
the worker is killed / replaced where needed, and later samples and calls are scored."""

import textwrap
import time

import numpy as np
import pytest

from rlx.rewards import RewardComponent, RewardFailedError, RewardPool, RewardSpec, reward_spec
from rlx.tasks import Problem

P = Problem("", "0", {})
FAIL = -1.0

FAULTS = """
    import ctypes, os, signal, sys, time
    import numpy as np
    import rlx.rewards

    def hostile(completion, problem):
        kind = completion
        if kind == "hang_blocked":   # sleeps in C with SIGALRM blocked
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        if kind == "hang_ignored":   # ignores SIGALRM and spins
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            while True:
                pass
        if kind == "spin":           # a Python loop (SIGALRM interrupts it)
            while True:
                pass
        if kind == "os_exit":
            os._exit(3)
        if kind == "sys_exit":
            sys.exit(2)
        if kind == "keyboard_interrupt":
            raise KeyboardInterrupt
        if kind == "segfault":
            ctypes.string_at(0)
        if kind == "raise":
            raise RuntimeError("hostile raised")
        if kind == "leak":           # allocates (and touches) without bound
            held = []
            while True:
                held.append(np.ones(16 * 2**20, np.uint8))
        if kind == "spawn_and_hang":  # a child process, then a hang: the kill must take both
            import subprocess
            child = subprocess.Popen(["sleep", "60"])
            with open(problem.meta["pidfile"], "w") as f:
                f.write(str(child.pid))
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        if kind == "rlimit":
            import resource
            return resource.getrlimit(resource.RLIMIT_AS)[0] / 2**20
        if kind == "huge":
            return bytes(2**42)
        returns = {"nan": float("nan"), "inf": float("inf"), "string": "1.0", "none": None,
                   "list": [1.0]}
        if kind in returns:
            return returns[kind]
        return float(kind)

    def plain(completion, problem):
        return 1.0

    @rlx.rewards.batched
    def hostile_batch(completions, problems):
        kinds = set(completions)
        if "b_raise" in kinds:
            raise ValueError("batch raised")
        if "b_short" in kinds:
            return [1.0]
        if "b_exit" in kinds:
            os._exit(1)
        if "b_hang" in kinds:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        return [float("nan") if c == "b_nan" else 2.0 for c in completions]
"""

# fault -> (counted as timeout, counted as crash, message in the errors)
CASES = {
    "hang_blocked": (True, False, "worker killed"),
    "hang_ignored": (True, False, "worker killed"),
    "spin": (True, False, "timed out"),
    "os_exit": (False, True, "exit code 3"),
    "sys_exit": (False, False, "SystemExit: 2"),
    "keyboard_interrupt": (False, False, "KeyboardInterrupt"),
    "segfault": (False, True, "SIGSEGV"),
    "raise": (False, False, "hostile raised"),
    "huge": (False, False, "MemoryError"),
    "nan": (False, False, "non-finite"),
    "inf": (False, False, "non-finite"),
    "string": (False, False, "returned str"),
    "none": (False, False, "returned NoneType"),
    "list": (False, False, "returned list"),
}


@pytest.fixture(scope="module")
def faults_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "hostile_rewards.py"
    path.write_text(textwrap.dedent(FAULTS))
    return str(path)


@pytest.fixture(scope="module")
def pool(faults_file):
    spec = reward_spec(names=(f"{faults_file}:hostile", f"{faults_file}:plain"), weights=(1.0, 0.5))
    with RewardPool(spec, num_workers=2, timeout_s=0.5, kill_grace_s=0.3, failure_value=FAIL,
                    memory_limit_mb=256) as p:
        assert p.backend == "process"
        yield p


@pytest.mark.parametrize("fault", list(CASES))
def test_fault_is_scored_as_failed_counted_and_the_run_goes_on(pool, fault):
    timeout, crash, message = CASES[fault]
    start = time.perf_counter()
    r = pool.score(["1", "2", fault, "3", "4"], [P] * 5)
    assert time.perf_counter() - start < 5.0
    assert r.failed.tolist() == [False, False, True, False, False], r.errors
    np.testing.assert_array_equal(r.components[[0, 1, 3, 4], 0], [1, 2, 3, 4])
    assert r.components[2, 0] == FAIL
    assert (r.timeouts, r.crashes) == (int(timeout), int(crash)), r.errors
    assert r.failures == (0 if timeout else 1)
    assert r.component_failures[0] + r.component_timeouts[0] == 1
    assert any(message in e for e in r.errors), r.errors
    assert message in r.component_errors[0] and r.component_errors[1] == ""
    np.testing.assert_allclose(r.scores[[0, 1, 3, 4]], np.array([1, 2, 3, 4]) + 0.5)
    m = r.metrics()
    assert (m["reward/failures"], m["reward/timeouts"], m["reward/crashes"]) == \
        (r.failures, r.timeouts, r.crashes)
    # Later calls are scored normally, by live workers.
    again = pool.score([str(i) for i in range(8)], [P] * 8)
    assert not again.failed.any() and again.components[:, 0].tolist() == list(range(8))
    assert all(w.alive() for w in pool._workers)


def test_killed_workers_are_replaced_and_counted(pool):
    restarts = pool.restarts
    r = pool.score(["os_exit", "1", "hang_blocked", "segfault"], [P] * 4)
    assert r.failed.tolist() == [True, False, True, True] and r.components[1, 0] == 1
    assert r.crashes == 2 and r.timeouts == 1
    assert pool.restarts == restarts + 3
    assert len(pool._workers) == 2


def test_a_leak_hits_the_workers_memory_limit_not_the_trainers(faults_file):
    import resource

    spec = reward_spec(names=(f"{faults_file}:hostile",))
    with RewardPool(spec, num_workers=1, timeout_s=10.0, memory_limit_mb=256) as pool:
        assert pool.score(["rlimit"], [P]).components[0, 0] == 256.0  # RLIMIT_AS in the worker
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = pool.score(["leak", "huge", "7"], [P] * 3)
        assert r.failed.tolist() == [True, True, False] and r.components[2, 0] == 7
        assert (r.failures, r.timeouts, r.crashes) == (2, 0, 0)
        assert all("MemoryError" in e for e in r.errors), r.errors
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
        assert pool.restarts == 0 and pool.score(["8"], [P]).components[0, 0] == 8


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_a_hung_worker_also_kills_the_processes_its_reward_started(pool, tmp_path):
    pidfile = tmp_path / "child.pid"
    r = pool.score(["spawn_and_hang", "1"], [Problem("", "0", {"pidfile": str(pidfile)}), P])
    assert r.timeouts == 1 and r.components[1, 0] == 1
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


@pytest.fixture(scope="module")
def batch_pool(faults_file):
    spec = reward_spec(names=(f"{faults_file}:hostile_batch", f"{faults_file}:hostile"))
    with RewardPool(spec, num_workers=2, chunk_size=3, timeout_s=0.2, kill_grace_s=0.3,
                    failure_value=FAIL) as p:
        yield p


@pytest.mark.parametrize(
    "fault, status, message",
    [("b_raise", "failure", "batch raised"), ("b_short", "failure", "returned 1 scores for 3 samples"),
     ("b_exit", "crash", "exit code 1"), ("b_hang", "timeout", "worker killed")],
)
def test_a_failing_batched_call_fails_its_chunk_only(batch_pool, fault, status, message):
    r = batch_pool.score(["1", "2", "3", "4", fault, "6"], [P] * 6)  # chunks [1 2 3] [4 f 6]
    assert r.components[:3, 0].tolist() == [2.0] * 3
    assert r.components[3:, 0].tolist() == [FAIL] * 3
    assert r.components[:, 1].tolist()[:4] == [1, 2, 3, 4] and r.components[5, 1] == 6
    assert r.component_failures[0] + r.component_timeouts[0] == 3
    assert r.crashes == (3 if status == "crash" else 0)
    assert r.component_timeouts[0] == (3 if status == "timeout" else 0)
    assert message in r.component_errors[0], r.errors
    assert not batch_pool.score(["1"] * 4, [P] * 4).failed.any()


def test_a_non_finite_entry_of_a_batch_fails_that_sample_only(batch_pool):
    r = batch_pool.score(["1", "b_nan", "3"], [P] * 3)
    assert r.components[:, 0].tolist() == [2.0, FAIL, 2.0]
    assert r.component_failures.tolist() == [1, 1]  # b_nan is not a number for `hostile` either
    assert "non-finite" in r.component_errors[0]


def test_reward_failing_on_every_sample_is_reported_by_name():
    spec = RewardSpec((RewardComponent("numeric_exact_match"), RewardComponent("format")))
    with RewardPool(spec, num_workers=1) as pool:
        r = pool.score(["1", "2", "3"], [Problem("", "1", {})] * 3)
    assert r.all_failed == ("format",) and r.component_failures.tolist() == [0, 3]
    assert r.components[:, 0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(RewardFailedError,
                       match=r"reward 'format' failed on all 3 samples .*missing 1 required keyword-only "
                             r"argument: 'pattern'"):
        r.raise_if_all_failed()


def test_partial_failures_do_not_raise(pool):
    r = pool.score(["1", "raise"], [P] * 2)
    assert r.all_failed == () and r.failures == 1
    r.raise_if_all_failed()
    timed_out = pool.score(["spin"], [P])
    assert timed_out.all_failed == (pool.spec.names[0],) and pool.spec.names[0].endswith(".py:hostile")
    with pytest.raises(RewardFailedError, match="reward '.*:hostile' failed on all 1 samples.*timed out"):
        timed_out.raise_if_all_failed()


def test_inline_backend_isolates_sys_exit_but_not_ctrl_c(faults_file):
    spec = reward_spec(names=(f"{faults_file}:hostile",))
    with RewardPool(spec, backend="inline") as pool:
        r = pool.score(["sys_exit", "5"], [P] * 2)
        assert r.failures == 1 and r.components[:, 0].tolist() == [0.0, 5.0]
        with pytest.raises(KeyboardInterrupt):
            pool.score(["keyboard_interrupt"], [P])
