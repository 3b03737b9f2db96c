"""`minippo ppo --diversity-coef`: the training scores lowered for the bigrams a batch repeats, after
the trainer's clip, and what it does to a policy that a reward drives into repeating itself."""

import pytest
import torch
from tiny import tiny_model

from minippo.app.pipeline import PPORunConfig, penalise_repeats, ppo_step
from minippo.lora import LoRAConfig, add_lora
from minippo.ppo import PPOConfig, PPOTrainer

PROMPTS = ["This movie", "A wonderful, moving picture with a", "Boring and", "The best film of"]


# Tiny models run fastest on one thread, and far more steadily on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_penalty_comes_after_the_trainers_scale_and_clip(device):
    config = PPOConfig(score_scale=2.0, score_clip=3.0)
    # a reward on the GPU returns its scores there; the shares are counted on the CPU
    scores, repeated = torch.tensor([5.0, 1.0, -5.0], device=device), torch.tensor([0.5, 0.0, 1.0])
    passed = penalise_repeats(config, scores, repeated, coef=1.0)
    # what the trainer then scores with (scale, then clip): clip(2 x score) - coef x repeated, where
    # the trainer's own clip keeps the last at -3
    seen = (passed * config.score_scale).clamp(-3.0, 3.0)
    assert passed.device == scores.device and seen.tolist() == pytest.approx([3.0 - 0.5, 2.0, -3.0])
    unclipped = penalise_repeats(PPOConfig(), scores, repeated, coef=2.0)
    assert unclipped.tolist() == pytest.approx([4.0, 1.0, -7.0])


def test_bad_diversity_settings_say_what_to_change():
    with pytest.raises(ValueError, match="diversity_coef must be a number >= 0"):
        PPORunConfig(diversity_coef=-1.0)
    with pytest.raises(ValueError, match="use one or the other"):
        PPORunConfig(diversity_coef=1.0, ppo=PPOConfig(use_score_scaling=True))


class LikedTokens:
    """A reward that a policy can max out by repeating itself: 4 x the share of the response's tokens
    whose id is a multiple of 8 (a few dozen of the tiny vocabulary). The trainer's generate() is
    wrapped to hand it the token ids of the responses it scores."""

    def __init__(self, trainer):
        generate, self.responses = trainer.generate, []

        def keep(queries, **kwargs):
            self.responses = generate(queries, **kwargs)
            return self.responses

        trainer.generate = keep

    def scores_and_probabilities(self, texts):
        share = torch.tensor([(r % 8 == 0).float().mean().item() for r in self.responses])
        return 4 * share, share


def test_the_penalty_keeps_a_collapsing_policy_diverse(tokenizer):
    """Without the penalty, PPO on LikedTokens collapses onto a few liked tokens (distinct-2 of the
    samples falls from 1.0 to 0.5-0.65); with diversity_coef 4 it raises the liked share too, while the
    samples stay about as varied as at the start (0.93-0.99). Measured over 3 seeds on AVX-512 and
    AVX2 kernels alike: a small KL coefficient makes the collapse sure, not a matter of rounding."""

    def run(coef: float) -> list[dict]:
        torch.manual_seed(0)
        model = tiny_model("llama", vocab_size=len(tokenizer))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10.0)
        config = PPOConfig(
            batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-2, temperature=1.0,
            min_new_tokens=8, max_new_tokens=8, init_kl_coef=0.01, adap_kl_ctrl=False, score_clip=3.0, seed=0,
        )  # fmt: skip
        trainer = PPOTrainer(
            config, add_lora(model, LoRAConfig(target_modules="all-linear")), tokenizer
        )
        reward = LikedTokens(trainer)
        queries = [torch.tensor(tokenizer(PROMPTS[i % 4])["input_ids"]) for i in range(16)]
        return [ppo_step(trainer, tokenizer, reward, queries, coef)[0] for _ in range(30)]

    def last(stats, key):
        return sum(s[key] for s in stats[-6:]) / 6

    plain, penalised = run(0.0), run(4.0)
    start = sum(s["env/reward_prob_mean"] for s in plain[:3]) / 3
    assert last(plain, "env/reward_prob_mean") > start + 0.3, "the reward should be learnable"
    assert last(plain, "env/distinct_2") < 0.8, "without the penalty the policy should collapse"
    assert last(penalised, "env/reward_prob_mean") > start + 0.1
    assert last(penalised, "env/distinct_2") > last(plain, "env/distinct_2") + 0.15
    assert last(penalised, "env/repeated_bigrams") < last(plain, "env/repeated_bigrams") / 2
