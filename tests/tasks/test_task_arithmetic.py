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


# ------------------------------------------------------------ worked solutions
_ADD_STEP = re.compile(r"([0-9])\+([0-9])(\+1)?=([0-9]+)")
_SUB_STEP = re.compile(r"([0-9])-([0-9])(-1)?=([0-9])(b?)")


def _check_columns(a: int, b: int, op: str, text: str, slip: bool = False) -> int:
    """Re-derives every column of a worked solution independently (with ``slip``, no
    carry enters the next column); returns its answer."""
    head, marker, answer = text.partition(" #### ")
    assert marker, text
    negate = head.startswith("-(")
    if negate:
        swap, head = head.split(":", 1)
        assert op == "-" and a < b and swap == f"-({b}-{a})", text
        a, b = b, a
    digits_a = [int(c) for c in reversed(str(a))]
    digits_b = [int(c) for c in reversed(str(b))]
    width = max(len(digits_a), len(digits_b))
    digits_a += [0] * (width - len(digits_a))
    digits_b += [0] * (width - len(digits_b))
    steps = head.split(",")
    assert len(steps) == width, text
    carry, result_digits = 0, []
    for x, y, step in zip(digits_a, digits_b, steps):
        carry = 0 if slip else carry
        m = (_ADD_STEP if op == "+" else _SUB_STEP).fullmatch(step)
        assert m, (text, step)
        assert (int(m[1]), int(m[2]), bool(m[3])) == (x, y, bool(carry)), (text, step)
        if op == "+":
            total = x + y + carry
            assert int(m[4]) == total, (text, step)
            carry, digit = total // 10, total % 10
            top = total
        else:
            raw = x - y - carry
            assert int(m[4]) == raw % 10 and bool(m[5]) == (raw < 0), (text, step)
            carry, digit = int(raw < 0), raw % 10
        result_digits.append(digit)
    if op == "+":
        result_digits[-1] = top                                 # written in full
    assert op == "+" or carry == 0, text                       # no borrow left over
    column_value = int("".join(map(str, reversed(result_digits))))
    value = int(answer)
    assert value == (-column_value if negate else column_value), text
    return value


@pytest.mark.parametrize("op", ["+", "-"])
def test_worked_solution_columns_and_answer_are_correct(op):
    import random

    from rlx.tasks.arithmetic import worked_solution
    rng = random.Random(3)
    cases = [(0, 0), (9, 1), (99, 1), (10, 99), (5, 5), (100, 1), (47, 38), (54, 7), (24, 60)]
    cases += [(rng.randrange(10 ** rng.randint(1, 6)), rng.randrange(10 ** rng.randint(1, 6)))
              for _ in range(400)]
    for a, b in cases:
        text = worked_solution(a, b, op)
        assert _check_columns(a, b, op, text) == (a + b if op == "+" else a - b), text


def test_worked_solution_examples_from_the_docstring():
    from rlx.tasks.arithmetic import worked_solution
    assert worked_solution(47, 38, "+") == "7+8=15,4+3+1=8 #### 85"
    assert worked_solution(54, 7, "-") == "4-7=7b,5-0-1=4 #### 47"
    assert worked_solution(24, 60, "-") == "-(60-24):0-4=6b,6-2-1=3 #### -36"


def test_worked_solution_rejects_what_it_does_not_cover():
    from rlx.tasks.arithmetic import worked_solution
    for args in ((3, 4, "*"), (-3, 4, "+"), (3, -4, "-")):
        with pytest.raises(ValueError, match="worked_solution"):
            worked_solution(*args)


@pytest.mark.parametrize(
    "kwargs",
    [{"worked_fraction": 1.5}, {"worked_fraction": -0.1},
     {"worked_fraction": 0.5, "operators": ("+", "*")},
     {"worked_fraction": 0.5, "num_operands": 3}],
)
def test_bad_worked_fraction_config_names_the_field(kwargs):
    with pytest.raises(ValueError, match="worked_fraction"):
        ArithmeticTask(**kwargs)


