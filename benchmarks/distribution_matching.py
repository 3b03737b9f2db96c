"""An experiment, not a feature: train the adapter towards the optimum of PPO's objective by
distribution matching instead of PPO, to measure whether that keeps the starting model's diversity
(the README's second-round table; at the demo's size it stayed on PPO's trade-off).

    .venv/bin/python benchmarks/distribution_matching.py --k 4 -- --model runs/demo/merged --reward runs/demo/reward ...

PPO with a fixed KL coefficient beta maximises E[score] - beta KL(pi || ref), whose optimum is
p*(y|x) = ref(y|x) exp(score / beta) / Z(x) (`minippo.app.report.kl_regularised_optimum`). PPO gets
there by the reverse KL, KL(pi || p*) up to a constant, which is mode-seeking; conditional DPG
(Khalifa et al. 2021, "A Distributional Approach to Controlled Text Generation", arXiv:2012.11635;
Korbak et al. 2022, arXiv:2112.00791) minimises the forward KL(p* || pi) instead, which is
mass-covering: its gradient is E_p*[grad log pi(y|x)], estimated on the policy's own samples with
importance weights p*/pi, self-normalised over K samples of each prompt (Z(x) is unknown):

    w_i = softmax_i(score_i / beta + log ref(y_i|x) - log pi(y_i|x))  over a prompt's K samples
    loss = -sum_i (w_i - 1/K) log pi(y_i|x), averaged over prompts   (1/K: a baseline, E[grad log pi] = 0)

Each step: batch_size / K prompts, each sampled K times with the current adapter; ppo_epochs optimiser
steps on them (the weights stay the sampling policy's: p* / pi_old is the importance weight of every epoch).
The scores are scaled and clipped as PPO's (`PPOTrainer._normalise_scores`: --score-clip, ...);
beta is --init-kl-coef; the learning rate, batch size, seed, temperature and lengths are `minippo
ppo`'s flags after `--`. The held-out evaluation before and after is `minippo ppo`'s (result.json in
the same shape); metrics.jsonl has one row per step. One process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sequence_logprobs(trainer, batch, reference: bool = False, grad: bool = False) -> torch.Tensor:
    """(B,) summed log-probabilities of the batch's responses: the policy, or with adapters off."""
    import contextlib

    from minippo.lora import disable_adapters

    off = disable_adapters(trainer.policy.model) if reference else contextlib.nullcontext()
    with off, torch.set_grad_enabled(grad):
        logprobs, _, _ = trainer._forward(batch, with_values=False)  # (B, T)
    return (logprobs * batch.response_mask).sum(1)


def matching_weights(scores, ref_logp, logp, k: int, beta: float) -> torch.Tensor:
    """(B,) self-normalised importance weights of p* / pi within each prompt's K consecutive samples."""
    log_w = (scores / beta + ref_logp - logp).view(-1, k)
    return torch.softmax(log_w.double(), dim=1).float().reshape(-1)


def train(config, k: int) -> dict:
    from tqdm.auto import tqdm

    from minippo.app.data import cycle_batches
    from minippo.app.pipeline import _decode_pairs, build_trainer, evaluate_policy, ppo_prompts
    from minippo.app.report import MetricsLog, distinct_n, write_json
    from minippo.app.reward import load_reward

    ppo = config.ppo
    if ppo.batch_size % k:
        raise SystemExit(f"--batch-size ({ppo.batch_size}) must be divisible by --k ({k})")
    if not config.eval_prompts:
        raise SystemExit(
            "--eval-prompts must be > 0: the held-out evaluation is this experiment's result"
        )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer, tokenizer, model_dir = build_trainer(config)
    reward = load_reward(config.reward, kind=config.reward_kind, device=trainer.device)
    prompts, eval_prompts = ppo_prompts(config, tokenizer)
    beta = ppo.init_kl_coef
    result = {"model": model_dir, "output_dir": str(out), "k": k, "beta": beta}
    result["before"] = evaluate_policy(
        trainer, tokenizer, reward, eval_prompts, config.eval_seed, False
    )

    log = MetricsLog(out / "metrics.jsonl")
    log.path.unlink(missing_ok=True)
    batches, t0 = cycle_batches(len(prompts), ppo.batch_size, ppo.seed), time.perf_counter()
    for step in tqdm(range(1, config.steps + 1), desc="matching"):
        queries = [prompts[i] for i in next(batches)[: ppo.batch_size // k] for _ in range(k)]
        responses = trainer.generate(queries)
        q_text, r_text = _decode_pairs(tokenizer, queries, responses)
        scores, probs = reward.scores_and_probabilities([q + r for q, r in zip(q_text, r_text)])
        scores = trainer._normalise_scores(
            scores.float().to(trainer.device)
        )  # PPO's scale and clip
        batch = trainer._padded_batch(queries, responses)
        ref_logp = sequence_logprobs(trainer, batch, reference=True)
        for epoch in range(
            ppo.ppo_epochs
        ):  # the weights are the sampling policy's: valid for every epoch
            logp = sequence_logprobs(trainer, batch, grad=True)
            if epoch == 0:
                weights = matching_weights(scores, ref_logp, logp.detach(), k, beta)
                kl = (logp.detach() - ref_logp).mean().item()
            loss = -((weights - 1.0 / k) * logp).view(-1, k).sum(1).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                trainer.trainable, ppo.max_grad_norm or float("inf")
            )
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        log.write(
            {
                "step": step,
                "time/elapsed": time.perf_counter() - t0,
                "objective/kl": kl,
                "env/reward_mean": scores.mean().item(),
                "env/reward_prob_mean": probs.float().mean().item(),
                "env/distinct_1": distinct_n(responses, 1),
                "env/distinct_2": distinct_n(responses, 2),
                "matching/loss": loss.item(),
                "matching/effective_samples": (1 / (weights.view(-1, k) ** 2).sum(1)).mean().item(),
                "matching/grad_norm": float(norm),
            }
        )
    result["train_seconds"] = time.perf_counter() - t0
    trainer.save(out / "adapter")
    result["after"] = evaluate_policy(trainer, tokenizer, reward, eval_prompts, config.eval_seed)
    write_json(out / "result.json", result)
    b, a = result["before"], result["after"]
    print(
        f"matching: held-out P(positive) {b['reward_prob_mean']:.3f} -> {a['reward_prob_mean']:.3f}, "
        f"KL {a['kl_mean']:.2f} nats, distinct-2 {a['distinct_2'] / b['distinct_2']:.2f} of the base's"
    )
    return result


def main(argv=None) -> int:
    from _experiment import parse_flags

    k = ("--k", dict(type=int, default=4, help="samples per prompt (>= 2)"))
    args, ppo_flags = parse_flags(__doc__, argv, k)
    if args.k < 2:
        raise SystemExit(f"--k must be >= 2, got {args.k}")
    from minippo.app.cli import parse_config
    from minippo.app.pipeline import PPORunConfig

    config = parse_config(PPORunConfig, ppo_flags, prog="distribution_matching.py --")
    train(config, args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
