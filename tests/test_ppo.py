"""PPOConfig and PPOTrainer: invariants of one step, bad input, checkpoints, and end-to-end learning."""

import dataclasses
import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from probes import ForwardCounter, capture
from tiny import field_docs, tiny_model

from minippo import fast as fast_path
from minippo.core import kl_penalty
from minippo.lora import LoRAConfig, add_lora, lora_state_dict
from minippo.policy import PolicyWithValueHead
from minippo.ppo import FAST_MARKER, PPOConfig, PPOTrainer
from minippo.quant import prepare_model_for_kbit_training, quantize_model

PROMPTS = ["This movie", "A wonderful, moving picture with a", "Boring and", "The best film of"]


# Tiny models run fastest on one thread, and far more steadily on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def encode(tokenizer, n):
    return [torch.tensor(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]) for i in range(n)]


def lora_model(arch, tokenizer, int8=False, head_scale=1.0, seed=0, dtype=torch.float32):
    model = tiny_model(arch, vocab_size=len(tokenizer), seed=seed).to(dtype)
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    if int8:
        quantize_model(model)
        if int8 == "bf16 embeddings":  # as load_model(fast=True) stores them where bf16 is native
            fast_path.enable(model, embeddings_dtype=torch.bfloat16)
        prepare_model_for_kbit_training(model)
    return add_lora(model, LoRAConfig(target_modules="all-linear"))


def small_config(**overrides):
    settings = dict(
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        learning_rate=1e-2,
        min_new_tokens=2,
        max_new_tokens=6,
        temperature=0.9,
        seed=0,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def assert_a_step_trains(trainer, model, tokenizer):
    """One PPO step on 8 generated samples: finite stats, and the adapters move."""
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    queries = encode(tokenizer, 8)
    stats = trainer.step(queries, trainer.generate(queries), torch.randn(8))
    assert all(
        torch.isfinite(torch.tensor(v)).all() for v in stats.values() if isinstance(v, float)
    )
    assert any(not torch.equal(before[k], v) for k, v in lora_state_dict(model).items())


def make_trainer(arch, tokenizer, int8=False, dtype=torch.float32, **overrides):
    trainer = PPOTrainer(
        small_config(**overrides), lora_model(arch, tokenizer, int8, dtype=dtype), tokenizer
    )
    queries = encode(tokenizer, trainer.config.batch_size)
    responses = trainer.generate(queries)
    return trainer, queries, responses


def adapter_snapshot(trainer):
    state = {k: v.clone() for k, v in lora_state_dict(trainer.policy.model).items()}
    state.update(
        {f"value_head.{k}": v.clone() for k, v in trainer.policy.value_head.state_dict().items()}
    )
    return state


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_follow_trl():
    c = PPOConfig()
    assert (c.learning_rate, c.ppo_epochs, c.init_kl_coef, c.adap_kl_ctrl, c.target, c.horizon) == (
        1.41e-5,
        4,
        0.2,
        True,
        6.0,
        10000.0,
    )
    assert (c.gamma, c.lam, c.cliprange, c.cliprange_value, c.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert (c.kl_penalty, c.whiten_rewards, c.max_grad_norm, c.early_stopping, c.target_kl) == (
        "kl",
        False,
        None,
        False,
        0.1,
    )
    assert (c.ratio_threshold, c.gradient_accumulation_steps, c.batch_size) == (10.0, 1, 256)


def test_every_config_field_has_a_docstring():
    docs = field_docs(PPOConfig)
    missing = [f.name for f in dataclasses.fields(PPOConfig) if not docs.get(f.name)]
    assert not missing


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=10, mini_batch_size=4), "divisible by mini_batch_size"),
        (
            dict(mini_batch_size=4, gradient_accumulation_steps=3),
            "divisible by gradient_accumulation_steps",
        ),
        (dict(kl_penalty="full"), "kl_penalty must be one of"),
        (dict(learning_rate=-1.0), "learning_rate must be a positive"),
        (dict(ppo_epochs=0), "ppo_epochs must be a positive integer"),
        (dict(lam=1.5), "lam must be in"),
        (dict(min_new_tokens=8, max_new_tokens=4), "min_new_tokens"),
        (dict(compute_dtype="int8"), "compute_dtype"),
        (dict(compute_dtype="float16"), "loss scaling"),
        (dict(use_score_norm=True), "use_score_scaling"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(temperature=0.0), "temperature"),
        (dict(device="gpu"), "not a device"),
        (dict(adap_kl_ctrl=False, min_kl_coef=0.1), "min_kl_coef > 0 needs adap_kl_ctrl=True"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**overrides)


# -- construction -------------------------------------------------------------------------------


def test_auto_compute_dtype_follows_the_hardware(tokenizer, monkeypatch):
    from minippo import quant

    model = lora_model("llama", tokenizer)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert quant.auto_compute_dtype("cpu", model) == want
        assert (
            PPOTrainer(small_config(compute_dtype="auto"), model, tokenizer).compute_dtype == want
        )
    # an 8-bit model on a CPU: float32 even where bf16 is native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert (
        quant.auto_compute_dtype("cpu", lora_model("llama", tokenizer, int8=True)) == torch.float32
    )


