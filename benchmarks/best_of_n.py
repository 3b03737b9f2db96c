"""Best-of-n from the starting model: the reward a policy can reach at a small, known KL, as the
yardstick for PPO's held-out numbers (the README's diversity tables).

    .venv/bin/python benchmarks/best_of_n.py --model runs/demo/merged --reward runs/demo/reward
    .venv/bin/python benchmarks/best_of_n.py ... --n 4 --prompts 8   # quick
    .venv/bin/python benchmarks/best_of_n.py ... --n 128 --json bon.json  # a rerun with --n 256 adds to it

For each held-out prompt (the IMDB test prompts of `minippo ppo`'s evaluation: same count, cut and
seed), sample N responses from the starting model with the adapters off (round k seeds the sampler
with eval_seed + k, so round 0 is PPO's "before" sample), score each review with the reward's
P(positive), and for n = 1, 2, 4, ..., N keep the best of the first n. Reported per n: the kept
responses' mean P(positive), distinct-1/2, log-likelihood per token under the starting model, and the
KL of the best-of-n policy to the starting model, log n - (n - 1)/n nats: exact when no two samples
tie, an upper bound otherwise (Beirami et al. 2024, "Theoretical guarantees on the best-of-n
alignment policy", arXiv:2401.01879). PPO's held-out KL is a sample of the same quantity.

A second table puts PPO's own target beside it: the optimum of E[score clipped at --score-clip] -
beta * KL, the starting model tilted by exp(score / beta), estimated over the same N samples per
prompt for each --betas value (`minippo.app.report.kl_regularised_optimum`). Where it meets a bar
that PPO's runs miss, the gap is PPO's optimisation, not its objective.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- best_of_n:begin -->", "<!-- best_of_n:end -->"


def sample_rounds(args, rounds: list[dict]) -> tuple[list[dict], dict]:
    """N rounds of one sample per held-out prompt from the starting model: probs, ids, log-likelihoods
    (after the given rounds of an earlier run, which are kept)."""
    from minippo.app.pipeline import PPORunConfig, build_trainer, evaluate_samples, ppo_prompts
    from minippo.app.reward import load_reward

    with tempfile.TemporaryDirectory() as tmp:
        config = PPORunConfig(
            model=args.model, reward=args.reward, output_dir=tmp, quant=args.quant, steps=1,
            eval_prompts=args.prompts, eval_seed=args.eval_seed,
        )  # fmt: skip
        config.ppo.min_new_tokens, config.ppo.max_new_tokens = (
            args.min_new_tokens,
            args.max_new_tokens,
        )
        trainer, tokenizer, model_dir = build_trainer(config)
        reward = load_reward(config.reward, kind=config.reward_kind, device=trainer.device)
        _, prompts = ppo_prompts(config, tokenizer)
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    for saved in rounds:  # rounds of an earlier version of this script: their scores added
        if "scores" not in saved:
            responses = tokenizer.batch_decode(saved["ids"], skip_special_tokens=True)
            saved["scores"] = reward([q + r for q, r in zip(prompt_texts, responses)]).tolist()
    for k in range(len(rounds), args.n):
        t = time.perf_counter()
        s = evaluate_samples(trainer, tokenizer, prompts, args.eval_seed + k, adapters=False)
        scores, probs = reward.scores_and_probabilities(
            [q + r for q, r in zip(s["prompts"], s["responses"])]
        )
        logp, mask = trainer.response_logprobs(prompts, s["response_ids"], reference=True)
        rounds.append(
            {
                "probs": probs.tolist(),
                "scores": scores.tolist(),
                "ids": [r.tolist() for r in s["response_ids"]],
                "logp_sum": (logp * mask).sum(1).tolist(),
                "tokens": mask.sum(1).tolist(),
            }
        )
        mean_p = float(probs.mean())
        print(
            f"round {k}: mean P(positive) {mean_p:.3f} ({time.perf_counter() - t:.1f} s)",
            flush=True,
        )
    return rounds, {"model": str(model_dir), "prompts": len(prompts)}


def earlier_rounds(args) -> tuple[list[dict], float]:
    """The rounds (and sampling seconds) of an earlier run's --json with the same settings, if any."""
    if not args.json or not Path(args.json).exists():
        return [], 0.0
    saved = json.loads(Path(args.json).read_text())
    if saved["settings"] != settings(args):
        print(f"{args.json} holds other settings: sampling anew and replacing it")
        return [], 0.0
    print(f"{len(saved['rounds'])} rounds from {args.json}")
    return saved["rounds"][: args.n], saved["meta"]["seconds"] * min(
        1, args.n / len(saved["rounds"])
    )


def settings(args) -> dict:
    keys = ("model", "reward", "quant", "prompts", "eval_seed", "min_new_tokens", "max_new_tokens")
    return {k: getattr(args, k) for k in keys}


def best_of(rounds: list[dict], n: int) -> dict:
    """The best of the first n rounds per prompt, and the figures of those kept samples."""
    from minippo.app.pipeline import keep_best
    from minippo.app.report import distinct_n

    kept = keep_best(rounds[:n])  # per prompt
    return {
        "n": n,
        "reward_prob_mean": sum(kept["probs"]) / len(kept["probs"]),
        "kl_bound": math.log(n) - (n - 1) / n,
        "distinct_1": distinct_n(kept["ids"], 1),
        "distinct_2": distinct_n(kept["ids"], 2),
        "base_logp_per_token": sum(kept["logp_sum"]) / sum(kept["tokens"]),
    }


