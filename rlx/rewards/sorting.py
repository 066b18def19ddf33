"""Sorting checker: the first line of the completion lists the answer's integers in order.

``sorting_reward("2 17 34", Problem(..., answer="2 17 34")) == 1.0``. The first line
must consist only of ASCII integers separated by spaces and/or commas; it scores 1.0
when that integer sequence equals ``problem.answer``'s, else 0.0. Lines longer than
``max_chars`` and integers with more than 30 digits score 0.
"""

from __future__ import annotations

import re
from typing import Any

from rlx.rewards.spec import register_reward

_LIST = re.compile(r"\s*\d{1,30}(?:[ ,]+\d{1,30})*\s*", re.ASCII)
_INT = re.compile(r"\d+", re.ASCII)


@register_reward("sorting")
def sorting_reward(completion: str, problem: Any, *, max_chars: int = 4096) -> float:
    """1.0 if the first line's integers equal ``problem.answer``'s integers, in order."""
    text = completion.strip()
    end = text.find("\n")
    line = text if end < 0 else text[:end]
    if len(line) > max_chars or not _LIST.fullmatch(line):
        return 0.0
    pred = [int(t) for t in _INT.findall(line)]
    gold = [int(t) for t in _INT.findall(str(problem.answer))]
    return 1.0 if pred == gold else 0.0
