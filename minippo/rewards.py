"""Reward functions: how a batch of completions becomes the scores that `PPOTrainer.step` takes.

A reward function is any callable ``(prompts: list[str], completions: list[str]) -> list[float]``, one
number per completion, as trl's ``reward_funcs``: a program that checks an answer, a format rule, a
classifier wrapped in a function. `WeightedRewards` sums several with weights; `check_rewards` turns what a
function returned into a (B,) tensor or a ValueError that names the function and what is wrong.

    reward = WeightedRewards([correct, short], weights=[1.0, 0.1])
    scores = reward.scores(prompts, completions)  # (B,) float32, checked
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]


def reward_name(function: RewardFunction) -> str:
    """A function's name for messages and stats: ``__name__``, else its class's name."""
    return getattr(function, "__name__", None) or type(function).__name__


def check_rewards(values, num_completions: int, name: str = "reward") -> Tensor:
    """What reward function ``name`` returned for ``num_completions`` completions, as a (B,) float32
    tensor: one finite number per completion, or a ValueError that says which rule failed."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(
            f"reward function {name} returned {type(values).__name__}; it must return a list of "
            f"{num_completions} numbers, one per completion"
        )
    if len(values) != num_completions:
        raise ValueError(
            f"reward function {name} returned {len(values)} values for {num_completions} completions; "
            "it must return one number per completion, in the completions' order"
        )
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"reward function {name} returned something that is not a number: "
            f"{[v for v in values if not isinstance(v, (int, float))][:3]!r}"
        ) from None
    bad = [i for i, v in enumerate(numbers) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"reward function {name} returned non-finite values {[numbers[i] for i in bad[:3]]} for "
            f"completions {bad[:3]}: every reward must be a finite number"
        )
    return torch.tensor(numbers, dtype=torch.float32)  # (B,)


class WeightedRewards:
    """Several reward functions as one: ``score_i = sum_k weight_k * f_k(prompts, completions)_i``
    (weights default to 1, as trl's ``reward_weights``). Itself a reward function."""

    def __init__(self, functions: Sequence[RewardFunction], weights: Sequence[float] | None = None):
        self.functions = list(functions)
        if not self.functions:
            raise ValueError("WeightedRewards needs at least one reward function")
        for function in self.functions:
            if not callable(function):
                raise ValueError(f"a reward function must be callable, got {function!r}")
        weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.functions):
            raise ValueError(
                f"{len(weights)} reward weights for {len(self.functions)} reward functions: "
                "give one weight per function"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward weights must be finite numbers, got {weights}")
        self.weights = weights
        self.__name__ = "+".join(reward_name(f) for f in self.functions)

    def parts(self, prompts: list[str], completions: list[str]) -> dict[str, Tensor]:
        """Each function's checked scores (B,), unweighted, by name (a repeated name gets its index)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        parts = {}
        for k, function in enumerate(self.functions):
            name = reward_name(function)
            name = name if name not in parts else f"{name}_{k}"
            parts[name] = check_rewards(function(prompts, completions), len(completions), name)
        return parts

    def scores(self, prompts: list[str], completions: list[str]) -> Tensor:
        """The weighted sum of the parts, (B,) float32."""
        parts = self.parts(prompts, completions).values()
        return sum(w * s for w, s in zip(self.weights, parts))

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.scores(prompts, completions).tolist()
