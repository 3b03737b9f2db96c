"""An experiment, not a feature: `minippo ppo` with K samples per prompt and RLOO's leave-one-out
baseline (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs", arXiv:2402.14740), to measure whether a per-prompt baseline lowers the
noise of PPO's updates (the README's second-round table; it did not move the result).

    .venv/bin/python benchmarks/rloo_baseline.py --k 4 -- --model runs/demo/merged --reward runs/demo/reward ...

Each step takes batch_size / K prompts, each K times in a row; after the trainer has scaled and
clipped the scores, each one has the mean of its K - 1 siblings' subtracted. Everything else is
`minippo ppo` with the flags after `--`, in one process (not under torchrun). Done by wrapping two
functions for this process only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def patch(k: int) -> None:
    import minippo.app.pipeline as pipeline
    from minippo.ppo import PPOTrainer

    batches, normalise = pipeline.cycle_batches, PPOTrainer._normalise_scores

    def grouped_batches(n: int, batch_size: int, seed: int):
        if batch_size % k:
            raise SystemExit(f"--batch-size ({batch_size}) must be divisible by --k ({k})")
        for indices in batches(n, batch_size, seed):
            yield [
                i for i in indices[: batch_size // k] for _ in range(k)
            ]  # prompt a, a, a, a, b, ...

    def leave_one_out(self, scores):
        grouped = normalise(self, scores).view(-1, k)  # (B / k, k): a prompt's samples in a row
        siblings = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
        return (grouped - siblings).reshape(-1)

    pipeline.cycle_batches, PPOTrainer._normalise_scores = grouped_batches, leave_one_out


def main(argv=None) -> int:
    from _experiment import parse_flags

    k = ("--k", dict(type=int, default=4, help="samples per prompt (>= 2)"))
    args, ppo_flags = parse_flags(__doc__, argv, k)
    if args.k < 2:
        raise SystemExit(f"--k must be >= 2, got {args.k}")
    patch(args.k)
    from minippo.app.cli import main as minippo

    return minippo(["ppo", *ppo_flags])


if __name__ == "__main__":
    sys.exit(main())
