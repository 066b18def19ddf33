"""Arithmetic answers are correct by construction (checked independently)."""

import math
import re

import pytest

from rlx.tasks import ArithmeticTask

_EXPR = re.compile(r"[0-9]+(?:[-+*/][0-9]+)+=")


def _independent_value(prompt: str) -> float:
    # The prompt is our own generated text, checked against a digits-and-operators
    # pattern first, so evaluating it in the test is safe; Python's float arithmetic
    # is an independent implementation of the precedence rules.
    assert _EXPR.fullmatch(prompt), prompt
    return eval(prompt[:-1], {"__builtins__": {}})  # noqa: S307


@pytest.mark.parametrize(
    "config",
    [
        {"digits": 2, "operators": ("+", "-")},
        {"digits": (1, 3), "operators": ("+", "-", "*", "/")},
        {"digits": 2, "operators": ("*", "/", "+"), "num_operands": 3},
        {"digits": 4, "operators": ("/",)},
    ],
)
def test_answers_equal_an_independent_evaluation(config):
    task = ArithmeticTask(**config)
    for p in task.train(150, seed=0) + task.heldout(15, seed=0):
        expected = _independent_value(p.prompt)
        assert math.isclose(int(p.answer), expected, rel_tol=1e-12, abs_tol=1e-9), p
        assert len(p.meta["operands"]) == task.num_operands


def test_operand_digits_stay_in_the_configured_range():
    task = ArithmeticTask(digits=(2, 3), operators=("+", "-", "*"))
    for p in task.train(200, seed=1):
        for x in p.meta["operands"]:
            assert 2 <= len(str(x)) <= 3


def test_division_is_exact_and_never_by_zero():
    task = ArithmeticTask(digits=(1, 2), operators=("/",))
    for p in task.train(100, seed=2):
        a, b = p.meta["operands"]
        assert b != 0 and a % b == 0 and int(p.answer) == a // b


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"digits": 0}, "digits"),
        ({"digits": (3, 2)}, "digits"),
        ({"operators": ("^",)}, "operators"),
        ({"operators": ()}, "operators"),
        ({"num_operands": 1}, "num_operands"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArithmeticTask(**kwargs)