def test_auto_storage_dtype_is_the_compute_dtype_and_trains(tokenizer, tiny_model_dir, monkeypatch):
    """load_model(dtype="auto") stores the frozen float parts in the dtype auto computes in: bfloat16
    where it is native (here pretended), float32 without it and for an 8-bit model on a CPU; a PPO
    step runs on the bfloat16-stored model and moves its adapters."""
    from minippo.quant import load_model

    folder = tiny_model_dir  # (conftest: no AMX, no native bf16 unless switched on here)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert load_model(folder, dtype="auto").lm_head.weight.dtype == want
    assert load_model(folder, dtype="auto", load_in_8bit=True).lm_head.weight.dtype == torch.float32
    model = add_lora(load_model(folder, dtype="auto"), LoRAConfig(target_modules="all-linear"))
    assert model.lm_head.weight.dtype == torch.float32  # native bf16 is off again: float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    model = add_lora(load_model(folder, dtype="auto"), LoRAConfig(target_modules="all-linear"))
    trainer = PPOTrainer(small_config(compute_dtype="auto"), model, tokenizer)
    assert model.lm_head.weight.dtype == trainer.compute_dtype == torch.bfloat16
    assert_a_step_trains(trainer, model, tokenizer)


def test_scheduler_steps_once_per_ppo_step(tokenizer):
    model = lora_model("llama", tokenizer)
    trainer = PPOTrainer(small_config(), model, tokenizer)
    trainer.lr_scheduler = torch.optim.lr_scheduler.StepLR(
        trainer.optimizer, step_size=1, gamma=0.5
    )
    queries = encode(tokenizer, trainer.config.batch_size)
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    for n in (1, 2):
        stats = trainer.step(queries, trainer.generate(queries), [1.0] * len(queries))
        assert stats["ppo/updates"] > 1  # several optimiser updates, one scheduler step
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5**n)


def test_score_normalisation_uses_running_statistics(tokenizer):
    """The scores entering the rewards (the rollout buffer's, seen by a callback) are centred and scaled
    by the moments of every score so far, this batch's included."""
    trainer, queries, responses = make_trainer(
        "llama", tokenizer, use_score_scaling=True, use_score_norm=True
    )
    seen = capture(trainer)
    given = []
    for scores in (torch.tensor([0.0, 0.0, 1.0, 0.0] * 2), torch.tensor([0.0, 1.0, 1.0, 3.0] * 2)):
        given.append(scores)
        trainer.step(queries, responses, scores)
        everything = torch.cat(given)
        expected = (scores - everything.mean()) / everything.std()
        torch.testing.assert_close(seen.buffers[-1].scores, expected, atol=1e-6, rtol=0)
    scaled_only, queries, responses = make_trainer("llama", tokenizer, use_score_scaling=True)
    seen = capture(scaled_only)
    x = torch.tensor([0.0, 0.0, 1.0, 0.0] * 2)
    scaled_only.step(queries, responses, x)
    torch.testing.assert_close(seen.buffers[-1].scores, x / x.std(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_step_trains_under_no_grad_and_inference_mode(tokenizer, context):
    """step() turns gradients on for itself: called under no_grad or inference_mode (its inputs made there
    too), it makes the update it makes outside them, bit for bit."""
    snapshots = []
    for inside in (False, True):
        torch.manual_seed(0)
        trainer, queries, responses = make_trainer("llama", tokenizer, int8=True)
        before = adapter_snapshot(trainer)
        with context() if inside else torch.enable_grad():
            queries, responses = [q.clone() for q in queries], [r.clone() for r in responses]
            trainer.step(queries, responses, torch.linspace(-1, 1, len(queries)))
        snapshots.append(adapter_snapshot(trainer))
    assert any(not torch.equal(before[k], v) for k, v in snapshots[1].items())  # it trained
    assert all(torch.equal(snapshots[0][k], v) for k, v in snapshots[1].items())


def test_trainer_needs_lora(tokenizer):
    with pytest.raises(ValueError, match="add_lora"):
        PPOTrainer(small_config(), tiny_model("llama", vocab_size=len(tokenizer)), tokenizer)


def test_only_adapters_and_value_head_train(arch, tokenizer):
    trainer = PPOTrainer(small_config(), lora_model(arch, tokenizer), tokenizer)
    names = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert names and all(
        "lora_A" in n or "lora_B" in n or n.startswith("value_head.") for n in names
    )
    assert {"value_head.summary.weight", "value_head.summary.bias"} <= names
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.trainable}
    assert not trainer.policy.training


def test_tokenizer_without_pad_token(tokenizer, caplog):
    no_pad = SimpleNamespace(pad_token_id=None, eos_token_id=tokenizer.eos_token_id)
    with caplog.at_level(logging.WARNING, logger="minippo.ppo"):
        trainer = PPOTrainer(small_config(), lora_model("llama", tokenizer), no_pad)
    assert "no pad token" in caplog.text
    assert trainer.pad_token_id == tokenizer.eos_token_id
    queries = encode(tokenizer, 8)
    responses = trainer.generate(queries)
    stats = trainer.step(queries, responses, [1.0] * 8)
    assert all(map(torch.isfinite, map(torch.tensor, stats.values())))


# -- one step: invariants -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "compute_dtype,int8,dtype",
    [
        ("float32", False, torch.float32),
        ("bfloat16", False, torch.float32),
        ("float32", True, torch.float32),
        ("float32", "bf16 embeddings", torch.float32),
        ("bfloat16", False, torch.bfloat16),  # a model stored in bf16
    ],
)
def test_first_minibatch_has_ratio_exactly_one(arch, tokenizer, compute_dtype, int8, dtype):
    trainer, queries, responses = make_trainer(
        arch,
        tokenizer,
        int8=int8,
        compute_dtype=compute_dtype,
        dtype=dtype,
        stop_at_eos=True,
        gradient_accumulation_steps=2,
    )
    seen = capture(trainer)
    for _ in range(2):  # also after the adapters have moved
        trainer.step(queries, responses, torch.randn(8))
        first = seen.minibatches[-2 * trainer.config.ppo_epochs]
        assert first["policy/ratio"].item() == 1.0
        assert first["policy/approxkl"].item() == 0.0
        assert first["policy/policykl"].item() == 0.0
        assert first["policy/clipfrac"].item() == 0.0
    # later minibatches see updated adapters
    assert seen.minibatches[-1]["policy/approxkl"].item() > 0


