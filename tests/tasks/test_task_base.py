"""Split and determinism properties shared by every registered task."""

import pytest

from rlx.tasks import ArithmeticTask, Problem, available_tasks, get_task

SMALL = {
    "arithmetic": {"digits": 2, "operators": ("+", "-", "*", "/")},
    "countdown": {"num_numbers": 3, "max_number": 12},
    "sorting": {"length": (2, 4), "max_value": 30},
}


@pytest.fixture(params=sorted(SMALL))
def task(request):
    return get_task(request.param, **SMALL[request.param])


def test_every_registered_task_is_covered():
    assert set(available_tasks()) == set(SMALL)


def test_train_and_heldout_never_share_a_problem(task):
    train = {task.key(p) for p in task.train(400, seed=0)}
    heldout = {task.key(p) for p in task.heldout(60, seed=0)}
    assert train and heldout and not train & heldout


def test_splits_hold_problems_of_their_own_split_only(task):
    assert all(task.split_of(p) == "train" for p in task.train(100, seed=3))
    assert all(task.split_of(p) == "heldout" for p in task.heldout(30, seed=3))


def test_generation_is_deterministic_in_the_seed(task):
    assert task.train(50, seed=7) == task.train(50, seed=7)
    assert task.heldout(20, seed=7) == get_task(task.name, **SMALL[task.name]).heldout(20, seed=7)
    assert task.train(50, seed=7) != task.train(50, seed=8)


def test_split_membership_does_not_depend_on_the_seed(task):
    a = {task.key(p) for p in task.heldout(40, seed=1)}
    b = {task.key(p) for p in task.train(400, seed=2)}
    assert not a & b


def test_unique_generation_has_distinct_keys(task):
    keys = [task.key(p) for p in task.train(200, seed=0)]
    assert len(keys) == len(set(keys))


def test_heldout_fraction_is_the_share_of_the_problem_space(task):
    import random

    rng = random.Random(0)
    draws = [task.sample(rng) for _ in range(3000)]
    share = sum(task.split_of(p) == "heldout" for p in draws) / len(draws)
    assert abs(share - task.heldout_fraction) < 0.04


def test_split_salt_changes_the_partition(task):
    salted = get_task(task.name, split_salt="other", **SMALL[task.name])
    import random

    rng = random.Random(1)
    draws = [task.sample(rng) for _ in range(500)]
    assert [task.split_of(p) for p in draws] != [salted.split_of(p) for p in draws]


def test_demonstration_earns_full_reward_and_is_well_formed(task):
    spec = task.reward_spec(format_weight=0.5)
    for p in task.train(50, seed=0) + task.heldout(10, seed=0):
        demo = task.demonstration(p)
        total, parts = spec.score(demo, p)
        assert parts.tolist() == [1.0, 1.0], (p, demo)
        assert total == 1.5
        assert task.is_well_formed(demo)


def test_problem_is_frozen_and_hashable():
    p = Problem("1+1=", "2", {"x": 1})
    with pytest.raises(AttributeError):
        p.answer = "3"
    assert hash(p) == hash(Problem("1+1=", "2", {"y": 2}))


def test_too_small_split_raises_instead_of_looping():
    task = ArithmeticTask(digits=1, operators=("+",), heldout_fraction=0.1)
    # 100 problems in the whole space, about 90 of them in the train split.
    with pytest.raises(ValueError, match="fewer than n=100 distinct"):
        task.train(100)
    assert len(task.train(80)) == 80


def test_unknown_split_and_bad_fraction_are_rejected():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="split must be one of"):
        task.generate("validation", 3)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ArithmeticTask(heldout_fraction=1.0)
