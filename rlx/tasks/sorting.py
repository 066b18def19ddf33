"""Sorting short lists of integers: ``"Sort 34 2 17:"`` -> ``"2 17 34"``.

Chosen as the third task (over word problems) because its answer is checkable exactly,
its difficulty is tuned by list length and value range, and its completions are short.
Lists have a length drawn uniformly from ``length`` (int or ``(min, max)``) and values
uniformly from ``[0, max_value]`` (duplicates allowed). ``descending=True`` asks for
the reverse order (the prompt then reads ``"Sort down ...:"``).

Problem key (for the split hash): the sorted values, so held-out problems are unseen
multisets, not merely unseen orderings of training lists.
"""

from __future__ import annotations

import random

import gin

from rlx.tasks.base import Problem, Task, parse_range


@gin.configurable(module="rlx.tasks")
class SortingTask(Task):
    """Sort a short list of non-negative integers.

    Args:
      length: list length, an int or ``(min, max)`` (>= 2).
      max_value: largest value (values are in ``[0, max_value]``).
      descending: sort in decreasing order.
      heldout_fraction, split_salt: see ``Task``.
    """

    name = "sorting"
    format_pattern = r"[0-9]+( [0-9]+)*"

    def __init__(
        self,
        *,
        length: int | tuple[int, int] = (3, 5),
        max_value: int = 99,
        descending: bool = False,
        heldout_fraction: float = 0.1,
        split_salt: str = "",
    ):
        super().__init__(heldout_fraction=heldout_fraction, split_salt=split_salt)
        self.length = parse_range(length, "length", low=2)
        if max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {max_value!r}")
        self.max_value = int(max_value)
        self.descending = bool(descending)

    def sample(self, rng: random.Random) -> Problem:
        n = rng.randint(*self.length)
        values = tuple(rng.randint(0, self.max_value) for _ in range(n))
        ordered = sorted(values, reverse=self.descending)
        verb = "Sort down" if self.descending else "Sort"
        return Problem(
            prompt=f"{verb} {' '.join(map(str, values))}:",
            answer=" ".join(map(str, ordered)),
            meta={"task": self.name, "values": values, "descending": self.descending},
        )

    def key(self, problem: Problem) -> str:
        return f"{int(problem.meta['descending'])}|{' '.join(map(str, sorted(problem.meta['values'])))}"

    def demonstration(self, problem: Problem, rng: random.Random | None = None) -> str:
        return problem.answer

    def reward_names(self) -> tuple[str, ...]:
        return ("sorting",)
