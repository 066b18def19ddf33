"""Reward worker pool: order, weights, failure and timeout isolation, watchdog kills,
worker replacement, backend choice."""

import os
import time

import numpy as np
import pytest
import reward_pool_helpers as h

from rlx.rewards import RewardComponent, RewardPool, RewardSpec, get_reward
from rlx.tasks import Problem

P = Problem("", "0", {})


def _spec(*fns, weights=None):
    weights = weights or [1.0] * len(fns)
    return RewardSpec(tuple(RewardComponent(f.__name__, w, fn=f) for f, w in zip(fns, weights)))


@pytest.fixture(scope="module")
def process_pool():
    spec = _spec(h.index_reward, h.raising_reward, h.looping_reward, h.stubborn_reward, h.dying_reward,
                 weights=[1.0, 0.5, 0.0, 0.0, 0.0])
    # index_reward raises on non-integers: every "special" completion also fails there.
    with RewardPool(spec, num_workers=2, timeout_s=0.3, kill_grace_s=0.3, failure_value=-1.0,
                    backend="process") as pool:
        yield pool


@pytest.mark.parametrize("backend", ["inline", "thread", "process"])
def test_results_keep_input_order_and_match_inline_scoring(backend):
    spec = _spec(h.index_reward, h.nan_reward, weights=[2.0, 1.0])
    completions = [str(i) for i in range(37)]
    with RewardPool(spec, num_workers=2, chunk_size=5, backend=backend) as pool:
        r = pool.score(completions, [P] * 37)
    assert r.scores.dtype == np.float32 and r.scores.shape == (37,)
    assert r.components.dtype == np.float32 and r.components.shape == (37, 2)
    np.testing.assert_array_equal(r.components[:, 0], np.arange(37))
    np.testing.assert_array_equal(r.scores, 2.0 * np.arange(37) + 0.5)
    assert r.names == ("index_reward", "nan_reward")
    assert r.failures == 0 and r.timeouts == 0 and not r.failed.any()


def test_exceptions_are_isolated_and_counted(process_pool):
    r = process_pool.score(["1", "boom", "2", "boom"], [P] * 4)
    assert r.failures == 4 and r.timeouts == 0  # "boom" fails index_reward and raising_reward
    assert r.failed.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(r.components[:, :2], [[1, 1], [-1, -1], [2, 1], [-1, -1]])
    assert any("boom requested" in e for e in r.errors)


def test_python_level_timeout_is_interrupted_in_the_worker(process_pool):
    restarts = process_pool.restarts
    start = time.perf_counter()
    r = process_pool.score(["3", "spin", "4"], [P] * 3)
    assert time.perf_counter() - start < 3.0
    assert r.timeouts == 1 and r.failures == 1  # spin: timed out in looping, raised in index
    np.testing.assert_array_equal(r.components[[0, 2], 0], [3, 4])
    assert r.components[1, 2] == -1.0
    assert process_pool.restarts == restarts  # SIGALRM sufficed: no kill


def test_call_that_ignores_the_alarm_is_killed_and_the_rest_rescored(process_pool):
    restarts = process_pool.restarts
    start = time.perf_counter()
    r = process_pool.score(["5", "6", "hang", "7", "8"], [P] * 5)
    assert time.perf_counter() - start < 5.0
    assert process_pool.restarts == restarts + 1
    assert r.timeouts == 1
    assert r.failed.tolist() == [False, False, True, False, False]
    np.testing.assert_array_equal(r.components[[0, 1, 3, 4], 0], [5, 6, 7, 8])
    np.testing.assert_array_equal(r.components[2], [-1.0] * 5)
    # The pool keeps working after the kill.
    assert process_pool.score(["9"], [P]).components[0, 0] == 9


def test_worker_death_is_a_counted_crash(process_pool):
    r = process_pool.score(["1", "die", "2"], [P] * 3)
    assert r.failed.tolist() == [False, True, False]
    # "die" kills its worker in dying_reward: the crash is counted there; the sample's
    # other components (whose results died with the worker) hold failure_value uncounted.
    assert r.crashes == 1 and r.timeouts == 0 and r.failures == 1
    assert r.component_failures.tolist() == [0, 0, 0, 0, 1]
    assert r.components[1].tolist() == [-1.0] * 5
    np.testing.assert_array_equal(r.components[[0, 2], 0], [1, 2])
    assert "died (exit code 3)" in r.component_errors[4]
    assert r.metrics()["reward/dying_reward/failures"] == 1.0


def test_non_finite_score_is_a_failure():
    with RewardPool(_spec(h.nan_reward), backend="inline", failure_value=0.0) as pool:
        r = pool.score(["nan", "ok"], [P, P])
    assert r.failures == 1 and r.components[:, 0].tolist() == [0.0, 0.5]


def test_inline_backend_times_out_with_sigalrm_in_the_main_thread():
    with RewardPool(_spec(h.looping_reward), backend="inline", timeout_s=0.2) as pool:
        start = time.perf_counter()
        r = pool.score(["spin", "x"], [P, P])
    assert time.perf_counter() - start < 2.0
    assert r.timeouts == 1 and r.components[:, 0].tolist() == [0.0, 1.0]


