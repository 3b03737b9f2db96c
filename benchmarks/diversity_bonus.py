"""An experiment, not a feature: `minippo ppo` with a penalty on the bigrams that a step's samples
share, to measure whether a batch-level diversity term keeps the starting model's variety while the
reward rises (the README's second-round table).

    .venv/bin/python benchmarks/diversity_bonus.py --coef 1.0 -- --model runs/demo/merged --reward runs/demo/reward ...

Each sample's score, clipped as the trainer clips it (--score-clip), loses --coef times the share of
its response's bigrams that occur more than once in the step's batch (in another sample or twice in
itself): the quantity distinct-2 counts, per sample. Among samples that reach the clip, the ones
phrased like no other sample of the batch keep the whole score. Only the training scores change; the
held-out evaluation scores with the plain reward. Done by wrapping `PPOTrainer.step` for this process
only (one process, not under torchrun: the batch is the process's own; a score at -clip
stays there); its metrics.jsonl gains
"env/shared_bigrams" (the batch's mean share) and "env/diversity_penalty".
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shared_bigrams(responses) -> list[float]:
    """For each response (1-D token ids), the share of its bigrams that occur more than once over all
    the responses (0.0 for a response shorter than two tokens)."""
    grams = [list(zip(r.tolist(), r.tolist()[1:])) for r in responses]
    counts = Counter(g for seq in grams for g in seq)
    return [sum(counts[g] > 1 for g in seq) / len(seq) if seq else 0.0 for seq in grams]


def patch(coef: float) -> None:
    import torch

    from minippo.ppo import PPOTrainer

    step = PPOTrainer.step

    def step_with_penalty(self, queries, responses, scores, *args, **kwargs):
        shared = torch.tensor(shared_bigrams(responses), dtype=torch.float32)
        clip, scale = self.config.score_clip, self.config.score_scale
        clipped = torch.as_tensor(scores, dtype=torch.float32) * scale
        clipped = clipped.clamp(-clip, clip) if clip is not None else clipped
        stats = step(self, queries, responses, (clipped - coef * shared) / scale, *args, **kwargs)
        stats["env/shared_bigrams"] = shared.mean().item()
        stats["env/diversity_penalty"] = coef * shared.mean().item()
        return stats

    PPOTrainer.step = step_with_penalty


def main(argv=None) -> int:
    from _experiment import parse_flags

    coef = ("--coef", dict(type=float, default=1.0, help="weight of the shared-bigram share (> 0)"))
    args, ppo_flags = parse_flags(__doc__, argv, coef)
    if not args.coef > 0:
        raise SystemExit(f"--coef must be > 0, got {args.coef}")
    if any(flag.startswith(("--use-score-scaling", "--use-score-norm")) for flag in ppo_flags):
        raise SystemExit("diversity_bonus.py subtracts after the clip: run it without score normalisation")
    patch(args.coef)
    from minippo.app.cli import main as minippo

    return minippo(["ppo", *ppo_flags])


if __name__ == "__main__":
    sys.exit(main())
