"""minippo.tracking through PPOConfig.log_with: TensorBoard event files that TensorBoard itself reads."""

import pytest
import torch
from tiny import tiny_model

from minippo import tracking
from minippo.lora import LoRAConfig, add_lora
from minippo.ppo import PPOConfig, PPOTrainer


def trainer_with(tokenizer, **settings):
    model = add_lora(tiny_model("llama", vocab_size=len(tokenizer)), LoRAConfig(r=2))
    config = PPOConfig(
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        min_new_tokens=2,
        max_new_tokens=3,
        **settings,
    )
    return PPOTrainer(config, model, tokenizer)


def test_tensorboard_event_files_hold_the_step_stats(tmp_path, tokenizer):
    from tensorboard.backend.event_processing import event_accumulator  # the dev extra installs it

    torch.set_num_threads(1)
    trainer = trainer_with(tokenizer, log_with="tensorboard", logging_dir=str(tmp_path / "tb"))
    queries = [torch.tensor(tokenizer("This movie was")["input_ids"])] * 4
    steps = [
        trainer.step(queries, trainer.generate(queries), [1.0, 0.0, -1.0, 0.5]) for _ in range(2)
    ]
    trainer.tracker.close()

    reader = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert {"objective/kl", "ppo/policy/clipfrac", "env/reward_mean", "ppo/loss/total"} <= tags
    assert tags == set(steps[0])  # every stat, nothing else
    events = reader.Scalars("env/reward_mean")
    assert [e.step for e in events] == [1, 2]
    assert events[-1].value == pytest.approx(steps[-1]["env/reward_mean"])


def test_missing_tracker_is_a_clear_error(tokenizer, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(ImportError, match="pip install wandb"):
        trainer_with(tokenizer, log_with="wandb")
    with pytest.raises(ValueError, match="log_with must be None or one of"):
        PPOConfig(log_with="mlflow")
