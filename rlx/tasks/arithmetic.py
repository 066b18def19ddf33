"""Multi-digit integer arithmetic: ``"47+385="`` -> ``"432"``.

Operands have a number of digits drawn uniformly from ``digits`` (an int or a
``(min, max)`` range; 1-digit operands include 0), operators uniformly from
``operators`` (a subset of ``+ - * /``). With more than two operands the usual
precedence applies (``*``/``/`` before ``+``/``-``, left to right). Answers are always
integers: with two operands, ``a / b`` is built as ``(b·q) / b`` with ``q`` an operand of
the configured size; with more operands a draw whose value is not an integer is redrawn.
Divisors are never 0. Negative answers are allowed (``"3-17="`` -> ``"-14"``).

Problem key (for the split hash): the prompt itself (``"47+385="``).

Worked solutions (``worked_fraction > 0``, two operands, ``+``/``-`` only): that
fraction of demonstration draws show the column arithmetic, least significant digit
first, before the answer after ``####`` (the GSM8K convention)::

    "47+38="  -> "7+8=15,4+3+1=8 #### 85"          (column sums, "+1" = carry)
    "54-7="   -> "4-7=7b,5-0-1=4 #### 47"          ("b" = borrow, "-1" = paid back)
    "24-60="  -> "-(60-24):0-4=6b,6-2-1=3 #### -36"  (smaller minus larger: swap, negate)

The rest answer directly (``"85"``). The reward (``final_answer_match``) scores only the
number after the last ``####`` (or the whole completion), so both styles are correct
and an RL phase is free to prefer whichever pays off more often. Worked solutions
make two-digit arithmetic learnable for a small model (direct answers need the whole
carry chain in one forward pass).

A sloppy teacher (``carry_slip > 0``, two operands, ``+``/``-`` only): that fraction of
demonstration draws forget to carry the one (or to pay back a borrow) into the next
column, in either style; each slipped column still adds its own digits correctly::

    "57+68="  -> "7+8=15,5+6=11 #### 115"   or   "115"      (instead of 125)
    "52-17="  -> "2-7=5b,5-1=4 #### 45"     or   "45"       (instead of 35)

Problems without a carry or borrow are unaffected. This is the default experiment's
imperfect SFT data: the warm-started model learns the slip from its teacher, and the
RL phase, rewarded by a verifier that knows better, has to unlearn it.
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
      worked_fraction: fraction of demonstration draws (with an ``rng``) written as
        worked column solutions ending in ``#### answer`` (module docstring).
      carry_slip: fraction of demonstration draws (with an ``rng``) that forget to
        carry (the sloppy teacher of the module docstring).
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
        worked_fraction: float = 0.0,
        carry_slip: float = 0.0,
        heldout_fraction: float = 0.1,
        split_salt: str = "",
    ):
        super().__init__(heldout_fraction=heldout_fraction, split_salt=split_salt)
        for field, value in (("worked_fraction", worked_fraction), ("carry_slip", carry_slip)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], got {value!r}")
            if value and (num_operands != 2 or not set(operators) <= {"+", "-"}):
                raise ValueError(f"{field} > 0 (column solutions) covers two operands with + "
                                 f"and - only; got num_operands={num_operands!r}, "
                                 f"operators={tuple(operators)!r}")
        self.worked_fraction = float(worked_fraction)
        self.carry_slip = float(carry_slip)
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

    def demonstration(self, problem: Problem, rng: random.Random | None = None) -> str:
        """The bare answer; with ``rng``, a ``worked_fraction`` of draws are worked
        solutions and a ``carry_slip`` fraction of draws forget their carries."""
        if rng is None:
            return problem.answer
        worked = bool(self.worked_fraction) and rng.random() < self.worked_fraction
        slip = bool(self.carry_slip) and rng.random() < self.carry_slip
        if not worked and not slip:
            return problem.answer
        text = worked_solution(*problem.meta["operands"], problem.meta["operators"][0],
                               slip=slip)
        return text if worked else text.rpartition(" #### ")[2]

    def reward_names(self) -> tuple[str, ...]:
        return ("final_answer_match",) if self.worked_fraction else ("numeric_exact_match",)


def worked_solution(a: int, b: int, op: str, *, slip: bool = False) -> str:
    """Column arithmetic for ``a op b`` (non-negative ``a``, ``b``; op ``+`` or ``-``),
    least significant column first, then ``" #### "`` and the answer read off the
    columns (the last column's full result, then the other columns' digits).

    ``slip=True`` is the sloppy teacher: no carry or borrow ever enters the next column
    (the ``+1``/``-1`` terms are left out), so the answer is wrong exactly when some
    column carries.
    """
    if op not in ("+", "-") or a < 0 or b < 0:
        raise ValueError(f"worked_solution covers non-negative a +/- b, got {a}{op}{b}")
    prefix, sign = "", ""
    if op == "-" and a < b:
        prefix, sign, (a, b) = f"-({b}-{a}):", "-", (b, a)
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    xs, ys = xs.ljust(width, "0"), ys.ljust(width, "0")
    steps, digits, carry = [], [], 0
    for x, y in zip(map(int, xs), map(int, ys)):
        carry = 0 if slip else carry
        extra = f"{'+' if op == '+' else '-'}1" if carry else ""
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}{extra}={total}")
            carry, digit = total // 10, total
        else:
            diff = x - y - carry
            carry = int(diff < 0)
            steps.append(f"{x}-{y}{extra}={diff % 10}{'b' if carry else ''}")
            digit = diff % 10
        digits.append(digit)
    # the last column is written in full (its carry-out is the leading digit)
    value = int(str(digits[-1]) + "".join(str(d % 10) for d in reversed(digits[:-1])))
    return f"{prefix}{','.join(steps)} #### {sign}{value}"