@pytest.mark.parametrize("int8", [False, True])
def test_the_fast_path_reuses_the_rollout_forward_for_the_first_update(arch, tokenizer, int8):
    """On a model marked fast, where one micro-batch is the whole batch, the rollout's forward keeps its
    graph and is the first update's: a step runs one forward fewer, and makes the update that
    recomputing it makes (the plain trainer), bit for bit."""
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = lora_model(arch, tokenizer, int8)
        if fast:
            setattr(model, FAST_MARKER, True)  # this piece of the fast path alone
        trainer = PPOTrainer(small_config(mini_batch_size=8), model, tokenizer)
        assert (trainer.rollout_reuse is not None) == fast
        queries = encode(tokenizer, 8)
        responses = trainer.generate(queries)
        seen = capture(trainer)
        with ForwardCounter(trainer) as counter:
            stats = trainer.step(queries, responses, torch.arange(8.0))
        results.append((adapter_snapshot(trainer), stats, counter.calls))
        assert seen.minibatches[0]["policy/ratio"].item() == 1.0
    (reused, reused_stats, n_reused), (recomputed, recomputed_stats, n_recomputed) = results
    assert (n_reused, n_recomputed) == (3, 4)  # rollout, reference, 2 epochs (the first one reused)
    assert_same(reused, recomputed)
    assert reused_stats["ppo/loss/total"] == recomputed_stats["ppo/loss/total"]


def test_the_reused_forward_is_handed_over_once():
    """`RolloutReuse.update` returns the kept outputs to the first update only (so they are freed with
    its backward), and never for another micro-batch."""
    from minippo.fast.reuse import RolloutReuse

    reuse = RolloutReuse()
    micro = SimpleNamespace(input_ids=torch.tensor([[1, 2, 3]]))
    other = SimpleNamespace(input_ids=torch.tensor([[1, 2, 4]]))
    calls = []

    def forward(m):
        calls.append(m)
        x = torch.ones(1, 2, requires_grad=True) * len(calls)
        return x, x, x

    detached = reuse.rollout(forward, micro)
    assert all(not t.requires_grad for t in detached)
    first = reuse.update(forward, micro)
    assert len(calls) == 1 and first[0].requires_grad  # the kept graph, no second forward
    assert reuse.kept is None
    reuse.update(forward, micro)
    assert len(calls) == 2  # handed over once: the second update recomputes
    reuse.rollout(forward, micro)
    reuse.update(forward, other)
    assert len(calls) == 4 and calls[-1] is other  # another micro-batch never gets the kept outputs


def test_reference_logprobs_come_from_the_base_model(arch, tokenizer):
    trainer, queries, responses = make_trainer(arch, tokenizer)
    base = tiny_model(arch, vocab_size=len(tokenizer))  # the same weights, never adapted
    seen = capture(trainer)
    stats = trainer.step(queries, responses, torch.ones(8))
    assert stats["objective/kl"] == 0.0  # adapters start at B = 0: the policy is the base model
    trainer.step(queries, responses, torch.ones(8))
    first, second = seen.buffers
    for i, (q, r) in enumerate(zip(queries, responses)):
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            logits = (
                base(input_ids=ids).logits[0, len(q) - 1 : -1].float() / 0.9
            )  # the config's temperature
        expected = torch.log_softmax(logits, -1).gather(-1, r[:, None])[:, 0]
        torch.testing.assert_close(first.ref_logprobs[i, : len(r)], expected, atol=1e-5, rtol=0)
    # the reference does not move when the adapters do (up to float rounding: each step batches the
    # samples differently); the policy does
    torch.testing.assert_close(first.ref_logprobs, second.ref_logprobs, atol=1e-5, rtol=0)
    assert (first.old_logprobs - second.old_logprobs).abs().max() > 1e-3
    assert trainer.step(queries, responses, torch.ones(8))["objective/kl"] != 0.0


