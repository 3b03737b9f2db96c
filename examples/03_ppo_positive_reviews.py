"""Step 3 of the blog (gpt-neox-20b_peft/gpt-neo-20b_sentiment_peft.py): PPO-train a new LoRA adapter
on the merged model, loaded in 8-bit, so that it writes positive IMDB reviews.

    python examples/03_ppo_positive_reviews.py --model runs/merged --reward runs/reward --steps 20

The loop is the whole algorithm from the outside: prompts -> generate -> score -> step.
"""

import argparse

import torch

from minippo import LoRAConfig, PPOConfig, PPOTrainer, add_lora, load_model
from minippo.app import load_imdb, load_reward, load_tokenizer, make_prompts, resolve_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/merged", help="merged SFT model (or smollm2-135m)")
    parser.add_argument("--reward", default="runs/reward", help="reward folder or HF classifier name")
    parser.add_argument("--data-dir", default=None, help="IMDB parquet folder ($MINIPPO_IMDB_DIR)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default="runs/ppo-example")
    args = parser.parse_args()

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, load_in_8bit=True, device=args.device)
    add_lora(model, LoRAConfig(r=16, alpha=32))
    config = PPOConfig(
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=2,
        learning_rate=3e-4,
        init_kl_coef=0.05,
        adap_kl_ctrl=False,
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
        print(f"step {step + 1}: reward {stats['env/reward_mean']:.2f}, KL {stats['objective/kl']:.2f}")
    trainer.save(f"{args.output_dir}/adapter")
