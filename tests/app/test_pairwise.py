"""The pairwise reward model in the application: `minippo reward --model pairwise` end to end, its
pairs, the reward on PPO's shared base equal to the reward model alone, and the refusal of folders that
hold no trained reward."""

import json
import shutil

import pytest
import torch
from tiny import randomise_adapters, save_tiny_model, tiny_tokenizer

from minippo import LoRAConfig, add_lora, load_model
from minippo.app.cli import main
from minippo.app.pairwise import PairwiseConfig, imdb_pairs, jsonl_pairs
from minippo.app.reward import PairwiseSentiment, load_reward
from minippo.lora import adapter_names, adapter_parameters

TEXTS = ["This movie was great, I loved it", "Awful, a waste of time", "The plot", "Boring"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, imdb_dir):
    """A tiny llama folder and a pairwise reward model trained on it by the command line."""
    root = tmp_path_factory.mktemp("pairwise")
    model = save_tiny_model(root / "tiny", "llama")
    argv = ["reward", "--model", "pairwise", "--data-dir", str(imdb_dir)]
    argv += ["--output-dir", str(root / "rm"), "--num-train", "32", "--num-eval", "16"]
    argv += ["--pairwise.base-model", model, "--pairwise.steps", "3", "--pairwise.batch-size", "4"]
    argv += [
        "--pairwise.num-calibration",
        "20",
        "--pairwise.lora.target-modules",
        "q_proj",
        "o_proj",
    ]
    assert main(argv) == 0
    return root, model


def test_reward_command_trains_measures_and_saves(trained):
    root, model = trained
    folder = root / "rm"
    for name in ("reward_model.json", "score_head.safetensors", "reward/adapter_model.safetensors"):
        assert (folder / name).is_file()
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    for key in ("validation_pair_accuracy", "heldout_label_accuracy", "heldout_tfidf_agreement"):
        assert 0 <= metrics[key] <= 1
    saved = json.loads((folder / "reward_model.json").read_text())
    assert saved["base_model"] == model and saved["quant"] == "8bit"
    assert len(saved["calibration"]) == 2


def test_reward_on_the_ppo_model_equals_the_reward_model_alone(trained):
    root, model_dir = trained
    alone = load_reward(root / "rm")  # on a copy of its own base
    assert isinstance(alone, PairwiseSentiment) and alone.kind == "logit"
    expected = alone.logit(TEXTS)
    policy = load_model(model_dir, load_in_8bit=True)
    randomise_adapters(add_lora(policy, LoRAConfig(r=4)), seed=3)
    shared = load_reward(root / "rm", model=policy, model_dir=model_dir)
    assert shared.reward_model.model is policy
    assert adapter_names(policy) == ["default", "reward"]
    torch.testing.assert_close(shared.logit(TEXTS), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shared.probability(TEXTS), torch.sigmoid(expected))
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(policy, "default")}


def test_ppo_with_a_pairwise_reward_shares_the_base(trained, imdb_dir, tmp_path, capsys):
    from minippo.app.pipeline import PPORunConfig, build_trainer, shared_reward
    from minippo.ppo import PPOConfig

    root, model_dir = trained
    config = PPORunConfig(
        model=model_dir,
        reward=str(root / "rm"),
        data_dir=str(imdb_dir),
        output_dir=str(tmp_path / "ppo"),
        lora=LoRAConfig(r=4),
        ppo=PPOConfig(batch_size=4, mini_batch_size=2, min_new_tokens=3, max_new_tokens=4),
    )
    trainer, _, _ = build_trainer(config)
    state = torch.get_rng_state()
    reward = shared_reward(config, trainer, model_dir)
    assert torch.equal(torch.get_rng_state(), state)  # the sampling stream is untouched
    assert reward.reward_model.model is trainer.policy.model  # one copy of the base
    policy_params = adapter_parameters(trainer.policy.model, "default")
    value_head = list(trainer.policy.value_head.parameters())
    assert {id(p) for p in trainer.trainable} == {id(p) for p in policy_params + value_head}
    torch.testing.assert_close(reward.logit(TEXTS), load_reward(root / "rm").logit(TEXTS))

    argv = ["ppo", "--model", model_dir, "--reward", str(root / "rm"), "--data-dir", str(imdb_dir)]
    argv += ["--output-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4"]
    argv += ["--mini-batch-size", "2", "--ppo-epochs", "1", "--eval-prompts", "4"]
    argv += ["--min-new-tokens", "3", "--max-new-tokens", "4", "--lora-r", "4"]
    assert main(argv) == 0
    assert not (tmp_path / "run" / "adapter" / "reward").exists()  # the checkpoint: the policy's
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert 0 <= result["after"]["reward_prob_mean"] <= 1