@pytest.mark.parametrize("estimator", ["kl", "k3", "abs", "mse"])
def test_logged_kl_is_the_penalised_kl(tokenizer, estimator):
    trainer, queries, responses = make_trainer(
        "llama", tokenizer, kl_penalty=estimator, horizon=100.0, target=0.01
    )
    seen = capture(trainer)
    trainer.step(queries, responses, torch.randn(8))  # moves the adapters
    coef = trainer.kl_ctl.value
    stats = trainer.step(queries, responses, torch.randn(8))
    buf = seen.buffers[-1]
    kl = kl_penalty(buf.old_logprobs, buf.ref_logprobs, estimator) * buf.response_mask
    assert stats["objective/kl"] == pytest.approx(kl.sum(1).mean().item(), rel=1e-5)
    assert stats["objective/kl_coef"] == pytest.approx(coef)
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(
        -coef * stats["objective/kl"], rel=1e-5
    )
    # the rewards hold exactly this penalty plus the (unscaled) score at the last token
    scores_at_end = buf.rewards + coef * kl
    torch.testing.assert_close(scores_at_end.sum(1), buf.scores, atol=1e-5, rtol=1e-5)
    # the controller moved with this KL: error clip(kl / 0.01 - 1, +-0.2) over n=8 of horizon 100
    error = max(min(stats["objective/kl"] / 0.01 - 1, 0.2), -0.2)
    assert trainer.kl_ctl.value == pytest.approx(coef * (1 + error * 8 / 100))
    if estimator == "k3":
        assert (kl >= 0).all()


def test_min_kl_coef_makes_the_target_a_ceiling(tokenizer):
    # a KL far under the target lowers beta each step, unless the floor holds it at its start
    for floor in (0.0, 0.2):
        trainer, queries, responses = make_trainer(
            "llama", tokenizer, init_kl_coef=0.2, target=1e6, horizon=100.0, min_kl_coef=floor
        )
        for _ in range(2):
            trainer.step(queries, responses, torch.randn(8))
        expected = 0.2 if floor else 0.2 * (1 - 0.2 * 8 / 100) ** 2
        assert trainer.kl_ctl.value == pytest.approx(expected)


def test_fixed_kl_controller(tokenizer):
    trainer, queries, responses = make_trainer(
        "llama", tokenizer, adap_kl_ctrl=False, init_kl_coef=0.3
    )
    trainer.step(queries, responses, torch.randn(8))
    stats = trainer.step(queries, responses, torch.randn(8))
    assert trainer.kl_ctl.value == 0.3 and stats["objective/kl_coef"] == 0.3


