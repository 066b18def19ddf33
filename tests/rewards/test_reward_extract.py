"""Final-answer extraction and bounded number parsing."""

# A generous bound: catches super-linear blow-ups (regex backtracking, huge ints)
# without flaking on a loaded 2-core CI machine.
LIMIT_S = 5.0

import time
from fractions import Fraction

import pytest

from rlx.rewards.extract import extract_answer, extract_boxed, numbers_equal, parse_number


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42),
        ("-3.25", Fraction(-13, 4)),
        (".5", Fraction(1, 2)),
        ("1,234,567", 1234567),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\dfrac{1}{8}", Fraction(-1, 8)),
        ("$12$", 12),
        ("**7**", 7),
        ("1.5e3", 1500),
        ("12.", 12),
    ],
)
def test_parse_number_reads_common_forms_exactly(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "abc", "1/0", "\\frac{1}{0}", "1,23", "٣", "１２", "1e99999", "9" * 100_000, "1.2.3", "x=3"],
)
def test_parse_number_rejects_non_numbers_and_oversized_numbers(text):
    start = time.perf_counter()
    assert parse_number(text) is None
    assert time.perf_counter() - start < LIMIT_S


def test_extract_boxed_handles_nested_braces_and_takes_the_last():
    assert extract_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert extract_boxed(r"\boxed 5$ done") == "5"
    assert extract_boxed(r"\boxed{unclosed {") is None
    assert extract_boxed(r"\boxed{3} then \boxed{broken") == "3"
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"work... \boxed{17}. The answer is 3", "17"),
        ("We get 5 apples.\nAnswer: 12 apples", "12 apples"),
        ("so the answer is 7.", "7"),
        ("steps\n#### 72", "72"),
        ("3 then 4 then -5.5 end", "-5.5"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extract_answer_priority_is_boxed_then_marker_then_last_number(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 50_000,
        "{" * 200_000 + "\\boxed{1",
        "answer: " * 50_000,
        "1" * 200_000,
        "1," * 100_000,
        "x" * 1_000_000,
    ],
)
def test_extraction_is_fast_on_adversarial_text(text):
    start = time.perf_counter()
    parse_number(extract_answer(text))
    assert time.perf_counter() - start < LIMIT_S


def test_numbers_equal_uses_relative_and_absolute_tolerance():
    assert numbers_equal(Fraction(1), Fraction(1000001, 1000000), rel_tol=1e-5, abs_tol=0)
    assert not numbers_equal(Fraction(1), Fraction(1001, 1000), rel_tol=1e-5, abs_tol=0)
    assert numbers_equal(Fraction(0), Fraction(1, 10**12), rel_tol=0, abs_tol=1e-9)
    assert numbers_equal(Fraction(10**300), Fraction(10**300 + 1), rel_tol=1e-9, abs_tol=0)