def test_imdb_pairs_are_review_starts_of_equal_length(imdb_dir):
    tokenizer = tiny_tokenizer()
    config = PairwiseConfig(min_tokens=5, max_tokens=9)
    pairs, reviews = imdb_pairs("validation", config, tokenizer, 20, str(imdb_dir), seed=0)
    assert len(pairs) == 20
    positive = [t for t, label in zip(reviews["text"], reviews["label"]) if label == 1]
    for chosen, rejected in pairs:
        n_chosen = len(tokenizer(chosen, add_special_tokens=False)["input_ids"])
        n_rejected = len(tokenizer(rejected, add_special_tokens=False)["input_ids"])
        assert abs(n_chosen - n_rejected) <= 1  # k tokens each (re-tokenising may merge one)
        assert 4 <= n_chosen <= 10
    assert pairs[0][0].split()[0] in positive[0]


def test_jsonl_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q: ", "chosen": "yes", "rejected": "no"}, {"chosen": "a", "rejected": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert jsonl_pairs(path) == [("Q: yes", "Q: no"), ("a", "b")]
    path.write_text(json.dumps({"prompt": "Q", "answer": "x"}) + "\n")
    with pytest.raises(
        ValueError, match="line 1: each line needs text fields 'chosen' and 'rejected'"
    ):
        jsonl_pairs(path)


# -- rewards that are not trained rewards are refused ---------------------------------------------
def test_a_causal_lm_is_refused_as_a_reward(tiny_model_dir, imdb_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="holds a causal language model .LlamaForCausalLM.") as err:
        load_reward(tiny_model_dir)
    assert "A reward must be a trained one" in str(err.value)
    argv = [
        "ppo",
        "--model",
        tiny_model_dir,
        "--reward",
        tiny_model_dir,
        "--data-dir",
        str(imdb_dir),
    ]
    assert main(argv + ["--output-dir", str(tmp_path / "ppo")]) == 2
    message = capsys.readouterr().err
    assert "causal language model" in message and "pairwise reward model" in message
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()  # refused before training


def test_an_adapter_alone_is_refused_as_a_reward(tokenizer, tmp_path):
    from tiny import tiny_model

    from minippo import save_adapter

    save_adapter(add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=2)), tmp_path / "a")
    with pytest.raises(ValueError, match="holds a LoRA adapter alone .* no score head"):
        load_reward(tmp_path / "a")


def test_a_pairwise_folder_without_its_head_or_adapter_is_refused(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "rm", tmp_path / "no-head")
    (tmp_path / "no-head" / "score_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no score_head.safetensors"):
        load_reward(tmp_path / "no-head")
    shutil.copytree(root / "rm", tmp_path / "no-adapter")
    shutil.rmtree(tmp_path / "no-adapter" / "reward")
    with pytest.raises(ValueError, match="no adapter .*A reward must be a trained one"):
        load_reward(tmp_path / "no-adapter")


def test_a_classifier_with_an_untrained_head_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "classifier"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a trained classifier: .* initialised at random"):
        load_reward(folder)


def test_a_pairwise_reward_trains_a_critic_free_policy(trained, imdb_dir, tmp_path):
    """GRPO with the reward adapter beside the policy's: no value head is trained or saved, and the
    policy adapter learns from the shared reward model's scores."""
    root, model_dir = trained
    argv = ["ppo", "--model", model_dir, "--reward", str(root / "rm"), "--data-dir", str(imdb_dir)]
    argv += ["--output-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4"]
    argv += ["--mini-batch-size", "4", "--ppo-epochs", "1", "--eval-prompts", "4"]
    argv += ["--min-new-tokens", "3", "--max-new-tokens", "4", "--lora-r", "4"]
    argv += ["--advantage-estimator", "grpo", "--num-generations", "2"]
    assert main(argv) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "value_head.safetensors").exists()
    assert not (adapter / "reward").exists()  # the reward adapter is not the policy's
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(metrics) == 2 and not any(k.startswith("ppo/val/") for k in metrics[0])
