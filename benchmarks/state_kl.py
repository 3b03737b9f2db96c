"""An experiment, not a feature: `minippo ppo` with the exact KL to the reference at every visited
state added to the loss, to measure whether a penalty without sampling noise keeps the starting
model's diversity (the README's second-round table; at 0.1 it kept the diversity by keeping the
reward down).

    .venv/bin/python benchmarks/state_kl.py --coef 0.1 -- --model runs/demo/merged --reward runs/demo/reward ...

PPO's KL penalty is a reward, -beta (log pi(y_t) - log ref(y_t)) at each sampled token (k1): right
on average, noisy per token. This adds to each minibatch's loss, beside it, --coef times the mean
over response tokens of the full-vocabulary KL(pi(.|s_t) || ref(.|s_t)), computed from the policy's
and the reference's logits (one more forward with the adapters off per micro-batch) and
differentiated exactly. Done by wrapping two functions for this process only: `PPOTrainer._forward`
(keeps the reference's logits of each forward with gradients) and `minippo.policy.entropy_from_logits`
(inside the loss, which takes the logits path for the entropy bonus, it returns minus that KL, so the
bonus's slot, with entropy_coef = --coef, adds coef x KL; its log line "loss/entropy" is then -KL). Everything else is `minippo ppo` with the flags
after `--`, in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def patch() -> None:
    import torch

    from minippo import core, policy
    from minippo.lora import disable_adapters
    from minippo.policy import maybe_autocast
    from minippo.ppo import PPOTrainer

    forward, entropy, reference = PPOTrainer._forward, core.entropy_from_logits, []

    def forward_keeping_reference(self, micro, with_values=True):
        if torch.is_grad_enabled():  # the loss's forward: the reference's logits at the same states
            t, temperature = micro.response_ids.shape[1], self.config.temperature
            with torch.no_grad(), disable_adapters(self.policy.model):
                with maybe_autocast(self.device.type, self.compute_dtype):
                    reference.append(
                        self.policy(micro.input_ids, micro.attention_mask, t, temperature, False)[0]
                    )
        return forward(self, micro, with_values)

    def minus_state_kl(logits):
        if not (torch.is_grad_enabled() and reference):
            return entropy(logits)
        logp = torch.log_softmax(logits.float(), dim=-1)
        ref_logp = torch.log_softmax(reference.pop().float(), dim=-1)
        return -(logp.exp() * (logp - ref_logp)).sum(-1)  # (b, T): -KL(pi || ref) per state

    # with entropy_coef > 0 the loss's forward takes the logits path, whose entropy is policy's name
    PPOTrainer._forward, policy.entropy_from_logits = forward_keeping_reference, minus_state_kl


def main(argv=None) -> int:
    from _experiment import parse_flags

    coef = (
        "--coef",
        dict(type=float, default=0.1, help="weight of the per-state KL in the loss (> 0)"),
    )
    args, ppo_flags = parse_flags(__doc__, argv, coef)
    if not args.coef > 0:
        raise SystemExit(f"--coef must be > 0, got {args.coef}")
    patch()
    from minippo.app.cli import main as minippo

    return minippo(["ppo", *ppo_flags, "--entropy-coef", str(args.coef)])


if __name__ == "__main__":
    sys.exit(main())
