"""One RewardPool scored from two threads at once (an asynchronous rollout producer and
the trainer's evaluation): every call gets its own batch's scores."""

import threading

import numpy as np
import pytest
import reward_pool_helpers as h

from rlx.rewards import RewardComponent, RewardPool, RewardSpec
from rlx.tasks import Problem

P = Problem("", "0", {})


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_concurrent_calls_from_two_threads_get_their_own_scores(backend):
    spec = RewardSpec((RewardComponent("index_reward", 1.0, fn=h.index_reward),))
    errors, checked = [], []
    with RewardPool(spec, num_workers=2, chunk_size=1, backend=backend) as pool:
        def caller(offset, size):
            try:
                for _ in range(15):
                    want = np.arange(offset, offset + size)
                    got = pool.score([str(i) for i in want], [P] * size)
                    np.testing.assert_array_equal(got.scores, want)
                    checked.append(size)
            except BaseException as e:       # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(0, 8)),
                   threading.Thread(target=caller, args=(1000, 16))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert sorted(checked) == [8] * 15 + [16] * 15
