"""Config validation, one way: `__post_init__` calls `check_fields` once per rule and `check` once per
condition between fields; every message names the config and the value.

    check_fields(self, POSITIVE_INT, "batch_size", "ppo_epochs")  # PPOConfig.batch_size must be ...
    check(self, self.batch_size % self.mini_batch_size == 0, "mini_batch_size must divide batch_size")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Rule = tuple[Callable[[Any], bool], str]  # (test, what a passing value is)

_integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

POSITIVE_INT: Rule = (lambda v: _integer(v) and v >= 1, "a positive integer")
NON_NEGATIVE_INT: Rule = (lambda v: _integer(v) and v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: _number(v) and v > 0, "a positive number")
NON_NEGATIVE: Rule = (lambda v: _number(v) and v >= 0, "a number >= 0")
UNIT_INTERVAL: Rule = (lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]")
FRACTION: Rule = (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")  # e.g. dropout
BOOL: Rule = (lambda v: isinstance(v, bool), "True or False")


def optional(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"None or {rule[1]}")


def one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices, f"one of {choices}")


def check_fields(config: Any, rule: Rule, *names: str) -> None:
    """ValueError("<Config>.<name> must be <rule>, got <value>") for the first failing field."""
    test, description = rule
    for name in names:
        value = getattr(config, name)
        try:
            ok = test(value)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{type(config).__name__}.{name} must be {description}, got {value!r}")


def check(config: Any, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{type(config).__name__}: {message}")


def check_device(config: Any, name: str = "device") -> None:
    """The field is None or a device torch understands (cpu, cuda, cuda:N)."""
    value = getattr(config, name)
    try:
        value is None or torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{type(config).__name__}.{name} {value!r} is not a device: use cpu, cuda or cuda:N"
        ) from None
