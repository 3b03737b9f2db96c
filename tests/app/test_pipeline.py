"""End to end through the CLI on a tiny random model and a small IMDB slice: every subcommand,
each step's output consumed by the next."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minippo import load_adapter
from minippo.app.cli import main
from minippo.quant import load_model

# Keys of every metrics.jsonl line (the trl / OpenAI names the README documents).
METRIC_KEYS = {
    "step",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "ppo/loss/policy",
    "ppo/loss/value",
    "ppo/loss/total",
    "ppo/policy/entropy",
    "ppo/policy/approxkl",
    "ppo/policy/policykl",
    "ppo/policy/clipfrac",
    "ppo/policy/advantages_mean",
    "ppo/policy/ratio",
    "ppo/returns/mean",
    "ppo/returns/var",
    "ppo/val/vpred",
    "ppo/val/error",
    "ppo/val/clipfrac",
    "ppo/val/var_explained",
    "ppo/mean_scores",
    "env/reward_mean",
    "env/reward_std",
    "env/reward_prob_mean",
    "env/distinct_1",
    "env/distinct_2",
    "env/repeated_bigrams",
    "time/ppo/total",
    "time/generate",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, imdb_dir):
    """Run reward -> sft -> merge -> ppo -> generate once; the tests below inspect the outputs."""
    from tiny import save_tiny_model

    root = tmp_path_factory.mktemp("pipeline")
    model = save_tiny_model(root / "tiny", "llama")
    data = ["--data-dir", str(imdb_dir)]
    assert (
        main(
            [
                "reward",
                *data,
                "--output-dir",
                str(root / "reward"),
                "--num-train",
                "400",
                "--num-eval",
                "200",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sft",
                *data,
                "--model",
                model,
                "--output-dir",
                str(root / "sft"),
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--block-size",
                "32",
                "--num-train-texts",
                "30",
                "--num-eval-blocks",
                "2",
                "--lora-r",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "merge",
                *data,
                "--base-model",
                model,
                "--adapter",
                str(root / "sft" / "adapter"),
                "--output-dir",
                str(root / "merged"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "ppo",
                *data,
                "--model",
                str(root / "merged"),
                "--reward",
                str(root / "reward"),
                "--output-dir",
                str(root / "ppo"),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--mini-batch-size",
                "2",
                "--ppo-epochs",
                "1",
                "--eval-prompts",
                "4",
                "--save-every",
                "2",
                "--min-new-tokens",
                "3",
                "--max-new-tokens",
                "5",
                "--lora-r",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                *data,
                "--model",
                str(root / "merged"),
                "--adapter",
                str(root / "ppo" / "adapter"),
                "--num-prompts",
                "2",
                "--max-new-tokens",
                "4",
                "--reward",
                str(root / "reward"),
            ]
        )
        == 0
    )
    return root


def test_reward_step_reports_accuracy_and_writes_no_pickle(run):
    metrics = json.loads((run / "reward" / "metrics.json").read_text())["metrics"]
    assert metrics["validation_accuracy"] > 0.6
    assert not list(run.glob("reward/*.pkl")) and not list(run.glob("reward/*.joblib"))


def test_sft_step_saves_a_loadable_adapter(run):
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert {"eval_loss_before", "eval_loss_after"} <= set(metrics)
    model = load_model(str(run / "tiny"))
    load_adapter(model, run / "sft" / "adapter")


def test_merged_folder_loads_in_bare_transformers_and_matches(run):
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_ppo_step_writes_metrics_checkpoints_and_result(run):
    lines = [json.loads(l) for l in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    for line in lines:
        missing = METRIC_KEYS - set(line)
        assert not missing, f"metrics.jsonl lacks {sorted(missing)}"
    for folder in ("adapter", "checkpoint"):
        files = {p.name for p in (run / "ppo" / folder).iterdir()}
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "value_head.safetensors",
        } <= files
    result = json.loads((run / "ppo" / "result.json").read_text())
    assert 0.0 <= result["before"]["reward_prob_mean"] <= 1.0
    assert len(result["after"]["responses"]) == 4
    for name in ("before", "after"):  # diversity and the starting model's likelihood of the samples
        assert 0.0 < result[name]["distinct_1"] <= 1.0 and 0.0 < result[name]["distinct_2"] <= 1.0
        assert result[name]["base_logp_per_token"] < 0.0
    config = json.loads((run / "ppo" / "config.json").read_text())
    assert config["ppo"]["batch_size"] == 4 and config["lora"]["r"] == 4


def test_ppo_adapter_changes_the_model_and_loads_on_the_merged_base(run):
    base = load_model(str(run / "merged"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        load_adapter(base, run / "ppo" / "adapter")
        after = base(ids).logits
    assert not torch.equal(before, after)


def test_generate_best_of_n_keeps_each_prompts_highest_scored_sample(run):
    from minippo.app.pipeline import GenerateConfig, run_generate

    common = dict(
        model=str(run / "merged"),
        adapter=str(run / "ppo" / "adapter"),
        prompts=["This film was", "I watched it and", "The plot"],
        max_new_tokens=6,
        reward=str(run / "reward"),
    )
    singles = [run_generate(GenerateConfig(**common, seed=7 + k)) for k in range(4)]
    best = run_generate(GenerateConfig(**common, seed=7, best_of=4))
    for column in ("base", "adapter"):
        probs = torch.tensor([s[column]["probs"] for s in singles])  # (seeds, prompts)
        assert (probs.max(0).values > probs.min(0).values).any()  # the seeds sampled differently
        pick = probs.argmax(0)
        assert best[column]["probs"] == pytest.approx(probs.max(0).values.tolist(), abs=1e-6)
        assert best[column]["responses"] == [
            singles[k][column]["responses"][i] for i, k in enumerate(pick)
        ]
    with pytest.raises(ValueError, match="needs a --reward"):
        GenerateConfig(**(common | {"reward": None}), best_of=2)


def test_plan_command_prints_the_blog_arithmetic(capsys):
    assert main(["plan", "--params", "20e9", "--gpu-gib", "24", "--dtype", "bf16"]) == 0
    assert "fits in 24 GiB: NO" in capsys.readouterr().out
    assert main(["plan", "--params", "20e9", "--gpu-gib", "24", "--dtype", "int8"]) == 0
    assert "fits in 24 GiB: yes" in capsys.readouterr().out


def test_bad_input_gives_a_message_not_a_traceback(tmp_path, capsys, tiny_model_dir, imdb_dir):
    assert (
        main(
            [
                "merge",
                "--base-model",
                tiny_model_dir,
                "--adapter",
                str(tmp_path / "nowhere"),
                "--output-dir",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "not a saved adapter" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_model_dir,
                "--adapter",
                "",
                "--prompts",
                "good film",
                "--max-new-tokens",
                "500",
                "--data-dir",
                str(imdb_dir),
            ]
        )
        == 2
    )
    assert "context window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ppo", "--steps", "0"])
    assert "steps must be a positive integer" in capsys.readouterr().err
    ppo = [
        "ppo",
        "--model",
        tiny_model_dir,
        "--reward",
        str(tmp_path / "no-reward"),
        "--output-dir",
    ]
    with pytest.MonkeyPatch.context() as patch:  # the reward is checked before the model loads
        patch.setattr(
            "minippo.app.pipeline.build_trainer", lambda config: pytest.fail("model loaded")
        )
        assert main([*ppo, str(tmp_path / "p")]) == 2
    assert "train one with `minippo reward" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for command in ("sft", "merge", "reward", "ppo", "generate", "demo", "plan"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--learning-rate" in capsys.readouterr().out


def test_interrupted_ppo_run_keeps_its_last_checkpoint_loadable(
    tmp_path, tiny_model_dir, imdb_dir, monkeypatch
):
    """Ctrl-C in the middle of step 3 (after a checkpoint at step 2): the checkpoint is intact."""
    from minippo.app import TfidfSentiment, load_imdb, pipeline

    train = load_imdb("train", imdb_dir, limit=300)
    TfidfSentiment.fit(train["text"], train["label"], kind="logit").save(tmp_path / "reward")
    calls = {"n": 0}
    real_step = pipeline.PPOTrainer.step

    def step_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.PPOTrainer, "step", step_then_interrupt)
    config = pipeline.PPORunConfig(
        model=tiny_model_dir,
        reward=str(tmp_path / "reward"),
        data_dir=str(imdb_dir),
        output_dir=str(tmp_path / "ppo"),
        steps=5,
        save_every=2,
        eval_prompts=0,
        lora=pipeline.LoRAConfig(r=4, alpha=8),
        ppo=pipeline.PPOConfig(
            batch_size=4, mini_batch_size=2, ppo_epochs=1, min_new_tokens=3, max_new_tokens=4
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_ppo(config, progress=False)
    checkpoint = tmp_path / "ppo" / "checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    model = load_model(tiny_model_dir)
    load_adapter(model, checkpoint)
    assert not list(tmp_path.glob("ppo/.checkpoint.*"))  # no half-written save beside it


@pytest.mark.cuda
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_the_three_steps_on_cuda(tmp_path, imdb_dir, quant):
    """sft -> merge -> ppo with --device cuda on a tiny model: the k-bit base through bitsandbytes'
    CUDA kernels, LoRA, the reference switch and the trainer on the GPU, end to end."""
    from tiny import save_tiny_model

    model, data = save_tiny_model(tmp_path / "tiny", "llama"), ["--data-dir", str(imdb_dir)]
    cuda, small = ["--device", "cuda", "--quant", quant], ["--lora-r", "4"]
    reward = [
        "reward",
        *data,
        "--output-dir",
        str(tmp_path / "reward"),
        "--num-train",
        "300",
        "--num-eval",
        "100",
    ]
    assert main(reward) == 0
    sft = [
        "sft",
        *data,
        "--model",
        model,
        "--output-dir",
        str(tmp_path / "sft"),
        "--max-steps",
        "2",
    ]
    sft += [
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--num-train-texts",
        "20",
        "--num-eval-blocks",
        "2",
    ]
    assert main([*sft, *cuda, *small]) == 0
    merge = ["merge", *data, "--base-model", model, "--adapter", str(tmp_path / "sft" / "adapter")]
    assert main([*merge, "--output-dir", str(tmp_path / "merged"), "--device", "cuda"]) == 0
    ppo = ["ppo", *data, "--model", str(tmp_path / "merged"), "--reward", str(tmp_path / "reward")]
    ppo += [
        "--output-dir",
        str(tmp_path / "ppo"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
    ]
    ppo += ["--eval-prompts", "4", "--min-new-tokens", "3", "--max-new-tokens", "5"]
    assert main([*ppo, *cuda, *small]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["objective/kl"])) for r in rows)
