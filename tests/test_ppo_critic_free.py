"""PPOTrainer with the critic-free estimators (advantage_estimator "grpo", "rloo"): no value head trained,
saved or run; groups of num_generations samples; GRPO's KL in the loss; the loss aggregations; resume."""

import pytest
import torch
from probes import ForwardCounter, Recorder
from tiny import tiny_model

from minippo.core import grpo_advantages, rloo_advantages
from minippo.lora import LoRAConfig, add_lora, lora_state_dict
from minippo.ppo import PPOConfig, PPOTrainer
from minippo.quant import prepare_model_for_kbit_training, quantize_model

PROMPTS = ["This movie", "A wonderful, moving picture with a"]
GROUP = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    settings = dict(
        advantage_estimator="grpo",
        num_generations=GROUP,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        learning_rate=1e-2,
        min_new_tokens=2,
        max_new_tokens=6,
        temperature=0.9,
        init_kl_coef=0.0,
        adap_kl_ctrl=False,
        seed=0,
    )
    return PPOConfig(**(settings | overrides))


def lora_model(tokenizer, bits=None, seed=0):
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    if bits:
        quantize_model(model, bits=bits)
        prepare_model_for_kbit_training(model)
    return add_lora(model, LoRAConfig(target_modules="all-linear"))


def grouped_queries(tokenizer, n_prompts=2):
    """Each prompt GROUP times in a row, as `repeat_interleave` lays them out."""
    prompts = [torch.tensor(tokenizer(PROMPTS[i % 2])["input_ids"]) for i in range(n_prompts)]
    return [p for p in prompts for _ in range(GROUP)]


def scores_for(responses):
    """Every 8th token id earns a point: scores that differ within a group."""
    return [float((r % 8 == 0).sum()) for r in responses]


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(advantage_estimator="ppo"), "advantage_estimator must be one of"),
        (dict(num_generations=1), "num_generations >= 2"),
        (dict(num_generations=3), r"num_generations \(3\) must divide batch_size \(8\)"),
        (dict(loss_type="bnpo"), "loss_type must be one of"),
        (dict(beta=-0.1), "beta must be a number >= 0"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_every_process_must_hold_whole_groups():
    with pytest.raises(ValueError, match=r"each takes 4 samples, which num_generations \(8\)"):
        PPOTrainer._split_batch(config(num_generations=8, mini_batch_size=8), world_size=2)


def test_uses_reference_only_with_a_kl():
    assert not config().uses_reference
    assert config(beta=0.04).uses_reference
    assert config(init_kl_coef=0.1).uses_reference
    assert not config().uses_value_head and PPOConfig().uses_value_head


# -- one step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_critic_free_step_trains_the_adapter_and_no_value_head(tokenizer, bits, estimator):
    model = lora_model(tokenizer, bits)
    trainer = PPOTrainer(config(advantage_estimator=estimator), model, tokenizer)
    head = {k: v.clone() for k, v in trainer.policy.value_head.state_dict().items()}
    assert not any(p.requires_grad for p in trainer.policy.value_head.parameters())
    head_ids = {id(p) for p in trainer.policy.value_head.parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not head_ids & optimised
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    queries = grouped_queries(tokenizer)
    stats = trainer.step(
        queries, trainer.generate(queries), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0.0])
    )
    assert any(not torch.equal(before[k], v) for k, v in lora_state_dict(model).items())
    for k, v in trainer.policy.value_head.state_dict().items():
        assert torch.equal(head[k], v), k
    assert "ppo/loss/value" not in stats and "ppo/val/error" not in stats
    assert "objective/kl" not in stats  # no KL used: no reference forward, nothing to log
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_the_buffer_holds_the_group_advantages_at_every_token(tokenizer, estimator):
    overrides = dict(advantage_estimator="rloo" if estimator == "rloo" else "grpo")
    overrides |= dict(scale_rewards=estimator != "dr_grpo")
    trainer = PPOTrainer(config(**overrides), lora_model(tokenizer), tokenizer)
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    queries = grouped_queries(tokenizer)
    responses = trainer.generate(queries)
    scores = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2])  # the second group all equal: advantage 0
    trainer.step(queries, responses, scores)
    batch = recorder.buffers[0]
    if estimator == "rloo":
        want = rloo_advantages(scores, GROUP)
    else:
        want = grpo_advantages(scores, GROUP, scale_by_std=estimator == "grpo")
    mask = batch.response_mask
    assert torch.allclose(batch.advantages, want[:, None] * mask)
    assert batch.advantages[4:].abs().sum() == 0
    assert batch.values is None and batch.returns is None and batch.ref_logprobs is None


