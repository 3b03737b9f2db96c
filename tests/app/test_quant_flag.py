"""`--quant 8bit | 4bit | none` in sft, ppo and demo: validated, recorded, and loading the base
that it names (tiny random model, small IMDB slice)."""

import json

import pytest

from minippo.app.cli import main
from minippo.app.demo import DemoConfig, demo_stage_configs
from minippo.app.pipeline import PPORunConfig, build_trainer
from minippo.app.sft import SFTConfig
from minippo.quant import is_4bit, is_8bit


@pytest.mark.parametrize("cls", [SFTConfig, PPORunConfig])
def test_quant_field_defaults_to_8bit_and_keeps_load_in_8bit_working(cls):
    assert (cls().quant, cls().load_in_8bit) == ("8bit", True)
    assert (cls(quant="4bit").quant, cls(quant="4bit").load_in_8bit) == ("4bit", False)
    assert cls(load_in_8bit=False).quant == "none"  # the older spelling of --quant none
    assert cls(quant="none").load_in_8bit is False
    with pytest.raises(
        ValueError, match=r"quant must be one of \['4bit', '8bit', 'none'\], got 'int4'"
    ):
        cls(quant="int4")


def test_demo_passes_quant_to_sft_and_ppo(tmp_path):
    stages = demo_stage_configs(DemoConfig(quant="4bit", output_dir=str(tmp_path)), "some-model")
    assert stages["sft"].quant == "4bit" and stages["ppo"].quant == "4bit"
    with pytest.raises(ValueError, match="quant must be one of"):
        DemoConfig(quant="3bit")


@pytest.mark.parametrize("quant, check", [("4bit", is_4bit), ("8bit", is_8bit)])
def test_ppo_trainer_loads_the_base_that_quant_names(tiny_model_dir, quant, check):
    trainer, _, _ = build_trainer(PPORunConfig(model=tiny_model_dir, quant=quant))
    assert check(trainer.policy.model)


def test_sft_in_4bit_through_the_cli_records_quant(tiny_model_dir, imdb_dir, tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "--model", tiny_model_dir, "--data-dir", str(imdb_dir), "--output-dir", str(out)]
    args += ["--quant", "4bit", "--max-steps", "3", "--batch-size", "2", "--block-size", "32"]
    args += ["--num-train-texts", "30", "--num-eval-blocks", "2", "--lora-r", "4"]
    assert main(args) == 0
    recorded = json.loads((out / "sft_config.json").read_text())
    assert recorded["quant"] == "4bit" and recorded["load_in_8bit"] is False
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