def test_stats_names(tokenizer):
    trainer, queries, responses = make_trainer(
        "llama", tokenizer, max_grad_norm=1.0, whiten_rewards=True, score_scale=2.0, score_clip=1.0
    )
    stats = trainer.step(queries, responses, [5.0, -5.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    expected = {
        "objective/kl",
        "objective/kl_coef",
        "objective/entropy",
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/loss/total",
        "ppo/loss/entropy",
        "ppo/policy/entropy",
        "ppo/policy/approxkl",
        "ppo/policy/policykl",
        "ppo/policy/clipfrac",
        "ppo/policy/advantages_mean",
        "ppo/policy/ratio",
        "ppo/returns/mean",
        "ppo/returns/var",
        "ppo/val/vpred",
        "ppo/val/error",
        "ppo/val/clipfrac",
        "ppo/val/var_explained",
        "ppo/mean_scores",
        "ppo/mean_non_score_reward",
        "ppo/learning_rate",
        "env/reward_mean",
        "env/reward_std",
        "time/ppo/forward_pass",
        "time/ppo/optimize_step",
        "time/ppo/total",
        "ppo/grad_norm",
        "ppo/updates",
    }
    assert expected <= stats.keys()
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["env/reward_mean"] == pytest.approx(
        sum([5.0, -5.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) / 8
    )
    assert stats["ppo/updates"] == 4  # 2 epochs x 2 minibatches


def test_gradient_accumulation_gives_the_same_update(tokenizer):
    """Micro-batches weighted by their token share: the same gradient as the whole minibatch."""
    queries = encode(tokenizer, 8)
    responses = None
    results = []
    for steps in (1, 4):
        policy = PolicyWithValueHead(lora_model("llama", tokenizer))
        with torch.no_grad():
            torch.nn.init.normal_(policy.value_head.summary.weight, std=0.1)
        sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
        trainer = PPOTrainer(
            small_config(
                ppo_epochs=1, mini_batch_size=8, gradient_accumulation_steps=steps, stop_at_eos=True
            ),
            policy,
            tokenizer,
            optimizer=sgd,
        )
        if responses is None:  # uneven lengths, so the token weighting matters
            responses = [torch.randint(3, 300, (n,)) for n in (1, 6, 2, 5, 3, 3, 6, 2)]
        before = adapter_snapshot(trainer)
        trainer.step(queries, responses, torch.linspace(-1, 1, 8))
        results.append({k: v - before[k] for k, v in adapter_snapshot(trainer).items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-4)
    assert any(v.abs().max() > 0 for v in results[0].values())


def test_non_finite_loss_skips_the_update(tokenizer, caplog):
    trainer, queries, responses = make_trainer("llama", tokenizer)
    before = adapter_snapshot(trainer)
    with caplog.at_level(logging.WARNING, logger="minippo.ppo"):
        stats = trainer.step(
            queries, responses, [1e30] * 8
        )  # finite scores, an infinite value loss
    assert "non-finite loss" in caplog.text
    assert stats["ppo/skipped_updates"] == 4 and stats["ppo/updates"] == 0
    assert_same(before, adapter_snapshot(trainer))


def test_ratio_threshold_skips_the_update(tokenizer):
    trainer, queries, responses = make_trainer("llama", tokenizer, ratio_threshold=1e-3)
    before = adapter_snapshot(trainer)
    stats = trainer.step(queries, responses, torch.randn(8))
    assert stats["ppo/skipped_updates"] == 4
    assert_same(before, adapter_snapshot(trainer))


def test_early_stopping(tokenizer):
    trainer, queries, responses = make_trainer(
        "llama",
        tokenizer,
        early_stopping=True,
        target_kl=1e-9,
        ppo_epochs=4,
        mini_batch_size=2,
        learning_rate=5e-2,
    )
    stats = trainer.step(queries, responses, torch.linspace(-1, 1, 8))
    assert stats["ppo/early_stopped"] == 1.0
    assert 0 < stats["ppo/updates"] < 16


def test_max_grad_norm_clips(tokenizer):
    policy = PolicyWithValueHead(lora_model("llama", tokenizer))
    sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    trainer = PPOTrainer(
        small_config(max_grad_norm=1e-3, ppo_epochs=1, mini_batch_size=8),
        policy,
        tokenizer,
        optimizer=sgd,
    )
    queries = encode(tokenizer, 8)
    responses = trainer.generate(queries)
    before = adapter_snapshot(trainer)
    stats = trainer.step(queries, responses, [100.0] * 8)
    assert stats["ppo/grad_norm"] > 1e-3  # reported before clipping
    assert stats["ppo/updates"] == 1
    # one SGD step with lr 1 moves the parameters by exactly the clipped gradient
    moved = torch.cat([(v - before[k]).flatten() for k, v in adapter_snapshot(trainer).items()])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_errors(tokenizer):
    trainer, queries, responses = make_trainer("llama", tokenizer)
    scores = [1.0] * 8
    with pytest.raises(ValueError, match="7 queries, 8 responses and 8 scores"):
        trainer.step(queries[:7], responses, scores)
    with pytest.raises(ValueError, match="batch_size is 8"):
        trainer.step(queries[:4], responses[:4], scores[:4])
    with pytest.raises(ValueError, match="response 3 is empty"):
        trainer.step(
            queries, responses[:3] + [torch.tensor([], dtype=torch.long)] + responses[4:], scores
        )
    with pytest.raises(ValueError, match="scores must be finite"):
        trainer.step(queries, responses, scores[:7] + [float("nan")])
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        trainer.step([q[None] for q in queries], responses, scores)
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        trainer.step(queries, [r.float() for r in responses], scores)
    with pytest.raises(ValueError, match="outside"):
        trainer.step(queries, responses[:7] + [torch.tensor([10**6])], scores)
    with pytest.raises(ValueError, match="list of numbers"):
        trainer.step(queries, responses, ["good"] * 8)
    with pytest.raises(TypeError, match="temperature"):
        trainer.generate(queries, temperature=0.5)
    # a tensor of scores, or 0-d tensors, are fine
    trainer.step(queries, responses, torch.ones(8))
    trainer.step(queries, responses, [torch.tensor(1.0)] * 8)


# -- checkpoints --------------------------------------------------------------------------------


def test_save_and_load(tmp_path, arch, tokenizer):
    trainer, queries, responses = make_trainer(arch, tokenizer, target=0.01)
    trainer.step(queries, responses, torch.randn(8))
    path = tmp_path / "ckpt"
    trainer.save(path)
    assert {p.name for p in path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "value_head.safetensors",
        "optimizer.pt",
        "rng_state.pt",
        "trainer_state.json",
    }
    saved = adapter_snapshot(trainer)
    exp_avg = lambda t: [s["exp_avg"] for s in t.optimizer.state_dict()["state"].values()]
    saved_exp_avg = [t.clone() for t in exp_avg(trainer)]
    # the saved trainer goes on; the RNG state is in the checkpoint, so no re-seeding by hand below
    a = trainer.step(queries, trainer.generate(queries), torch.ones(8))
    fresh = PPOTrainer(small_config(target=0.01), lora_model(arch, tokenizer), tokenizer)
    with torch.no_grad():
        for p in fresh.trainable:
            p.normal_()  # load must overwrite every trainable tensor
    fresh.load(path)
    assert_same(saved, adapter_snapshot(fresh))
    assert fresh.kl_ctl.value != 0.2 and fresh.current_step == 1
    assert all(torch.equal(a, b) for a, b in zip(saved_exp_avg, exp_avg(fresh)))
    b = fresh.step(queries, fresh.generate(queries), torch.ones(8))  # continues identically
    assert a["ppo/loss/total"] == b["ppo/loss/total"]
    assert_same(adapter_snapshot(trainer), adapter_snapshot(fresh))


def scheduled_trainer(tokenizer, **overrides):
    trainer = PPOTrainer(small_config(**overrides), lora_model("llama", tokenizer), tokenizer)
    factor = lambda step: 1.0 / (1 + step)
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, factor)
    return trainer


def run_steps(trainer, tokenizer, n):
    """n steps of generate -> score (every 8th token id earns a point) -> step."""
    queries = encode(tokenizer, trainer.config.batch_size)
    for _ in range(n):
        responses = trainer.generate(queries)
        trainer.step(queries, responses, [float((r % 8 == 0).sum()) for r in responses])


def test_resume_continues_exactly(tmp_path, tokenizer):
    """4 steps straight == 2 steps, save, a new trainer (fresh model, freshly seeded), load, 2 steps:
    same adapters, value head, optimiser moments, learning rate and samples, bit for bit."""
    straight = scheduled_trainer(tokenizer)
    run_steps(straight, tokenizer, 4)
    first = scheduled_trainer(tokenizer)
    run_steps(first, tokenizer, 2)
    first.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "scheduler.pt").exists()
    run_steps(first, tokenizer, 1)  # the RNG moves on after the save; load must put it back
    resumed = scheduled_trainer(tokenizer)
    resumed.load(tmp_path / "ckpt")
    run_steps(resumed, tokenizer, 2)
    assert resumed.current_step == 4 and resumed.lr_scheduler.last_epoch == 4
    assert_same(adapter_snapshot(straight), adapter_snapshot(resumed))
    exp_avg_sq = lambda t: [s["exp_avg_sq"] for s in t.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg_sq(straight), exp_avg_sq(resumed)))
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_load_keeps_the_configured_learning_rate(tmp_path, tokenizer, caplog):
    trainer = PPOTrainer(
        small_config(learning_rate=1.41e-5), lora_model("llama", tokenizer), tokenizer
    )
    trainer.save(tmp_path / "plain")
    faster = PPOTrainer(small_config(learning_rate=1e-3), lora_model("llama", tokenizer), tokenizer)
    with caplog.at_level(logging.WARNING, logger="minippo.ppo"):
        faster.load(tmp_path / "plain")
    assert faster.optimizer.param_groups[0]["lr"] == 1e-3  # not the saved 1.41e-5
    assert "learning_rate: 1.41e-05 in the checkpoint, 0.001 now" in caplog.text
    # with a scheduler: the configured rate times the schedule's factor at the restored step
    scheduled = scheduled_trainer(tokenizer, learning_rate=1.41e-5)
    run_steps(scheduled, tokenizer, 3)
    scheduled.save(tmp_path / "scheduled")
    faster = scheduled_trainer(tokenizer, learning_rate=1e-3)
    faster.load(tmp_path / "scheduled")
    assert faster.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    faster.lr_scheduler.step()
    assert faster.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)


