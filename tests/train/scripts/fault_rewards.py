"""Helpers of the fault scripts: a character tokenizer and rewards that misbehave.

Rewards are referenced by import path (``"fault_rewards.slow_on_process_1"``) with this
directory on ``sys.path``.
"""

import os
import time

from rlx.data.tokenizer import Tokenizer


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet; 0 = pad, 1 = bos, 2 = eos."""

    ALPHABET = "0123456789+-*/= "

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.ALPHABET)

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def pad_id(self) -> int:
        return 0

    def _encode(self, text: str) -> list[int]:
        return [3 + self.ALPHABET.index(c) for c in text]

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return "".join(self.ALPHABET[i - 3] if i >= 3 else ("" if skip_special else f"<{i}>")
                       for i in map(int, ids))


def slow_on_process_1(completion: str, problem) -> float:
    """1.0 when the completion starts with the answer, else 0.0; on the process whose
    ``RLX_TEST_PROCESS_ID`` is 1 it first sleeps past any sane timeout."""
    if os.environ.get("RLX_TEST_PROCESS_ID") == "1":
        time.sleep(5.0)
    return float(completion.strip().startswith(str(problem.answer)))


def length_score(completion: str, problem) -> float:
    """A dense signal so every group has reward variance: −|len − 2| / 4."""
    return -abs(len(completion) - 2) / 4.0
