"""Countdown checker: a safe arithmetic-expression evaluator and the Countdown reward.

The expression is **never** passed to ``eval``/``exec``. ``evaluate_expression``:

1. rejects text longer than ``max_length`` characters or containing anything but ASCII
   digits, ``+ - * /``, parentheses and spaces (so names, ``__import__``, attribute
   access, ``**``-free tricks like ``1e9``/``0x10``/``1_0``/``1.5`` and Unicode digits
   never reach the parser);
2. parses it with ``ast.parse(mode="eval")`` and walks the tree, accepting only
   ``Expression``, ``BinOp`` with ``Add/Sub/Mult/Div`` and non-negative ``int``
   ``Constant`` nodes (no unary minus, no ``**``, no ``//``), to depth ``max_depth``;
3. computes with ``fractions.Fraction`` (exact; ``7/2*2`` is 7) and rejects any
   literal or intermediate whose numerator or denominator exceeds ``max_abs``, and
   division by zero.

Countdown rule (see ``rlx.tasks.countdown``): each given number may be used **at most
once** (multiset inclusion: a number given twice may be used twice), unless
``use_all_numbers`` asks for exactly once (the DAPO / TinyZero rule). By default the
rule is read from ``problem.meta["use_all_numbers"]``.

Completion format: the expression is the content of the last ``<answer>...</answer>``
if present, else the first non-empty line; a trailing ``= value`` is dropped (the value
is recomputed, never trusted).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from rlx.rewards.spec import register_reward

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() \t]*", re.ASCII)
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class ExpressionError(ValueError):
    """The text is not an allowed arithmetic expression."""


def evaluate_expression(
    text: str, *, max_length: int = 200, max_depth: int = 32, max_abs: int = 10**12
) -> tuple[Fraction, list[int]]:
    """Exact value of a ``+ - * /`` integer expression and the integer literals it uses.

    Raises ExpressionError for anything outside the whitelist described in the module
    docstring (bounded length, depth, magnitude; division by zero).
    """
    if len(text) > max_length:
        raise ExpressionError(f"expression longer than {max_length} characters")
    if not text.strip():
        raise ExpressionError("empty expression")
    if not _ALLOWED_CHARS.fullmatch(text):
        raise ExpressionError("expression contains characters other than digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"not a valid expression: {type(e).__name__}") from None
    literals: list[int] = []
    value = _walk(tree.body, 1, max_depth, max_abs, literals)
    return value, literals


def _walk(node: ast.AST, depth: int, max_depth: int, max_abs: int, literals: list[int]) -> Fraction:
    if depth > max_depth:
        raise ExpressionError(f"expression deeper than {max_depth}")
    if isinstance(node, ast.Constant):
        v = node.value
        if type(v) is not int or v < 0:
            raise ExpressionError(f"literal {v!r} is not a non-negative integer")
        if v > max_abs:
            raise ExpressionError(f"literal larger than {max_abs}")
        literals.append(v)
        return Fraction(v)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a = _walk(node.left, depth + 1, max_depth, max_abs, literals)
        b = _walk(node.right, depth + 1, max_depth, max_abs, literals)
        if isinstance(node.op, ast.Div) and b == 0:
            raise ExpressionError("division by zero")
        out = _OPS[type(node.op)](a, b)
        if abs(out.numerator) > max_abs or out.denominator > max_abs:
            raise ExpressionError(f"intermediate value beyond {max_abs}")
        return out
    raise ExpressionError(f"disallowed syntax {type(node).__name__}")


def extract_expression(completion: str) -> str:
    """The candidate expression of a completion (see the module docstring)."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, max(end, 0))
    if end >= 0 and start >= 0:
        text = completion[start + len("<answer>") : end]
    else:
        text = ""
        for line in completion.strip().split("\n", 8)[:8]:
            if line.strip():
                text = line
                break
    return text.split("=", 1)[0].strip()


@register_reward("countdown")
def countdown_reward(
    completion: str,
    problem: Any,
    *,
    use_all_numbers: bool | None = None,
    max_length: int = 200,
) -> float:
    """1.0 if the completion's expression uses the given numbers by the rule and equals
    the target; else 0.0. Reads ``problem.meta["numbers"]`` and ``["target"]``."""
    numbers = problem.meta["numbers"]
    target = Fraction(int(problem.meta["target"]))
    if use_all_numbers is None:
        use_all_numbers = bool(problem.meta.get("use_all_numbers", False))
    try:
        value, used = evaluate_expression(extract_expression(completion), max_length=max_length)
    except ExpressionError:
        return 0.0
    given, counts = Counter(int(n) for n in numbers), Counter(used)
    if use_all_numbers:
        ok = counts == given
    else:
        ok = all(counts[n] <= given[n] for n in counts)
    return 1.0 if ok and value == target else 0.0