def test_demonstration_mixes_styles_in_the_configured_fraction():
    import random

    from rlx.rewards import final_answer_match
    task = ArithmeticTask(digits=(1, 2), operators=("+", "-"), worked_fraction=0.3)
    rng = random.Random(0)
    problems = task.train(400, seed=0)
    demos = [task.demonstration(p, rng) for p in problems for _ in range(5)]
    worked = [d for d in demos if "####" in d]
    assert 0.25 < len(worked) / len(demos) < 0.35
    # every demonstration, in either style, earns the task's reward
    assert task.reward_names() == ("final_answer_match",)
    for p, d in zip([p for p in problems for _ in range(5)], demos):
        assert final_answer_match(d, p) == 1.0, (p, d)
    # without an rng (or with fraction 0) the bare answer, as before
    assert all(task.demonstration(p) == p.answer for p in problems[:50])
    plain = ArithmeticTask(digits=(1, 2), operators=("+", "-"))
    assert all(plain.demonstration(p, rng) == p.answer for p in problems[:50])
    assert plain.reward_names() == ("numeric_exact_match",)


# ------------------------------------------------------------ the sloppy teacher
def _has_carry(a: int, b: int, op: str) -> bool:
    big, small = max(a, b), min(a, b)
    width = len(str(big))
    if op == "+":
        return any(big % 10 ** (k + 1) + small % 10 ** (k + 1) >= 10 ** (k + 1)
                   for k in range(width - 1))
    return any(big % 10 ** (k + 1) < small % 10 ** (k + 1) for k in range(width))


@pytest.mark.parametrize("op", ["+", "-"])
def test_slipped_solution_drops_every_carry_and_is_wrong_exactly_when_one_occurs(op):
    import random

    from rlx.tasks.arithmetic import worked_solution
    rng = random.Random(5)
    cases = [(0, 0), (57, 68), (52, 17), (17, 52), (99, 99), (5, 5), (100, 99), (99, 1)]
    cases += [(rng.randrange(10 ** rng.randint(1, 5)), rng.randrange(10 ** rng.randint(1, 5)))
              for _ in range(400)]
    for a, b in cases:
        text = worked_solution(a, b, op, slip=True)
        value = _check_columns(a, b, op, text, slip=True)
        exact = a + b if op == "+" else a - b
        assert (value == exact) == (not _has_carry(a, b, op)), text


def test_carry_slip_demonstrations_are_wrong_only_where_a_carry_was_forgotten():
    import random

    from rlx.tasks.arithmetic import worked_solution
    task = ArithmeticTask(digits=(1, 2), operators=("+", "-"), carry_slip=0.6)
    problems = task.train(500, seed=0)
    rng = random.Random(1)
    carrying = [p for p in problems if _has_carry(*p.meta["operands"], p.meta["operators"][0])]
    assert 0.3 < len(carrying) / len(problems) < 0.7
    demos = [(p, task.demonstration(p, rng)) for p in problems for _ in range(4)]
    for p, d in demos:
        slipped = worked_solution(*p.meta["operands"], p.meta["operators"][0], slip=True)
        assert d in (p.answer, slipped.rpartition(" #### ")[2]), (p, d)
    wrong = [d != p.answer for p, d in demos if p in carrying]
    assert 0.5 < sum(wrong) / len(wrong) < 0.7
    assert all(d == p.answer for p, d in demos if p not in carrying)
    assert all(task.demonstration(p) == p.answer for p in problems)    # no rng: the truth
    assert task.reward_names() == ("numeric_exact_match",)
    worked = ArithmeticTask(digits=(1, 2), operators=("+", "-"), carry_slip=0.6,
                            worked_fraction=1.0)
    texts = [worked.demonstration(p, rng) for p in carrying for _ in range(4)]

    def carried(t):
        steps = t.partition(" #### ")[0].split(":")[-1].split(",")
        return any((_ADD_STEP.fullmatch(x) or _SUB_STEP.fullmatch(x))[3] for x in steps)
    assert 0.5 < sum(not carried(t) for t in texts) / len(texts) < 0.7


@pytest.mark.parametrize("kwargs", [{"carry_slip": 2.0}, {"carry_slip": 0.5, "operators": ("*",)},
                                    {"carry_slip": 0.5, "num_operands": 3}])
def test_bad_carry_slip_config_names_the_field(kwargs):
    with pytest.raises(ValueError, match="carry_slip"):
        ArithmeticTask(**kwargs)
