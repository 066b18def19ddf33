"""Reward registry and weighted multi-reward specs."""

import math
import pickle

import gin
import numpy as np
import pytest

from rlx.rewards import RewardComponent, RewardSpec, available_rewards, get_reward, register_reward, reward_spec
from rlx.rewards.spec import check_score
from rlx.tasks import Problem


def test_builtin_rewards_are_registered():
    assert {"numeric_exact_match", "math_answer", "countdown", "sorting", "format"} <= set(available_rewards())


def test_unknown_reward_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown reward name 'bleu'.*countdown"):
        get_reward("bleu")


def test_spec_scores_components_and_weighted_total():
    spec = reward_spec(("numeric_exact_match", "format"), (1.0, 0.25), {"format": {"pattern": "[0-9]+"}})
    p = Problem("2+2=", "4", {})
    total, parts = spec.score("4", p)
    assert parts.tolist() == [1.0, 1.0] and total == 1.25
    total, parts = spec.score("5", p)
    assert parts.tolist() == [0.0, 1.0] and total == 0.25
    assert spec.names == ("numeric_exact_match", "format")
    np.testing.assert_array_equal(spec.total(np.array([[1.0, 1.0], [0.0, 1.0]])), [1.25, 0.25])


def test_custom_reward_via_registry_and_via_fn():
    register_reward("length_test", lambda c, p, *, scale=1.0: scale * len(c))
    spec = RewardSpec((RewardComponent("length_test", 2.0, {"scale": 0.5}), RewardComponent("one", fn=lambda c, p: 1)))
    total, parts = spec.score("abcd", Problem("", "", {}))
    assert parts.tolist() == [2.0, 1.0] and total == 5.0


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: RewardSpec(()), "must not be empty"),
        (lambda: RewardSpec((RewardComponent("format"), RewardComponent("format"))), "distinct"),
        (lambda: RewardComponent("format", weight=math.inf), "weight must be a finite"),
        (lambda: RewardComponent("format", weight="1"), "weight must be a finite"),
        (lambda: reward_spec(("format",), (1.0, 2.0)), "weights has 2 entries"),
        (lambda: reward_spec(("format",), kwargs={"sorting": {}}), "not in names"),
    ],
)
def test_bad_specs_are_rejected_with_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_non_finite_or_non_numeric_scores_raise():
    assert check_score("x", True) == 1.0 and check_score("x", np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match="non-finite"):
        check_score("x", float("nan"))
    with pytest.raises(ValueError, match="returned str"):
        check_score("x", "1.0")


def test_registered_spec_pickles_by_function_reference():
    spec = reward_spec(("countdown", "format"), (1.0, 0.1), {"format": {"pattern": "[0-9]+"}})
    again = pickle.loads(pickle.dumps(spec))
    assert again.names == spec.names and again.components[0].fn is spec.components[0].fn


def test_gin_configures_reward_spec():
    with gin.unlock_config():
        gin.parse_config(
            """
            rlx.rewards.reward_spec.names = ("sorting", "format")
            rlx.rewards.reward_spec.weights = (1.0, 0.5)
            rlx.rewards.reward_spec.kwargs = {"format": {"pattern": "[0-9 ]+"}}
            """
        )
    try:
        spec = reward_spec()
        assert spec.names == ("sorting", "format") and spec.weights.tolist() == [1.0, 0.5]
    finally:
        gin.clear_config()
