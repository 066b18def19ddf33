"""Sorting answers are correct by construction."""

import pytest

from rlx.tasks import SortingTask


@pytest.mark.parametrize("descending", [False, True])
def test_answer_is_the_sorted_list(descending):
    task = SortingTask(length=(2, 6), max_value=50, descending=descending)
    for p in task.train(200, seed=0):
        values = [int(t) for t in p.prompt.rstrip(":").split()[2 if descending else 1 :]]
        assert values == list(p.meta["values"])
        assert [int(t) for t in p.answer.split()] == sorted(values, reverse=descending)
        assert 2 <= len(values) <= 6 and all(0 <= v <= 50 for v in values)


def test_heldout_multisets_are_unseen_in_training():
    task = SortingTask(length=3, max_value=9)
    train = {tuple(sorted(p.meta["values"])) for p in task.train(150, seed=0)}
    heldout = {tuple(sorted(p.meta["values"])) for p in task.heldout(20, seed=0)}
    assert not train & heldout


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="length"):
        SortingTask(length=1)
    with pytest.raises(ValueError, match="max_value"):
        SortingTask(max_value=0)
