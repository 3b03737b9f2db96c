"""The CLI is generated from config dataclasses: docs, defaults, types and validation carry over."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from minippo.app.cli import add_dataclass_arguments, config_from_namespace, field_docs


@dataclass
class ToyConfig:
    """A toy config."""

    steps: int = 10
    """How many steps to run."""
    lr: float = 1e-3
    """The learning rate."""
    name: str | None = None
    """An optional name."""
    eight_bit: bool = True
    """Load the model in 8-bit."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules to adapt."""
    kind: Literal["prob", "logit"] = "prob"
    """Score kind."""

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, ToyConfig)
    return parser, config_from_namespace(ToyConfig, parser.parse_args(argv))


def test_field_docs_read_the_docstring_under_each_field():
    docs = field_docs(ToyConfig)
    assert docs["steps"] == "How many steps to run."
    assert docs["targets"] == "Modules to adapt."


def test_defaults_and_overrides_round_trip():
    _, cfg = parse([])
    assert cfg == ToyConfig()
    _, cfg = parse(
        [
            "--steps",
            "3",
            "--lr",
            "0.5",
            "--name",
            "x",
            "--no-eight-bit",
            "--targets",
            "a",
            "b",
            "c",
            "--kind",
            "logit",
        ]
    )
    assert cfg == ToyConfig(steps=3, lr=0.5, name="x", eight_bit=False, targets=["a", "b", "c"], kind="logit")


def test_help_lists_every_field_with_its_doc_and_default():
    parser, _ = parse([])
    text = parser.format_help()
    for flag in ("--steps", "--lr", "--name", "--eight-bit", "--targets", "--kind"):
        assert flag in text
    assert "How many steps to run. (default: 10)" in " ".join(text.split())


def test_validation_error_comes_from_post_init():
    with pytest.raises(ValueError, match="steps must be positive"):
        parse(["--steps", "0"])


def test_bad_choice_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse(["--kind", "neither"])


@dataclass
class Inner:
    rate: float = 0.1
    """A rate."""


@dataclass
class Outer:
    steps: int = 2
    """Steps."""
    inner: Inner = field(default_factory=lambda: Inner(rate=0.5))
    """Prefixed nested settings."""
    flat: Inner = field(default_factory=lambda: Inner(rate=0.7), metadata={"cli_prefix": "flat-"})
    """Nested settings with their own prefix."""


def test_nested_dataclasses_get_prefixed_flags_and_keep_outer_defaults():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Outer)
    cfg = config_from_namespace(Outer, parser.parse_args([]))
    assert cfg == Outer()  # the outer default Inner(rate=0.5), not Inner's own 0.1
    cfg = config_from_namespace(Outer, parser.parse_args(["--inner-rate", "2", "--flat-rate", "3"]))
    assert cfg.inner.rate == 2.0 and cfg.flat.rate == 3.0
