"""Numeric exact match, format reward and sorting checker."""

# A generous bound: catches super-linear blow-ups (regex backtracking, huge ints)
# without flaking on a loaded 2-core CI machine.
LIMIT_S = 5.0

import time

import pytest

from rlx.rewards import format_reward, numeric_exact_match, sorting_reward
from rlx.tasks import Problem

ADVERSARIAL = [
    "",
    "9" * 100_000,
    "1" * 1_000_000,
    "٣٤",
    "１２",
    "__import__('os').system('echo hi')",
    "\x00\x01\x02",
    "1 " * 500_000,
    "\n" * 100_000,
]


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    assert time.perf_counter() - start < LIMIT_S
    return out


def test_numeric_exact_match_accepts_only_the_exact_number():
    p = Problem("12+30=", "42", {})
    assert numeric_exact_match("42", p) == 1.0
    assert numeric_exact_match(" 42\n", p) == 1.0
    assert numeric_exact_match("42.0", p) == 1.0
    assert numeric_exact_match("43", p) == 0.0
    assert numeric_exact_match("42 is the answer", p) == 0.0
    assert numeric_exact_match("-42", p) == 0.0
    assert numeric_exact_match("1/2", Problem("", "0.5", {})) == 1.0


def test_numeric_exact_match_rejects_a_non_numeric_reference():
    with pytest.raises(ValueError, match="problem.answer 'forty'"):
        numeric_exact_match("40", Problem("", "forty", {}))


@pytest.mark.parametrize("completion", ADVERSARIAL)
def test_numeric_exact_match_adversarial(completion):
    assert _timed(numeric_exact_match, completion, Problem("", "34", {})) == 0.0


def test_format_reward_fullmatches_the_stripped_completion():
    p = Problem("", "", {})
    assert format_reward(" 123 ", p, pattern=r"-?[0-9]+") == 1.0
    assert format_reward("12a", p, pattern=r"-?[0-9]+") == 0.0
    assert format_reward("١٢", p, pattern=r"[\d]+") == 0.0  # ASCII classes
    assert format_reward("1" * 20_000, p, pattern=r"[0-9]+") == 0.0  # over max_chars


@pytest.mark.parametrize("completion", ADVERSARIAL)
def test_format_reward_adversarial(completion):
    assert _timed(format_reward, completion, Problem("", "", {}), pattern=r"[0-9]+( [0-9]+)*") in (0.0, 1.0)


def test_sorting_reward_checks_order_and_values():
    p = Problem("Sort 34 2 17:", "2 17 34", {})
    assert sorting_reward("2 17 34", p) == 1.0
    assert sorting_reward("2, 17, 34\nbecause...", p) == 1.0
    assert sorting_reward("2 34 17", p) == 0.0
    assert sorting_reward("2 17", p) == 0.0
    assert sorting_reward("2 17 34 34", p) == 0.0
    assert sorting_reward("sorted: 2 17 34", p) == 0.0


@pytest.mark.parametrize("completion", ADVERSARIAL)
def test_sorting_reward_adversarial(completion):
    assert _timed(sorting_reward, completion, Problem("", "2 17 34", {})) == 0.0


def test_final_answer_match_reads_the_number_after_the_last_marker():
    from rlx.rewards import final_answer_match
    p = Problem("47+38=", "85", {})
    assert final_answer_match("7+8=15,4+3+1=8 #### 85", p) == 1.0
    assert final_answer_match("85", p) == 1.0                      # direct style
    assert final_answer_match(" 85 \n", p) == 1.0
    assert final_answer_match("7+8=15 #### 84", p) == 0.0
    assert final_answer_match("#### 84 #### 85", p) == 1.0         # the last marker counts
    assert final_answer_match("#### 85 #### 84", p) == 0.0
    assert final_answer_match("work #### 85 and more", p) == 0.0   # one number only
    assert final_answer_match("7+8=15,4+3+1=8 85", p) == 0.0       # no marker: whole text
    assert final_answer_match("####", p) == 0.0
    assert final_answer_match("-(60-24):0-4=6b,6-2-1=3 #### -36", Problem("24-60=", "-36", {})) == 1.0


def test_final_answer_match_rejects_a_non_numeric_reference():
    from rlx.rewards import final_answer_match
    with pytest.raises(ValueError, match="problem.answer 'forty'"):
        final_answer_match("40", Problem("", "forty", {}))


@pytest.mark.parametrize("completion", ADVERSARIAL + ["#### " + "9" * 100_000, "####" * 200_000,
                                                      "#### ٣٤", "1+2=3 ####\n\n"])
def test_final_answer_match_adversarial(completion):
    from rlx.rewards import final_answer_match
    assert _timed(final_answer_match, completion, Problem("", "34", {})) == 0.0
