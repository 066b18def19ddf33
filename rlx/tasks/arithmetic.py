"""Multi-digit integer arithmetic: ``"47+385="`` -> ``"432"``.

Operands have a number of digits drawn uniformly from ``digits`` (an int or a
``(min, max)`` range; 1-digit operands include 0), operators uniformly from
``operators`` (a subset of ``+ - * /``). With more than two operands the usual
precedence applies (``*``/``/`` before ``+``/``-``, left to right). Answers are always
integers: with two operands, ``a / b`` is built as ``(b·q) / b`` with ``q`` an operand of
the configured size; with more operands a draw whose value is not an integer is redrawn.
Divisors are never 0. Negative answers are allowed (``"3-17="`` -> ``"-14"``).

Problem key (for the split hash): the prompt itself (``"47+385="``).
"""

from __future__ import annotations

import random
from fractions import Fraction

import gin

from rlx.tasks.base import Problem, Task, parse_range

_OPS = ("+", "-", "*", "/")


def evaluate_flat(operands: list[int], operators: list[str]) -> Fraction:
    """Value of ``o0 op0 o1 op1 ...`` with ``*``/``/`` binding tighter, left to right."""
    terms: list[Fraction] = [Fraction(operands[0])]
    signs: list[str] = []
    for op, x in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= x
        elif op == "/":
            terms[-1] /= x
        else:
            signs.append(op)
            terms.append(Fraction(x))
    value = terms[0]
    for op, t in zip(signs, terms[1:]):
        value = value + t if op == "+" else value - t
    return value


@gin.configurable(module="rlx.tasks")
class ArithmeticTask(Task):
    """Integer arithmetic with configurable operand digits, operators and length.

    Args:
      digits: digits per operand, an int or ``(min, max)``.
      operators: operators to draw from (subset of ``"+", "-", "*", "/"``).
      num_operands: operands per expression (>= 2).
      heldout_fraction, split_salt: see ``Task``.
    """

    name = "arithmetic"
    format_pattern = r"-?[0-9]+"

    def __init__(
        self,
        *,
        digits: int | tuple[int, int] = 2,
        operators: tuple[str, ...] = ("+", "-"),
        num_operands: int = 2,
        heldout_fraction: float = 0.1,
        split_salt: str = "",
    ):
        super().__init__(heldout_fraction=heldout_fraction, split_salt=split_salt)
        self.digits = parse_range(digits, "digits")
        if self.digits[1] > 30:
            raise ValueError(f"digits must be at most 30, got {digits!r}")
        operators = tuple(operators)
        if not operators or any(op not in _OPS for op in operators):
            raise ValueError(f"operators must be a non-empty subset of {_OPS}, got {operators!r}")
        self.operators = operators
        if num_operands < 2:
            raise ValueError(f"num_operands must be >= 2, got {num_operands!r}")
        self.num_operands = int(num_operands)

    def _operand(self, rng: random.Random, *, nonzero: bool = False) -> int:
        d = rng.randint(*self.digits)
        lo = 10 ** (d - 1) if d > 1 else (1 if nonzero else 0)
        return rng.randint(lo, 10**d - 1)

    def sample(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            ops = [rng.choice(self.operators) for _ in range(self.num_operands - 1)]
            nums = [self._operand(rng)]
            for op in ops:
                nums.append(self._operand(rng, nonzero=op == "/"))
            if self.num_operands == 2 and ops[0] == "/":
                nums[0] = nums[1] * self._operand(rng)
            value = evaluate_flat(nums, ops)
            if value.denominator == 1:
                break
        else:  # pragma: no cover - needs a pathological config (e.g. only "/" with many operands)
            raise ValueError("could not draw an integer-valued expression in 10000 tries")
        text = str(nums[0]) + "".join(f"{op}{x}" for op, x in zip(ops, nums[1:]))
        return Problem(
            prompt=f"{text}=",
            answer=str(value.numerator),
            meta={"task": self.name, "operands": tuple(nums), "operators": tuple(ops)},
        )

    def key(self, problem: Problem) -> str:
        return problem.prompt

    def demonstration(self, problem: Problem) -> str:
        return problem.answer

    def reward_names(self) -> tuple[str, ...]:
        return ("numeric_exact_match",)
