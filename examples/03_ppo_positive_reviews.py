"""Step 3 of the blog (gpt-neox-20b_peft/gpt-neo-20b_sentiment_peft.py): PPO-train a new LoRA adapter
on the merged model, loaded in 8-bit, so that it writes positive IMDB reviews.

    python examples/03_ppo_positive_reviews.py --model runs/merged --reward runs/reward --steps 60

The loop is the whole algorithm from the outside: prompts -> generate -> score -> step.

The PPO settings are the ones that learned at this scale (docs/experiments.md, the presets before
the `make demo` preset "cpu"), not trl's defaults, because with a 135M model and ~2,000 samples
those do not move:
- learning rate 1.5e-3 with the gradient norm clipped at 1: a lower rate did not move the reward,
  and a high rate without clipping collapsed;
- 32 samples a step in one mini-batch (one update per epoch) and a rank-4 adapter: less noise per
  update, so less of the KL to the starting model is drift;
- a fixed KL coefficient of 0.1 (trl's adaptive controller, horizon 10,000 samples, hardly moves
  in a run this short);
- the reward is the classifier's logit clipped at 3 (P(positive) 0.95): past that, more "great great
  great" earns nothing, so the KL to the starting model levels off instead of growing.
"""

import sys
from dataclasses import dataclass

import torch

from minippo import LoRAConfig, PPOConfig, PPOTrainer, add_lora, load_model
from minippo.app import load_imdb, load_reward, load_tokenizer, make_prompts, resolve_model
from minippo.app.cli import parse_config


@dataclass
class ExampleConfig:
    model: str = "runs/merged"
    """Merged SFT model (or smollm2-135m)."""
    reward: str = "runs/reward"
    """Reward folder or HF classifier name."""
    data_dir: str | None = None
    """IMDB parquet folder (None: $MINIPPO_IMDB_DIR)."""
    steps: int = 60
    """PPO steps of 32 samples."""
    device: str = "cpu"
    """Device to train on."""
    output_dir: str = "runs/ppo-example"
    """Where the adapter is saved."""


if __name__ == "__main__":
    args = parse_config(ExampleConfig, sys.argv[1:], description=__doc__)

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, load_in_8bit=True, device=args.device)
    add_lora(model, LoRAConfig(r=4, alpha=8))
    config = PPOConfig(
        batch_size=32,
        mini_batch_size=32,
        ppo_epochs=2,
        learning_rate=1.5e-3,
        max_grad_norm=1.0,
        init_kl_coef=0.1,
        adap_kl_ctrl=False,
        score_clip=3.0,
        min_new_tokens=12,
        max_new_tokens=16,
        device=args.device,
    )
    trainer = PPOTrainer(config, model, tokenizer)
    reward = load_reward(args.reward, kind="logit")

    texts = load_imdb("train", args.data_dir, limit=4 * args.steps * config.batch_size)["text"]
    prompts, _ = make_prompts(texts, tokenizer, min_tokens=2, max_tokens=8)
    for step in range(args.steps):
        queries = prompts[step * config.batch_size : (step + 1) * config.batch_size]
        responses = trainer.generate(queries)
        reviews = tokenizer.batch_decode(
            [torch.cat([q, r]) for q, r in zip(queries, responses)], skip_special_tokens=True
        )
        stats = trainer.step(queries, responses, reward(reviews))
        print(
            f"step {step + 1}: reward {stats['env/reward_mean']:.2f}, KL {stats['objective/kl']:.2f}"
        )
    trainer.save(f"{args.output_dir}/adapter")
