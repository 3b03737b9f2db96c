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


# -- the `fast` setting -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SFTConfig, PPORunConfig, DemoConfig])
def test_fast_setting_defaults_to_auto_and_is_validated(cls):
    assert cls().fast == "auto"
    with pytest.raises(ValueError, match="fast"):
        cls(fast="yes")


def test_demo_passes_fast_to_sft_and_ppo(tmp_path):
    stages = demo_stage_configs(DemoConfig(fast="off", output_dir=str(tmp_path)), "some-model")
    assert stages["sft"].fast == "off" and stages["ppo"].fast == "off"


def test_fast_auto_follows_the_hardware(monkeypatch):
    import torch

    from minippo.app.model_folders import fast_is_on

    assert fast_is_on("on", "cpu") and not fast_is_on("off", "cuda")
    for vnni, bf16 in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda vnni=vnni: vnni)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
        assert fast_is_on("auto", "cpu") == (vnni or bf16)
    assert fast_is_on("auto", "cuda")
    monkeypatch.setenv("MINIPPO_CPU_BF16", "1")  # the override still counts as native bf16
    assert fast_is_on("auto", "cpu")


@pytest.mark.parametrize("fast", ["on", "off"])
def test_ppo_trainer_loads_the_fast_path_that_the_setting_names(tiny_model_dir, fast):
    trainer, _, _ = build_trainer(PPORunConfig(model=tiny_model_dir, fast=fast))
    model = trainer.policy.model
    assert getattr(model, "minippo_fast", False) == (fast == "on")
    assert ("FastLMHead" in repr(model)) == (fast == "on")
