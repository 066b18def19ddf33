"""Helpers of the fault scripts: rewards that misbehave (and the shared tokenizer).

Rewards are referenced by import path (``"fault_rewards.slow_on_process_1"``) with this
directory on ``sys.path``.
"""

import os
import time

from harness import CharTokenizer  # noqa: F401  (re-exported for the fault scripts)


def slow_on_process_1(completion: str, problem) -> float:
    """1.0 when the completion starts with the answer, else 0.0; on the process whose
    ``RLX_TEST_PROCESS_ID`` is 1 it first sleeps past any sane timeout."""
    if os.environ.get("RLX_TEST_PROCESS_ID") == "1":
        time.sleep(5.0)
    return float(completion.strip().startswith(str(problem.answer)))


def length_score(completion: str, problem) -> float:
    """A dense signal so every group has reward variance: −|len − 2| / 4."""
    return -abs(len(completion) - 2) / 4.0
