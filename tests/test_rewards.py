"""Reward functions: the weighted sum, and the errors for what a function may return wrongly."""

import math

import pytest
import torch

from minippo.rewards import WeightedRewards, check_rewards, reward_name


def length(prompts, completions):
    return [float(len(c)) for c in completions]


def says_yes(prompts, completions):
    return [1.0 if "yes" in c else 0.0 for c in completions]


def test_weighted_sum_by_hand():
    reward = WeightedRewards([length, says_yes], weights=[0.5, 2.0])
    scores = reward.scores(["p", "q"], ["yes", "no"])
    assert scores.tolist() == [0.5 * 3 + 2.0, 0.5 * 2]
    assert reward(["p", "q"], ["yes", "no"]) == scores.tolist()  # itself a reward function
    assert reward.__name__ == "length+says_yes"
    assert set(reward.parts(["p"], ["yes"])) == {"length", "says_yes"}


def test_weights_default_to_one_and_names_repeat_safely():
    reward = WeightedRewards([says_yes, says_yes])
    assert reward.scores(["p"], ["yes"]).tolist() == [2.0]
    assert list(reward.parts(["p"], ["yes"])) == ["says_yes", "says_yes_1"]


def test_a_callable_object_is_a_reward_too():
    class Constant:
        def __call__(self, prompts, completions):
            return [0.25] * len(completions)

    assert reward_name(Constant()) == "Constant"
    assert WeightedRewards([Constant()]).scores(["a"], ["b"]).tolist() == [0.25]


def test_wrong_length_names_the_function():
    def short(prompts, completions):
        return [1.0]

    with pytest.raises(
        ValueError, match=r"reward function short returned 1 values for 2 completions"
    ):
        WeightedRewards([short]).scores(["a", "b"], ["c", "d"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad):
    def broken(prompts, completions):
        return [0.0, bad]

    with pytest.raises(ValueError, match=r"broken returned non-finite values .* completions \[1\]"):
        WeightedRewards([broken]).scores(["a", "b"], ["c", "d"])


@pytest.mark.parametrize("value", [3.0, "1.0", None])
def test_not_a_list_of_numbers_is_refused(value):
    with pytest.raises(ValueError, match="reward function f returned"):
        check_rewards(value if value != "1.0" else [value, object()], 2, "f")


def test_a_tensor_or_array_is_accepted():
    assert check_rewards(torch.tensor([1, 2]), 2).dtype == torch.float32
    assert check_rewards((0.5, 1.5), 2).tolist() == [0.5, 1.5]


def test_bad_weights_and_functions_are_refused():
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        WeightedRewards([length], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="must be callable"):
        WeightedRewards(["length"])
    with pytest.raises(ValueError, match="at least one"):
        WeightedRewards([])