def test_the_kl_in_the_reward_lowers_each_sequence_reward_before_the_baseline(tokenizer):
    trainer = PPOTrainer(config(init_kl_coef=0.5), lora_model(tokenizer), tokenizer)
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    queries = grouped_queries(tokenizer)
    trainer.step(queries, trainer.generate(queries), torch.arange(8.0))  # the adapters move off 0
    trainer.step(queries, trainer.generate(queries), torch.zeros(8))  # only the KL differs now
    batch = recorder.buffers[1]
    kl = (batch.old_logprobs - batch.ref_logprobs) * batch.response_mask
    want = grpo_advantages(-0.5 * kl.sum(1), GROUP)
    assert want.abs().sum() > 0
    assert torch.allclose(batch.advantages, want[:, None] * batch.response_mask, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_beta_zero_runs_no_reference_forward(tokenizer, beta):
    """batch 8 in micro-batches of 4, one epoch of 2 minibatches: the rollout's 2 forwards, the
    updates' 2, and the reference's 2 only where a KL is used."""
    trainer = PPOTrainer(config(beta=beta, ppo_epochs=1), lora_model(tokenizer), tokenizer)
    queries = grouped_queries(tokenizer)
    responses = trainer.generate(queries)
    with ForwardCounter(trainer) as counter:
        stats = trainer.step(queries, responses, torch.arange(8.0))
    assert counter.calls == (6 if beta else 4)
    assert ("ppo/loss/kl" in stats) == (beta > 0)


def test_the_kl_term_in_the_loss_pulls_towards_the_reference(tokenizer):
    """With zero scores only GRPO's beta * k3 term moves the adapters: on the responses it is computed
    on, the policy's log-probabilities move towards the reference's (k3 is 0 exactly where they meet)."""
    trainer = PPOTrainer(config(beta=1.0, learning_rate=3e-3), lora_model(tokenizer), tokenizer)
    with torch.no_grad():
        for name, p in trainer.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # start away from the reference
    queries = grouped_queries(tokenizer)
    responses = trainer.generate(queries)
    distances = []
    for _ in range(5):
        logp, mask = trainer.response_logprobs(queries, responses)
        ref, _ = trainer.response_logprobs(queries, responses, reference=True)
        distances.append(((logp - ref).abs() * mask).sum().item())  # sum of |log pi - log pi_ref|
        trainer.step(queries, responses, torch.zeros(8))
    assert distances[-1] < 0.5 * distances[0], distances


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_gives_the_same_update_for_every_loss_type(tokenizer, loss_type):
    """Micro-batches weighted by their share of the minibatch's tokens (dapo) or responses (grpo,
    dr_grpo): 1 micro-batch of 8 and 4 of 2 make the same (SGD) update, on responses of uneven lengths."""
    queries = grouped_queries(tokenizer)
    responses = [torch.randint(3, 300, (n,)) for n in (1, 6, 2, 5, 3, 3, 6, 2)]
    changes = []
    for accumulation in (1, 4):
        model = lora_model(tokenizer)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        settings = dict(loss_type=loss_type, mini_batch_size=8, ppo_epochs=1, stop_at_eos=True)
        trainer = PPOTrainer(
            config(gradient_accumulation_steps=accumulation, **settings),
            model,
            tokenizer,
            optimizer=sgd,
        )
        before = {k: v.clone() for k, v in lora_state_dict(model).items()}
        trainer.step(queries, responses, torch.arange(8.0))
        changes.append({k: v - before[k] for k, v in lora_state_dict(model).items()})
    for k in changes[0]:
        torch.testing.assert_close(changes[0][k], changes[1][k], atol=1e-6, rtol=1e-4)
    assert any(v.abs().max() > 0 for v in changes[0].values())


def test_the_loss_types_weigh_a_step_differently(tokenizer):
    losses = {}
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        trainer = PPOTrainer(config(loss_type=loss_type), lora_model(tokenizer), tokenizer)
        queries = grouped_queries(tokenizer)
        stats = trainer.step(queries, trainer.generate(queries), torch.arange(8.0))
        losses[loss_type] = stats["ppo/loss/policy"]
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


# -- checkpoints ----------------------------------------------------------------------------------


def run_steps(trainer, tokenizer, n):
    queries = grouped_queries(tokenizer)
    for _ in range(n):
        responses = trainer.generate(queries)
        trainer.step(queries, responses, scores_for(responses))


def scheduled_trainer(tokenizer):
    trainer = PPOTrainer(config(beta=0.05), lora_model(tokenizer), tokenizer)
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda s: 1 / (1 + s)
    )
    return trainer


def test_resume_continues_exactly_with_grpo(tmp_path, tokenizer):
    """4 steps straight == 2 steps, save, a fresh trainer, load, 2 steps; no value head in the files."""
    straight = scheduled_trainer(tokenizer)
    run_steps(straight, tokenizer, 4)
    first = scheduled_trainer(tokenizer)
    run_steps(first, tokenizer, 2)
    first.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "value_head.safetensors").exists()
    run_steps(first, tokenizer, 1)  # the RNG moves on after the save; load puts it back
    resumed = scheduled_trainer(tokenizer)
    resumed.load(tmp_path / "ckpt")
    run_steps(resumed, tokenizer, 2)
    assert resumed.current_step == 4
    a = lora_state_dict(straight.policy.model)
    b = lora_state_dict(resumed.policy.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