def test_thread_backend_abandons_a_stuck_call():
    spec = _spec(h.index_reward)
    slow = RewardComponent("slow", fn=lambda c, p: time.sleep(1.5) or 1.0 if c == "slow" else 0.0)
    spec = RewardSpec((spec.components[0], RewardComponent("slow2", fn=slow.fn)))
    with pytest.warns(UserWarning, match="falls back to threads"):
        pool = RewardPool(spec, num_workers=2, timeout_s=0.2, kill_grace_s=0.2)
    with pool:
        assert pool.backend == "thread"
        start = time.perf_counter()
        r = pool.score(["1", "slow", "2"], [P] * 3)
        assert time.perf_counter() - start < 1.4
        assert r.timeouts == 1 and r.failed.tolist() == [False, True, False]
        assert pool.restarts == 1


def test_process_backend_rejects_a_spec_that_does_not_pickle():
    spec = RewardSpec((RewardComponent("anon", fn=lambda c, p: 1.0),))
    with pytest.raises(ValueError, match="needs a RewardSpec that pickles for a worker"):
        RewardPool(spec, backend="process")


def test_default_backend_is_worker_processes_for_importable_specs():
    with RewardPool(_spec(h.pid_reward), num_workers=1) as pool:
        assert pool.backend == "process"
        assert int(pool.score(["a"], [P]).components[0, 0]) != os.getpid()
    with RewardPool(RewardSpec((RewardComponent("format", kwargs={"pattern": "x"}),)), num_workers=1) as pool:
        assert pool.backend == "process"


def test_weights_give_the_total_and_components_are_kept():
    spec = _spec(h.index_reward, h.nan_reward, weights=[-0.5, 4.0])
    with RewardPool(spec, num_workers=1, backend="process") as pool:
        r = pool.score(["2", "nan", "6"], [P] * 3)
    np.testing.assert_array_equal(r.components, [[2, 0.5], [0, 0], [6, 0.5]])
    np.testing.assert_array_equal(r.scores, [-1 + 2, 0, -3 + 2])  # failed calls score 0
    assert r.scores.shape == (3,) and r.components.shape == (3, 2)


def test_a_replacement_worker_gets_time_to_import_its_rewards(tmp_path):
    mod = tmp_path / "slow_import_rewards.py"
    mod.write_text(
        "import os, signal, time\n"
        "if os.environ.get('RLX_REWARD_WORKER'):\n"
        "    time.sleep(0.8)  # a heavy import, longer than the call time limit\n"
        "def r(completion, problem):\n"
        "    if completion == 'hang':\n"
        "        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "        time.sleep(60)\n"
        "    return float(completion)\n"
    )
    spec = RewardSpec((RewardComponent(f"{mod}:r"),))
    with RewardPool(spec, num_workers=1, timeout_s=0.2, kill_grace_s=0.2, chunk_size=4) as pool:
        r = pool.score(["1", "hang", "2", "3"], [P] * 4)
        assert pool.restarts == 1
    assert r.failed.tolist() == [False, True, False, False] and r.timeouts == 1
    assert r.components[[0, 2, 3], 0].tolist() == [1, 2, 3]


def test_a_worker_that_died_while_idle_does_not_fail_the_next_batch():
    spec = _spec(h.delayed_exit_reward)
    with RewardPool(spec, num_workers=1, backend="process") as pool:
        assert pool.score(["later"], [P]).components[0, 0] == 1.0
        pool._workers[0].proc.wait(timeout=5)  # its background timer ends the process
        r = pool.score(["a", "b"], [P] * 2)
        assert pool.restarts == 1
    assert not r.failed.any() and r.crashes == 0


def test_close_stops_the_workers_and_later_calls_fail():
    pool = RewardPool(_spec(h.pid_reward), num_workers=2, backend="process")
    pids = set(pool.score(["a"] * 8, [P] * 8).components[:, 0].astype(int).tolist())
    procs = [w.proc for w in pool._workers]
    assert pids <= {p.pid for p in procs} and os.getpid() not in pids
    pool.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"], [P])


def test_mismatched_lengths_and_bad_arguments_are_rejected():
    spec = RewardSpec((RewardComponent("format", kwargs={"pattern": "x"}),))
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(spec, timeout_s=0, backend="inline")
    with pytest.raises(ValueError, match="backend"):
        RewardPool(spec, backend="gpu")
    with RewardPool(spec, backend="inline") as pool:
        with pytest.raises(ValueError, match="completions has 2 entries but problems has 1"):
            pool.score(["a", "b"], [P])
        assert pool.score([], []).scores.shape == (0,)


def test_task_spec_through_the_process_pool():
    from rlx.tasks import get_task

    task = get_task("countdown")
    problems = task.train(64, seed=0)
    completions = [task.demonstration(p) if i % 3 else "1+1" for i, p in enumerate(problems)]
    spec = task.reward_spec(format_weight=0.1)
    with RewardPool(spec, backend="process", num_workers=2) as pool:
        r = pool.score(completions, problems)
    expected = np.array([spec.score(c, p)[1] for c, p in zip(completions, problems)])
    np.testing.assert_array_equal(r.components, expected.astype(np.float32))
    assert r.metrics()["reward/countdown"] == pytest.approx(expected[:, 0].mean())
    assert get_reward("countdown") is spec.components[0].fn