def test_load_refuses_a_checkpoint_from_another_config(tmp_path, tokenizer):
    trainer = PPOTrainer(small_config(), lora_model("llama", tokenizer), tokenizer)
    trainer.save(tmp_path / "ckpt")
    other = PPOTrainer(
        small_config(cliprange=0.3, seed=1), lora_model("llama", tokenizer), tokenizer
    )
    with pytest.raises(
        ValueError, match=r"(?s)cliprange: 0.2 in the checkpoint, 0.3 now.*seed: 0"
    ) as err:
        other.load(tmp_path / "ckpt")
    assert "learning_rate" in str(err.value)  # says what may change
    scheduled = scheduled_trainer(tokenizer)
    with pytest.raises(ValueError, match="without an LR scheduler"):
        scheduled.load(tmp_path / "ckpt")


def test_load_takes_a_checkpoint_older_than_a_config_field(tmp_path, tokenizer):
    trainer = PPOTrainer(small_config(), lora_model("llama", tokenizer), tokenizer)
    trainer.save(tmp_path / "ckpt")
    state_file = tmp_path / "ckpt" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["entropy_coef"]  # as saved before the field existed
    state_file.write_text(json.dumps(state))
    resumed = PPOTrainer(small_config(), lora_model("llama", tokenizer, seed=1), tokenizer)
    resumed.load(tmp_path / "ckpt")  # the missing field is taken as unchanged, not refused
    assert resumed.current_step == trainer.current_step
    assert_same(adapter_snapshot(resumed), adapter_snapshot(trainer))


def test_gradient_checkpointing_in_a_ppo_step(tokenizer, monkeypatch):
    """On: every decoder layer is checkpointed in the PPO epochs (in eval mode), the first ratio is
    still exactly 1, and the update equals the one without checkpointing."""
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    snapshots = []
    for on in (False, True):
        trainer, queries, responses = make_trainer("llama", tokenizer, gradient_checkpointing=on)
        assert trainer.policy.gradient_checkpointing is on and not trainer.policy.training
        seen = capture(trainer)
        before = calls["n"]
        trainer.step(queries, responses, torch.arange(8.0))
        micro_steps = len(seen.minibatches) * trainer.config.gradient_accumulation_steps
        assert calls["n"] - before == (2 * micro_steps if on else 0)  # 2 decoder layers
        assert seen.minibatches[0]["policy/ratio"].item() == 1.0
        snapshots.append(adapter_snapshot(trainer))
    for name in snapshots[0]:
        torch.testing.assert_close(
            snapshots[1][name], snapshots[0][name], rtol=1e-5, atol=1e-6, msg=name
        )