def optimum(rounds: list[dict], beta: float, clip: float, draws: int = 20) -> dict:
    """The optimum of PPO's objective (the score clipped at +-clip, minus beta times the KL to the
    starting model), estimated over the rounds' samples of each prompt (`kl_regularised_optimum`);
    its distinct-n and log-likelihood are averages over `draws` samples of one response per prompt."""
    from minippo.app.report import distinct_n, kl_regularised_optimum

    scores = torch.tensor([r["scores"] for r in rounds]).T.clamp(-clip, clip)  # (prompts, N)
    weights, kl = kl_regularised_optimum(scores, beta)
    probs = torch.tensor([r["probs"] for r in rounds], dtype=torch.float64).T
    generator, figures = (
        torch.Generator().manual_seed(0),
        {"distinct_1": 0.0, "distinct_2": 0.0, "logp": 0.0},
    )
    for _ in range(draws):
        pick = torch.multinomial(weights, 1, generator=generator)[
            :, 0
        ].tolist()  # a round per prompt
        kept = [rounds[k] for k in pick]
        ids = [kept[i]["ids"][i] for i in range(len(pick))]
        figures["distinct_1"] += distinct_n(ids, 1) / draws
        figures["distinct_2"] += distinct_n(ids, 2) / draws
        logp = sum(kept[i]["logp_sum"][i] for i in range(len(pick)))
        figures["logp"] += logp / sum(kept[i]["tokens"][i] for i in range(len(pick))) / draws
    return {
        "beta": beta,
        "reward_prob_mean": float((weights * probs).sum(1).mean()),
        "kl": float(kl.mean()),
        "effective_samples": float((1 / (weights**2).sum(1)).mean()),
        **figures,
    }


def report(rows: list[dict], optima: list[dict], meta: dict, args) -> str:
    from ppo_step import cpu_flags, cpu_name

    base = rows[0]
    lines = [
        BEGIN,
        f"## Best-of-n from the starting model ({datetime.date.today()}, `benchmarks/best_of_n.py`)",
        "",
        f"Model `{meta['model']}`, reward `{args.reward}`, {args.quant}; {meta['prompts']} held-out prompts "
        f"(eval seed {args.eval_seed}), {args.min_new_tokens}-{args.max_new_tokens} new tokens; "
        f"{args.n} samples per prompt in {meta['seconds']:.0f} s on {cpu_name()} ({cpu_flags()}), "
        f"{torch.get_num_threads()} thread(s).",
        "",
        "| n | P(positive) | KL (nats, log n - (n-1)/n) | distinct-1 | distinct-2 (x n=1) | base log-lik./token |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['reward_prob_mean']:.3f} | {r['kl_bound']:.2f} | {r['distinct_1']:.3f} | "
            f"{r['distinct_2']:.3f} ({r['distinct_2'] / base['distinct_2']:.2f}) | {r['base_logp_per_token']:.2f} |"
        )
    lines += [
        "",
        f"The optimum of PPO's objective, E[score clipped at {args.score_clip:g}] - beta KL, estimated over the "
        f"same {args.n} samples per prompt (weights softmax(score / beta) per prompt, "
        "`minippo.app.report.kl_regularised_optimum`; distinct-n and log-likelihood: means over 20 draws of "
        "one sample per prompt by those weights):",
        "",
        "| beta | P(positive) | KL (nats) | effective samples per prompt | distinct-1 | distinct-2 (x n=1) "
        "| base log-lik./token |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in optima:
        lines.append(
            f"| {r['beta']:g} | {r['reward_prob_mean']:.3f} | {r['kl']:.2f} | {r['effective_samples']:.1f} | "
            f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} ({r['distinct_2'] / base['distinct_2']:.2f}) | "
            f"{r['logp']:.2f} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, help="the starting model of PPO (e.g. runs/demo/merged)"
    )
    p.add_argument("--reward", required=True, help="the reward folder (e.g. runs/demo/reward)")
    p.add_argument("--quant", default="8bit", choices=("8bit", "4bit", "none"))
    p.add_argument("--n", type=int, default=32, help="samples per prompt (N)")
    p.add_argument(
        "--prompts", type=int, default=64, help="held-out prompts (PPO's --eval-prompts)"
    )
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--min-new-tokens", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--betas", default="0.1,0.2,0.3", help="KL coefficients of the optimum's table")
    p.add_argument(
        "--score-clip", type=float, default=3.0, help="PPO's score clip in the optimum's table"
    )
    p.add_argument(
        "--json", help="also write the rows and samples here; a later run reuses its samples"
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    if args.n < 1 or args.prompts < 1:
        p.error("--n and --prompts must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rounds, seconds = earlier_rounds(args)
    t = time.perf_counter()
    rounds, meta = sample_rounds(args, rounds)
    meta["seconds"] = seconds + time.perf_counter() - t
    sizes = [2**i for i in range(args.n.bit_length()) if 2**i <= args.n]
    rows = [best_of(rounds, n) for n in sizes]
    optima = [optimum(rounds, float(beta), args.score_clip) for beta in args.betas.split(",")]
    text = report(rows, optima, meta, args)
    print(text)
    if args.json:
        record = {
            "settings": settings(args),
            "meta": meta,
            "rows": rows,
            "optima": optima,
            "rounds": rounds,
        }
        Path(args.json).write_text(json.dumps(record))
    if not args.no_write:
        from ppo_step import write_section

        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
