"""Synthetic preference pairs from verifiable tasks (``rlx.recipes.preference_data``)."""

import random

import pytest

from rlx.recipes import preference_data as pd
from rlx.tasks import get_task

TASKS = [("arithmetic", {"digits": (1, 3)}), ("countdown", {}), ("sorting", {})]


@pytest.mark.parametrize("name,kwargs", TASKS)
def test_chosen_is_verified_correct_and_rejected_verified_wrong(name, kwargs):
    task = get_task(name, **kwargs)
    problems = task.train(30, seed=1)
    pairs = pd.make_preference_pairs(task, problems, rng=random.Random(0), pairs_per_problem=2)
    assert len(pairs) >= 40
    spec = task.reward_spec()
    for p in pairs:
        q = p.meta["problem"]
        assert p.prompt == q.prompt and p.chosen == task.demonstration(q)
        assert spec.score(p.chosen, q)[0] == 1.0
        assert spec.score(p.rejected, q)[0] == 0.0, (p.prompt, p.rejected)
    per_problem = {}
    for p in pairs:
        per_problem.setdefault(p.prompt, []).append(p.rejected)
    assert all(len(set(r)) == len(r) for r in per_problem.values())   # distinct rejects
    again = pd.make_preference_pairs(task, problems, rng=random.Random(0), pairs_per_problem=2)
    assert [(p.prompt, p.rejected) for p in again] == [(p.prompt, p.rejected) for p in pairs]


def test_corruption_kinds_make_the_documented_edits():
    rng = random.Random(0)
    for _ in range(50):
        out = pd.corrupt("x 40 y", "offset", rng)
        assert out.startswith("x ") and out.endswith(" y")
        assert 1 <= abs(int(out[2:-2]) - 40) <= 3
    assert pd.corrupt("123", "digit_swap", rng) in ("213", "132")
    assert pd.corrupt("77", "digit_swap", rng) is None        # nothing differs to swap
    assert pd.corrupt("1 2", "number_swap", rng) == "2 1"
    assert pd.corrupt("5 5", "number_swap", rng) is None
    assert pd.corrupt("56", "format", rng) in ("5", "6", "5656")
    for kind in pd.CORRUPTIONS:
        assert pd.corrupt("no digits", kind, rng) is None
    with pytest.raises(ValueError, match="corruption kind 'typo'"):
        pd.corrupt("1", "typo", rng)
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="corruptions=.*typo"):
        pd.make_preference_pairs(task, task.train(2), rng=rng, corruptions=("typo",))
    with pytest.raises(ValueError, match="pairs_per_problem must be >= 1"):
        pd.make_preference_pairs(task, task.train(2), rng=rng, pairs_per_problem=0)


def test_problem_whose_demonstration_fails_the_verifier_is_skipped():
    from rlx.tasks import Problem

    class BadData:                         # e.g. a user file with a wrong answer field
        reward_spec = get_task("arithmetic").reward_spec

        def demonstration(self, q, rng=None):
            return q.meta["written"]

    bad = Problem("1+1=", "2", {"written": "3"})
    good = Problem("1+2=", "3", {"written": "3"})
    pairs = pd.make_preference_pairs(BadData(), [bad, good], rng=random.Random(0))
    assert {p.prompt for p in pairs} == {"1+2="}