def test_gradient_checkpointing_default_follows_8bit(tokenizer):
    assert not PPOTrainer(
        small_config(), lora_model("llama", tokenizer), tokenizer
    ).policy.gradient_checkpointing
    int8 = PPOTrainer(small_config(), lora_model("llama", tokenizer, int8=True), tokenizer)
    assert int8.policy.gradient_checkpointing


def test_lora_dropout_is_warned_about(tokenizer, caplog):
    model = add_lora(tiny_model("llama", vocab_size=len(tokenizer)), LoRAConfig(r=4, dropout=0.1))
    with caplog.at_level(logging.WARNING, logger="minippo.ppo"):
        PPOTrainer(small_config(), model, tokenizer)
    assert caplog.text.count("LoRA dropout is ignored") == 1


def test_save_is_atomic(tmp_path, tokenizer, monkeypatch):
    trainer, queries, responses = make_trainer("llama", tokenizer)
    path = tmp_path / "ckpt"
    trainer.save(path)
    saved = (path / "adapter_model.safetensors").read_bytes()
    trainer.step(queries, responses, torch.randn(8))
    trainer.save(path)  # overwriting an existing checkpoint works
    assert (path / "adapter_model.safetensors").read_bytes() != saved
    saved = (path / "adapter_model.safetensors").read_bytes()
    trainer.step(queries, responses, torch.randn(8))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(path)
    assert (path / "adapter_model.safetensors").read_bytes() == saved  # the old checkpoint, intact
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind


# -- end to end ---------------------------------------------------------------------------------


def in_target_set(tokens):
    """The reward's token set: every 8th id (one token in eight at random)."""
    return tokens % 8 == 0


@pytest.mark.parametrize(
    "arch,int8,compute_dtype",
    [
        ("llama", False, "float32"),
        ("gpt2", False, "float32"),
        ("gpt_neox", False, "bfloat16"),
        ("llama", True, "float32"),
    ],
)
def test_ppo_raises_a_simple_reward(tokenizer, arch, int8, compute_dtype):
    """Reward: the share of response tokens in a fixed set. PPO must raise it clearly within 30 steps
    while the adaptive controller keeps the KL to the reference near its target.

    The tiny model's LM head is scaled up (x30) so its logits span a range like a trained LM's; at
    init its lm_head is so small that no hidden state can make any token likely.
    """
    torch.manual_seed(0)
    model = lora_model(arch, tokenizer, int8=int8, head_scale=30.0)
    config = PPOConfig(
        batch_size=64,
        mini_batch_size=32,
        ppo_epochs=2,
        learning_rate=3e-3,
        min_new_tokens=8,
        max_new_tokens=8,
        init_kl_coef=0.05,
        target=4.0,
        horizon=1000.0,
        compute_dtype=compute_dtype,
    )
    trainer = PPOTrainer(config, model, tokenizer)
    queries = encode(tokenizer, 64)
    rewards, kls = [], []
    for _ in range(30):
        responses = trainer.generate(queries)
        scores = [in_target_set(r).float().mean().item() for r in responses]
        stats = trainer.step(queries, responses, scores)
        rewards.append(stats["env/reward_mean"])
        kls.append(stats["objective/kl"])
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert end > start + 0.1, rewards
    assert max(kls[-5:]) < 3 * config.target, kls


@pytest.mark.cuda
def test_step_on_cuda(tokenizer):
    trainer, queries, responses = make_trainer("llama", tokenizer, device="cuda")
    assert trainer.policy.device.type == "cuda"
    seen = capture(trainer)
    stats = trainer.step(queries, responses, torch.randn(8))
    assert seen.minibatches[0]["policy/ratio"].item() == 1.0
    assert stats["objective/kl"] == 0.0 and stats["ppo/updates"] == 4


@pytest.mark.cuda
@pytest.mark.parametrize("int8", [False, True])
def test_auto_dtype_on_cuda_stores_computes_and_trains(tokenizer, tiny_model_dir, int8):
    """On a GPU, ``auto`` means bfloat16 where the GPU supports it (8-bit too: int8 weights, bf16 compute),
    for the stored float parts and for the trainer's compute; a PPO step there moves the adapters."""
    from minippo.quant import load_model

    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    model = load_model(tiny_model_dir, dtype="auto", device="cuda", load_in_8bit=int8)
    assert model.lm_head.weight.dtype == want and model.lm_head.weight.device.type == "cuda"
    if int8:
        prepare_model_for_kbit_training(model)
    model = add_lora(model, LoRAConfig(target_modules="all-linear"))
    trainer = PPOTrainer(small_config(compute_dtype="auto"), model, tokenizer)
    assert trainer.compute_dtype == want
    assert_a_step_trains(trainer, model, tokenizer)


