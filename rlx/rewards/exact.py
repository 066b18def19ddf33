"""Numeric exact match: the whole completion is one number equal to the answer.

``numeric_exact_match(" 432\n", Problem(..., answer="432")) == 1.0``. The stripped
completion must parse as a number by ``rlx.rewards.extract.parse_number`` (integers,
decimals, ``3/4``, ``1,234``) and equal the parsed ``problem.answer`` exactly (rational
comparison, so ``"0.50"`` matches ``"1/2"``); anything else, including extra text, scores
0. This strictness is the contract the arithmetic task's demonstrations teach; use
``math_answer`` for free-form solutions.
"""

from __future__ import annotations

from typing import Any

from rlx.rewards.extract import parse_number
from rlx.rewards.spec import register_reward


@register_reward("numeric_exact_match")
def numeric_exact_match(completion: str, problem: Any) -> float:
    """1.0 if ``completion.strip()`` is a number equal to ``problem.answer``, else 0.0."""
    gold = parse_number(str(problem.answer))
    if gold is None:
        raise ValueError(f"numeric_exact_match: problem.answer {problem.answer!r} is not a number")
    pred = parse_number(completion)
    return 1.0 if pred is not None and pred == gold else 0.0
