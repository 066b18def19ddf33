"""Numeric exact match: the whole completion is one number equal to the answer.

``numeric_exact_match(" 432\n", Problem(..., answer="432")) == 1.0``. The stripped
completion must parse as a number by ``rlx.rewards.extract.parse_number`` (integers,
decimals, ``3/4``, ``1,234``) and equal the parsed ``problem.answer`` exactly (rational
comparison, so ``"0.50"`` matches ``"1/2"``); anything else, including extra text, scores
0. This strictness is the contract the arithmetic task's demonstrations teach; use
``math_answer`` for free-form solutions. ``final_answer_match`` is the variant for
worked solutions: only the number after the last ``####`` counts.
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


@register_reward("final_answer_match")
def final_answer_match(completion: str, problem: Any) -> float:
    """1.0 if the final answer equals ``problem.answer``: the text after the last
    ``####`` (GSM8K's marker; worked solutions put their answer there) or, without
    one, the whole completion must parse as that number. Work before the marker is not
    checked; a marker followed by anything but one number scores 0."""
    gold = parse_number(str(problem.answer))
    if gold is None:
        raise ValueError(f"final_answer_match: problem.answer {problem.answer!r} is not a number")
    _, marker, tail = completion.rpartition("####")
    pred = parse_number(tail if marker else completion)
    return 1.0 if pred is not None and pred == gold else 0.0
