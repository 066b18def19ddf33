"""Countdown checker: exact arithmetic, the at-most-once rule, and hostile input."""

# A generous bound: catches super-linear blow-ups (regex backtracking, huge ints)
# without flaking on a loaded 2-core CI machine.
LIMIT_S = 5.0

import time
from fractions import Fraction

import pytest

from rlx.rewards.countdown import ExpressionError, countdown_reward, evaluate_expression, extract_expression
from rlx.tasks import Problem


def _problem(numbers, target, use_all=False):
    return Problem("", str(target), {"numbers": tuple(numbers), "target": target, "use_all_numbers": use_all})


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    assert time.perf_counter() - start < LIMIT_S
    return out


def test_correct_expression_scores_one():
    p = _problem([3, 7, 25], 46)
    assert countdown_reward("25+3*7", p) == 1.0
    assert countdown_reward("(25 + 3 * 7) = 46", p) == 1.0
    assert countdown_reward("think...<answer>3*7+25</answer>", p) == 1.0


def test_wrong_value_scores_zero_even_if_the_stated_value_is_right():
    p = _problem([3, 7, 25], 46)
    assert countdown_reward("25+3+7", p) == 0.0
    assert countdown_reward("25+3+7 = 46", p) == 0.0


def test_each_number_at_most_once_by_default():
    p = _problem([3, 7, 25], 10)
    assert countdown_reward("3+7", p) == 1.0  # 25 unused: allowed
    assert countdown_reward("7+3", _problem([3, 7, 25], 10, use_all=True)) == 0.0
    assert countdown_reward("3+3+3+1", p) == 0.0  # 3 reused, 1 not given
    assert countdown_reward("5+5", _problem([5, 5, 1], 10)) == 1.0  # duplicates count


def test_use_all_numbers_requires_exactly_once():
    p = _problem([2, 3, 4], 20, use_all=True)
    assert countdown_reward("(2+3)*4", p) == 1.0
    assert countdown_reward("(2+3)*4", _problem([2, 3, 4, 1], 20, use_all=True)) == 0.0
    assert countdown_reward("(2+3)*4", _problem([2, 3, 4, 1], 20), use_all_numbers=True) == 0.0


def test_division_is_exact_rational_arithmetic():
    assert countdown_reward("4/3*6", _problem([4, 3, 6], 8)) == 1.0
    value, used = evaluate_expression("7/2*2")
    assert value == Fraction(7) and used == [7, 2, 2]
    assert countdown_reward("6/0", _problem([6, 0], 1)) == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/rlx_pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "2**10",
        "9**9**9**9",
        "7//2",
        "-3+5",
        "1e3",
        "0x10",
        "1_000",
        "1.5*2",
        "٣+٤",
        "１+２",
        "lambda: 1",
        "",
        "   ",
        "(" * 100 + "1" + ")" * 100,
        "+".join(["1"] * 60),
        "99999999*99999999*99999999",
        "1" * 150,
    ],
)
def test_hostile_or_disallowed_expressions_are_rejected_quickly(text):
    with pytest.raises(ExpressionError):
        _timed(evaluate_expression, text)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "\n\n\n",
        "(" * 100_000 + "1" + ")" * 100_000,
        "1+" * 500_000 + "1",
        "9" * 100_000,
        "<answer>" * 100_000,
        "<answer>" * 50_000 + "1</answer>" * 50_000,
        "x" * 1_000_000,
        "__import__('os')",
    ],
)
def test_adversarial_completions_score_zero_within_a_second(completion):
    assert _timed(countdown_reward, completion, _problem([3, 7, 25], 46)) == 0.0


def test_no_side_effects_from_injection(tmp_path):
    marker = tmp_path / "pwned"
    countdown_reward(f"__import__('pathlib').Path('{marker}').touch()", _problem([1], 1))
    assert not marker.exists()


def test_extract_expression_takes_answer_tag_else_first_line():
    assert extract_expression("a<answer>1+2</answer>b<answer>3*4 = 12</answer>") == "3*4"
    assert extract_expression("\n  5+6 = 11\nmore text") == "5+6"
