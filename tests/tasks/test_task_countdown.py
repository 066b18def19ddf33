"""Countdown instances are solvable and their reference solutions are right, checked by
an independent brute-force solver."""

import functools
import re
from collections import Counter
from fractions import Fraction

import pytest

from rlx.tasks import CountdownTask


@functools.lru_cache(maxsize=None)
def _reachable(nums: tuple) -> frozenset:
    """Every value of an expression using each number of ``nums`` exactly once
    (any tree, any of + - * /, rationals and negatives allowed)."""
    if len(nums) == 1:
        return frozenset({Fraction(nums[0])})
    out = set()
    n = len(nums)
    for mask in range(1, 2**n - 1):
        left = tuple(sorted(nums[i] for i in range(n) if mask >> i & 1))
        right = tuple(sorted(nums[i] for i in range(n) if not mask >> i & 1))
        for a in _reachable(left):
            for b in _reachable(right):
                out.update({a + b, a - b, a * b})
                if b:
                    out.add(a / b)
    return frozenset(out)


def _solvable(numbers, target, *, use_all: bool) -> bool:
    n = len(numbers)
    masks = [2**n - 1] if use_all else range(1, 2**n)
    for mask in masks:
        subset = tuple(sorted(numbers[i] for i in range(n) if mask >> i & 1))
        if Fraction(target) in _reachable(subset):
            return True
    return False


def _check_solution(solution: str, numbers, target, *, use_all: bool):
    assert re.fullmatch(r"[0-9+\-*/()]+", solution), solution
    used = Counter(int(t) for t in re.findall(r"[0-9]+", solution))
    given = Counter(numbers)
    assert used == given if use_all else all(used[k] <= given[k] for k in used)
    # Our own generated text of digits, operators and parentheses: safe to evaluate.
    value = eval(solution, {"__builtins__": {}})  # noqa: S307
    assert abs(value - target) < 1e-9


@pytest.mark.parametrize(
    "config",
    [
        {"num_numbers": 3, "max_number": 20},
        {"num_numbers": 4, "max_number": 30, "max_target": 200},
        {"num_numbers": 3, "max_number": 15, "use_all_numbers": True},
    ],
)
def test_instances_are_solvable_and_reference_solutions_correct(config):
    task = CountdownTask(**config)
    use_all = task.use_all_numbers
    for p in task.train(40, seed=0) + task.heldout(8, seed=0):
        numbers, target = list(p.meta["numbers"]), p.meta["target"]
        assert p.answer == str(target)
        assert task.min_target <= target <= task.max_target and target not in numbers
        assert all(task.min_number <= x <= task.max_number for x in numbers)
        assert p.prompt == f"Use {' '.join(map(str, numbers))} to make {target}:"
        _check_solution(p.meta["solution"], numbers, target, use_all=use_all)
        assert _solvable(tuple(numbers), target, use_all=use_all)


def test_key_ignores_number_order():
    task = CountdownTask()
    p = task.train(1)[0]
    q = type(p)(p.prompt, p.answer, {**p.meta, "numbers": tuple(reversed(p.meta["numbers"]))})
    assert task.key(p) == task.key(q) and task.split_of(p) == task.split_of(q)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_numbers": 1}, "num_numbers"),
        ({"min_number": 0}, "min_number"),
        ({"min_target": 10, "max_target": 5}, "max_target"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CountdownTask(**kwargs)