def test_response_logprobs_give_the_kl_that_step_penalises(tokenizer):
    trainer, queries, responses = make_trainer("llama", tokenizer, learning_rate=5e-2)
    logp, mask = trainer.response_logprobs(queries, responses)
    ref, _ = trainer.response_logprobs(queries, responses, reference=True)
    assert torch.equal(logp, ref)  # LoRA B starts at zero: policy == reference
    assert torch.equal(mask.sum(1), torch.tensor([len(r) for r in responses], dtype=mask.dtype))
    trainer.step(queries, responses, torch.linspace(-1, 1, len(queries)))
    stats = trainer.step(queries, responses, torch.linspace(-1, 1, len(queries)))
    logp, mask = trainer.response_logprobs(queries, responses)
    ref_after, _ = trainer.response_logprobs(queries, responses, reference=True)
    assert torch.equal(ref_after, ref)  # the reference never moves
    kl = ((logp - ref) * mask).sum(1).mean()
    assert kl.abs() > 0
    assert stats["objective/kl"] != 0.0


def test_score_normalisation_learns_a_sparse_small_reward(tokenizer):
    """A sparse reward in [0, 1] of a small scale: 0.1 when a response holds a rare token (about one
    sample in twelve at the start), else 0. With a fixed KL coefficient of 0.2 (trl's default) the raw
    scores are drowned by the KL penalty and the hit rate does not rise; with running normalisation
    (use_score_scaling + use_score_norm) the same run raises it several-fold."""

    def run(normalise: bool) -> list[float]:
        torch.manual_seed(0)
        config = small_config(
            batch_size=64, mini_batch_size=32, learning_rate=3e-3, min_new_tokens=8, max_new_tokens=8,
            temperature=1.0, init_kl_coef=0.2, adap_kl_ctrl=False,
            use_score_scaling=normalise, use_score_norm=normalise,
        )  # fmt: skip
        trainer = PPOTrainer(config, lora_model("llama", tokenizer, head_scale=30.0), tokenizer)
        queries, hit_rates = encode(tokenizer, 64), []
        for _ in range(25):
            responses = trainer.generate(queries)
            hits = [float((r % 200 == 0).any()) for r in responses]
            trainer.step(queries, responses, [0.1 * h for h in hits])
            hit_rates.append(sum(hits) / len(hits))
        return hit_rates

    raw, normalised = run(False), run(True)
    start = sum(raw[:3]) / 3
    assert sum(normalised[-5:]) / 5 > start + 0.3, normalised
    assert sum(raw[-5:]) / 5 < start + 0.1, raw


def test_entropy_bonus_raises_the_policy_entropy(tokenizer):
    """With an uninformative reward (all scores 0, no KL penalty) only the bonus has a direction:
    entropy_coef > 0 raises the exact per-token entropy of the policy's samples; 0 leaves it drifting."""

    def entropies(coef: float) -> list[float]:
        torch.manual_seed(0)
        config = small_config(
            entropy_coef=coef, init_kl_coef=0.0, adap_kl_ctrl=False, temperature=1.0
        )
        trainer = PPOTrainer(config, lora_model("llama", tokenizer, head_scale=30.0), tokenizer)
        queries, seen = encode(tokenizer, 8), []
        for _ in range(6):
            stats = trainer.step(queries, trainer.generate(queries), [0.0] * 8)
            seen.append(stats["ppo/policy/entropy"])
        assert stats["ppo/loss/entropy"] > 0
        return seen

    off, on = entropies(0.0), entropies(0.5)
    assert on[0] == pytest.approx(off[0])  # same first rollout
    assert on[-1] > 1.5 * on[0], on
    assert on[-1] > 1.5 * off[-1], (on, off)


@pytest.mark.parametrize(
    "name",
    [
        "adapter_model.safetensors",
        "value_head.safetensors",
        "optimizer.pt",
        "rng_state.pt",
        "trainer_state.json",
    ],
)
@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_load_refuses_a_damaged_checkpoint_with_a_message(tmp_path, tokenizer, name, fault):
    trainer = PPOTrainer(small_config(), lora_model("llama", tokenizer), tokenizer)
    trainer.save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / name
    if fault == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="is incomplete, corrupt or not from this model"):
        PPOTrainer(small_config(), lora_model("llama", tokenizer), tokenizer).load(
            tmp_path / "ckpt"
        )


def test_load_refuses_weights_of_the_wrong_shape(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    trainer = PPOTrainer(small_config(), lora_model("llama", tokenizer), tokenizer)
    trainer.save(tmp_path / "ckpt")
    path = str(tmp_path / "ckpt" / "value_head.safetensors")
    save_file({k: torch.zeros(3, *v.shape[1:]) for k, v in load_file(path).items()}, path)
    with pytest.raises(ValueError, match="(?s)corrupt or not from this model.*size mismatch"):
        PPOTrainer(small_config(), lora_model("llama", tokenizer), tokenizer).load(
            tmp_path / "ckpt"
        )


def test_a_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    import errno

    trainer, queries, responses = make_trainer("llama", tokenizer)
    trainer.save(tmp_path / "ckpt")
    saved = (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes()
    trainer.step(queries, responses, torch.randn(8))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes() == saved
    assert os.listdir(tmp_path) == ["ckpt"]
