"""Countdown: reach a target with given numbers and ``+ - * /``.

Prompt ``"Use 3 7 25 to make 46:"``, demonstration (a reference solution) ``"25+3*7"``.

Rules (checked by ``rlx.rewards.countdown``): each given number may be used **at most
once** (a number listed twice may be used twice); by default not every number has to
be used. DAPO / TinyZero require each number *exactly* once; we default to "at most
once" because it keeps every generated instance solvable by a short expression, which
a tiny model can learn on CPU. Pass ``use_all_numbers=True`` here and to the reward
for the TinyZero rule.

Generation (only solvable instances): draw ``num_numbers`` integers in
``[min_number, max_number]``, pick ``k`` of them (``k`` uniform in ``[2, n]``, or
``k = n`` with ``use_all_numbers``), and combine random pairs with random operators
until one value remains, keeping every intermediate value a non-negative integer
(``a - b`` with ``a >= b``; ``a / b`` only when ``b`` divides ``a``). The final value is
the target; draws with a target outside ``[min_target, max_target]`` or equal to one of
the given numbers are redrawn. The combination tree, printed with minimal parentheses,
is the reference solution (``meta["solution"]``).

Problem key (for the split hash): sorted numbers and target, so the same instance in a
different order is the same problem.
"""

from __future__ import annotations

import random

import gin

from rlx.tasks.base import Problem, Task

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _wrap(expr: str, prec: int, need: int, strict: bool) -> str:
    """Parenthesises a sub-expression of precedence ``prec`` under an operator needing ``need``."""
    if prec < need or (strict and prec == need):
        return f"({expr})"
    return expr


def combine(a: tuple[int, str, int], b: tuple[int, str, int], op: str) -> tuple[int, str, int] | None:
    """Combines ``(value, text, precedence)`` nodes; None unless the result is a
    non-negative integer (so ``a - b`` needs ``a >= b`` and ``a / b`` needs ``b | a``)."""
    va, ta, pa = a
    vb, tb, pb = b
    if op == "+":
        v = va + vb
    elif op == "-":
        if va < vb:
            return None
        v = va - vb
    elif op == "*":
        v = va * vb
    else:
        if vb == 0 or va % vb:
            return None
        v = va // vb
    p = _PREC[op]
    text = _wrap(ta, pa, p, False) + op + _wrap(tb, pb, p, op in "-/")
    return v, text, p


@gin.configurable(module="rlx.tasks")
class CountdownTask(Task):
    """Countdown instances with a reference solution.

    Args:
      num_numbers: how many numbers are given (>= 2).
      min_number, max_number: range of the given numbers (>= 1).
      min_target, max_target: range of the target.
      use_all_numbers: generate solutions that use every number (the TinyZero rule).
      heldout_fraction, split_salt: see ``Task``.
    """

    name = "countdown"
    format_pattern = r"[0-9+\-*/() ]+(=\s*-?[0-9]+)?"

    def __init__(
        self,
        *,
        num_numbers: int = 3,
        min_number: int = 1,
        max_number: int = 20,
        min_target: int = 1,
        max_target: int = 100,
        use_all_numbers: bool = False,
        heldout_fraction: float = 0.1,
        split_salt: str = "",
    ):
        super().__init__(heldout_fraction=heldout_fraction, split_salt=split_salt)
        if not 2 <= num_numbers <= 8:
            raise ValueError(f"num_numbers must be in [2, 8], got {num_numbers!r}")
        if not 1 <= min_number <= max_number:
            raise ValueError(
                f"need 1 <= min_number <= max_number, got min_number={min_number!r}, "
                f"max_number={max_number!r}"
            )
        if not 0 <= min_target <= max_target:
            raise ValueError(
                f"need 0 <= min_target <= max_target, got min_target={min_target!r}, "
                f"max_target={max_target!r}"
            )
        self.num_numbers = int(num_numbers)
        self.min_number, self.max_number = int(min_number), int(max_number)
        self.min_target, self.max_target = int(min_target), int(max_target)
        self.use_all_numbers = bool(use_all_numbers)

    def sample(self, rng: random.Random) -> Problem:
        for _ in range(100_000):
            nums = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            k = self.num_numbers if self.use_all_numbers else rng.randint(2, self.num_numbers)
            nodes = [(v, str(v), 3) for v in rng.sample(nums, k)]
            while len(nodes) > 1:
                i, j = rng.sample(range(len(nodes)), 2)
                ops = ["+", "-", "*", "/"]
                rng.shuffle(ops)
                for op in ops:
                    node = combine(nodes[i], nodes[j], op) or combine(nodes[j], nodes[i], op)
                    if node is not None:
                        break
                # "+" always succeeds, so node is set.
                nodes = [n for t, n in enumerate(nodes) if t not in (i, j)] + [node]
            target, solution, _ = nodes[0]
            if self.min_target <= target <= self.max_target and target not in nums:
                return Problem(
                    prompt=f"Use {' '.join(map(str, nums))} to make {target}:",
                    answer=str(target),
                    meta={
                        "task": self.name,
                        "numbers": tuple(nums),
                        "target": target,
                        "solution": solution,
                        "use_all_numbers": self.use_all_numbers,
                    },
                )
        raise ValueError(  # pragma: no cover - needs an empty target range
            f"no Countdown instance with a target in [{self.min_target}, {self.max_target}] "
            "found in 100000 draws"
        )

    def key(self, problem: Problem) -> str:
        nums = sorted(problem.meta["numbers"])
        return f"{' '.join(map(str, nums))}->{problem.meta['target']}"

    def demonstration(self, problem: Problem, rng: random.Random | None = None) -> str:
        return problem.meta["solution"]

    def reward_names(self) -> tuple[str, ...]:
        return ("countdown",)
