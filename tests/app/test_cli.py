"""The CLI is generated from config dataclasses (by tyro): docs, defaults, types, the old flag
spellings and validation carry over."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
from tiny import field_docs

from minippo import LoRAConfig
from minippo.app.cli import _commands, main, parse_config
from minippo.app.pipeline import PPORunConfig
from minippo.app.sft import SFTConfig


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


def test_defaults_and_overrides_round_trip():
    assert parse_config(ToyConfig, []) == ToyConfig()
    argv = "--steps 3 --lr 0.5 --name x --no-eight-bit --targets a b c --kind logit".split()
    cfg = parse_config(ToyConfig, argv)
    assert cfg == ToyConfig(
        steps=3, lr=0.5, name="x", eight_bit=False, targets=["a", "b", "c"], kind="logit"
    )


@pytest.mark.parametrize("spelling", ["None", "none", "null"])
def test_optional_values_take_none_in_any_spelling(spelling):
    assert parse_config(ToyConfig, ["--name", "x"]).name == "x"
    assert parse_config(ToyConfig, ["--name", spelling]).name is None


def test_help_lists_every_field_with_its_doc_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ToyConfig, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--steps",
        "--lr",
        "--name",
        "--eight-bit",
        "--no-eight-bit",
        "--targets",
        "--kind",
    ):
        assert flag in text
    assert "How many steps to run. (default: 10)" in text


def test_validation_error_and_bad_choice_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--steps", "0"])
    assert "steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--kind", "neither"])


@pytest.mark.parametrize("cls", [SFTConfig, PPORunConfig])
def test_nested_lora_flags_old_and_new_spelling(cls):
    for argv in (["--lora-r", "4", "--lora-target-modules", "q_proj,v_proj"], ["--lora.r", "4"]):
        cfg = parse_config(cls, argv + ["--lora.alpha", "8", "--lora.use-rslora"])
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.use_rslora) == (4, 8, True)
    assert parse_config(cls, ["--lora-target-modules", "q_proj,v_proj"]).lora.target_modules == [
        "q_proj",
        "v_proj",
    ]
    assert (
        parse_config(cls, ["--lora.target-modules", "all-linear"]).lora.target_modules
        == "all-linear"
    )
    assert parse_config(cls, ["--no-lora-use-rslora"]).lora.use_rslora is False
    assert parse_config(cls, []).lora == cls().lora  # the outer default, not LoRAConfig's own


def test_ppo_settings_keep_trl_flag_names():
    cfg = parse_config(
        PPORunConfig, "--learning-rate 1e-3 --batch-size 8 --mini-batch-size 4".split()
    )
    assert (cfg.ppo.learning_rate, cfg.ppo.batch_size, cfg.ppo.mini_batch_size) == (1e-3, 8, 4)
    assert parse_config(PPORunConfig, ["--max-grad-norm", "none"]).ppo.max_grad_norm is None
    assert cfg.lora == LoRAConfig(r=16, alpha=32, dropout=0.0)


def test_every_setting_of_every_command_has_a_docstring():
    for name, (cls, _, _) in _commands().items():
        factories = [f.default_factory for f in dataclasses.fields(cls)]
        nested = [make() for make in factories if make is not dataclasses.MISSING]
        for klass in [cls] + [type(v) for v in nested if dataclasses.is_dataclass(v)]:
            docs = field_docs(klass)
            missing = [f.name for f in dataclasses.fields(klass) if not docs.get(f.name)]
            assert not missing, (name, klass.__name__, missing)


def test_no_command_or_an_unknown_one_prints_the_commands(capsys):
    for argv, code in (([], 2), (["--help"], 0), (["train"], 2)):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == code
        out = capsys.readouterr()
        assert "generate" in out.out + out.err
