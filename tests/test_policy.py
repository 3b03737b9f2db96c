"""The value head, PolicyWithValueHead's forward, batched generation and value-head files."""

import pytest
import torch
from tiny import tiny_model

from minippo.core import logprobs_from_logits
from minippo.lora import LoRAConfig, add_lora, disable_adapters, lora_layers
from minippo.policy import (
    VALUE_HEAD_FILE,
    PolicyWithValueHead,
    ValueHead,
    left_pad,
    load_value_head,
    position_ids_from_mask,
    right_pad,
    save_value_head,
)
from minippo.quant import quantize_model

# Tiny models run fastest on one thread, and far more steadily on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["This movie", "A wonderful, moving picture with a", "Boring", "The best film of"]


def encode(tokenizer, texts):
    return [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]


def sample(policy, tokenizer, **kwargs):
    settings = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        min_new_tokens=3,
        max_new_tokens=7,
        temperature=0.8,
    )
    settings.update(kwargs)
    return policy.generate(encode(tokenizer, PROMPTS), **settings)


def unpadded_logprobs(policy, query, response, temperature):
    """Log-probs of `response` after `query`, one sample, no padding at all."""
    ids = torch.cat([query, response])[None]  # (1, L)
    with torch.no_grad():
        logits, _ = policy(
            ids, torch.ones_like(ids), response_length=len(response), temperature=temperature
        )
    return logprobs_from_logits(logits, response[None])[0]


# -- padding helpers ----------------------------------------------------------------------------


def test_padding_and_positions():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    ids, mask = left_pad(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = right_pad(seqs, pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    full = torch.tensor([[0, 0, 1, 1, 1, 0]])
    assert position_ids_from_mask(full).tolist() == [[0, 0, 0, 1, 2, 2]]


# -- value head and forward ---------------------------------------------------------------------


def test_value_head_defaults():
    head = ValueHead(32)
    assert head.dropout.p == 0.0
    assert head.summary.weight.dtype == torch.float32
    hidden = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    values = head(hidden)
    assert values.shape == (2, 5) and values.dtype == torch.float32 and (values == 0).all()
    assert ValueHead(32, init_std=0.1).summary.weight.abs().sum() > 0


def test_forward_shapes_and_response_slice(model, tokenizer):
    policy = PolicyWithValueHead(model)
    torch.nn.init.normal_(policy.value_head.summary.weight, std=0.1)
    ids = torch.randint(3, len(tokenizer), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        logits, values = policy(ids, mask)
        logits_t, values_t = policy(ids, mask, response_length=4, temperature=2.0)
    assert logits.shape == (2, 9, len(tokenizer)) and values.shape == (2, 9)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32
    # position t of the response slice predicts response token t: logits at columns 4..7 of 0..8
    torch.testing.assert_close(logits_t, logits[:, 4:8] / 2.0)
    torch.testing.assert_close(values_t, values[:, 4:8])
    # the policy's logits are the model's own
    with torch.no_grad():
        hf = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    torch.testing.assert_close(logits[0], hf[0].float())
    torch.testing.assert_close(logits[1, 3:], hf[1, 3:].float())


def test_forward_under_bf16_autocast_keeps_float32_logits(model):
    policy = PolicyWithValueHead(model)
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, values = policy(ids, torch.ones_like(ids), response_length=3)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32


def test_response_logprobs_by_the_fused_head_are_the_logits_ones(model):
    """`response_logprobs` without logits (`minippo.fast`'s LM head) gives the log-probs, entropies,
    values and LoRA gradients of the logits path, at temperature 0.7; the entropy bonus's gradient
    (``entropy_grad``) takes the logits path."""
    from minippo import fast

    fast.enable(model)
    add_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    torch.manual_seed(0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    policy = PolicyWithValueHead(model, ValueHead(model.config.hidden_size, init_std=0.1))
    assert policy.fused_head
    ids = torch.randint(3, 100, (3, 9))
    mask, responses = torch.ones_like(ids), ids[:, -4:]
    params = [p for p in policy.parameters() if p.requires_grad]

    def run(fused, entropy_grad=False):
        policy.fused_head = fused
        logp, ent, values = policy.response_logprobs(
            ids, mask, responses, 0.7, entropy_grad=entropy_grad
        )
        grads = torch.autograd.grad(
            (logp * torch.arange(12.0).view(3, 4)).sum() + values.sum(), params
        )
        return logp, ent, values, grads

    (*fused, fused_grads), (*plain, plain_grads) = run(True), run(False)
    for a, b in zip(fused + list(fused_grads), plain + list(plain_grads)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not fused[1].requires_grad
    policy.fused_head = True
    assert policy.response_logprobs(ids, mask, responses, 0.7, entropy_grad=True)[1].requires_grad
    # a trained LM head takes the logits path: it gets a gradient
    head = policy.lm_head.weight.requires_grad_()
    policy.response_logprobs(ids, mask, responses)[0].sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_a_hook_on_the_lm_head_turns_the_fused_head_off(model):
    """check_logits probes the fused head against the logits: a forward hook that changes the logits (so
    the model's own forward too) leaves minippo on the logits path, which honours it."""
    from minippo import fast

    fast.enable(model)
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[7] = 3.0
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: out + bias)
    policy = PolicyWithValueHead(model)
    assert not policy.fused_head
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        logp = policy.response_logprobs(ids, torch.ones_like(ids), torch.full((2, 3), 7))[0]
        logits, _ = policy(ids, torch.ones_like(ids), response_length=3)
    torch.testing.assert_close(logp, logprobs_from_logits(logits, torch.full((2, 3), 7)))


def test_batched_left_padded_generation_matches_unpadded_forward(model, tokenizer):
    """KV cache + left padding + position_ids: every sampled token's log-prob equals the one from
    an unpadded forward of that sample alone, and so does the padded batch forward step() uses."""
    torch.manual_seed(0)
    add_lora(model, LoRAConfig(target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # a non-trivial adapter
    policy = PolicyWithValueHead(model)
    gen = sample(policy, tokenizer, temperature=0.7)
    assert gen.query_mask.sum(1).tolist() == [len(q) for q in encode(tokenizer, PROMPTS)]
    ids = torch.cat([gen.query_ids, gen.response_ids], 1)
    mask = torch.cat([gen.query_mask, gen.response_mask], 1)
    with torch.no_grad():
        logits, _ = policy(ids, mask, response_length=gen.response_ids.shape[1], temperature=0.7)
    batch_logprobs = logprobs_from_logits(logits, gen.response_ids) * gen.response_mask
    for i, (q, r) in enumerate(zip(gen.queries(), gen.responses())):
        alone = unpadded_logprobs(policy, q, r, temperature=0.7)
        torch.testing.assert_close(gen.logprobs[i, : len(r)], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(batch_logprobs[i, : len(r)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sampling_follows_the_softmax(model, tokenizer, device):
    """Each new token is drawn with probability softmax(logits / temperature): over 20,000 rows the first
    token's frequencies match the model's distribution (every token within 5 sigma, the mean log-probability
    within 4 standard errors of minus the entropy), and a token of probability 0 (logit -inf) is never
    drawn. On CUDA too (the uniforms come from the GPU's generator there)."""
    torch.manual_seed(0)
    policy, prompt, n = (
        PolicyWithValueHead(model).to(device),
        encode(tokenizer, PROMPTS[1:2])[0],
        20_000,
    )
    with torch.no_grad():
        ids = prompt[None].to(device)  # (1, L)
        logits, _ = policy(ids, torch.ones_like(ids), temperature=0.1)  # (1, L, V)
    probs = torch.softmax(logits[0, -1].double(), -1).cpu()  # (V,) of the first new token
    banned = probs.argmax().item()  # the likeliest token, never drawn once its logit is -inf
    bias = torch.zeros(probs.shape[0], device=device)
    bias[banned] = float("-inf")
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: out + bias)
    probs[banned] = 0.0
    probs /= probs.sum()
    gen = policy.generate(
        [prompt] * n, pad_token_id=0, min_new_tokens=1, max_new_tokens=1, temperature=0.1
    )
    counts = torch.bincount(gen.response_ids[:, 0], minlength=probs.shape[0]).double()
    assert counts[banned] == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sigma + 1).all()
    assert probs.max() > 5 / len(probs)  # far from uniform, so the test has power
    # and on average as likely as the distribution says: mean log p(drawn) = -entropy, within 4 std errors
    logp = probs.clamp_min(1e-300).log()
    drawn = logp[gen.response_ids[:, 0]]
    entropy = -(probs * logp).sum()
    spread = (probs * (logp + entropy) ** 2).sum().sqrt()  # std of log p(drawn)
    assert (drawn.mean() + entropy).abs() < 4 * spread / n**0.5


def test_batched_generation_8bit(arch, tokenizer):
    model = quantize_model(tiny_model(arch, vocab_size=len(tokenizer)))
    add_lora(model)
    policy = PolicyWithValueHead(model)
    torch.manual_seed(0)
    gen = sample(policy, tokenizer)
    for i, (q, r) in enumerate(zip(gen.queries(), gen.responses())):
        # int8 picks outlier columns per batch, so batched and single runs differ slightly
        torch.testing.assert_close(
            gen.logprobs[i, : len(r)], unpadded_logprobs(policy, q, r, 0.8), atol=0.05, rtol=0
        )


def test_generation_lengths(model, tokenizer):
    policy = PolicyWithValueHead(model)
    torch.manual_seed(0)
    gen = policy.generate(
        encode(tokenizer, PROMPTS * 8),
        pad_token_id=tokenizer.pad_token_id,
        min_new_tokens=2,
        max_new_tokens=5,
    )
    lengths = gen.response_mask.sum(1)
    assert lengths.min() >= 2 and lengths.max() <= 5 and len(set(lengths.tolist())) > 1
    assert (gen.response_ids[gen.response_mask == 0] == tokenizer.pad_token_id).all()
    assert (gen.logprobs[gen.response_mask == 0] == 0).all() and (
        gen.logprobs[gen.response_mask == 1] < 0
    ).all()
    fixed = sample(policy, tokenizer, min_new_tokens=6, max_new_tokens=6)
    assert (fixed.response_mask.sum(1) == 6).all()
    # chunked generation gives the same layout
    chunked = sample(policy, tokenizer, min_new_tokens=4, max_new_tokens=4, batch_size=3)
    assert chunked.response_ids.shape == (4, 4) and [len(q) for q in chunked.queries()] == [
        len(q) for q in encode(tokenizer, PROMPTS)
    ]


class EosAfter(PolicyWithValueHead):
    """Makes EOS overwhelmingly likely from the `after`-th sampled token on, for the sample(s) `rows`."""

    def __init__(self, model, eos, after, rows):
        super().__init__(model)
        self.eos, self.after, self.rows, self.calls = eos, after, rows, 0

    def logits_from_hidden(self, hidden, temperature=1.0):
        logits = super().logits_from_hidden(hidden, temperature)
        if hidden.shape[1] == 1:  # a sampling step
            self.calls += 1
            if self.calls > self.after:
                logits = logits.clone()
                logits[self.rows, :, self.eos] = 1e4
        return logits


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_stop_at_eos(model, tokenizer, pad_is_eos):
    eos = tokenizer.eos_token_id
    pad = eos if pad_is_eos else tokenizer.pad_token_id
    assert tokenizer.pad_token_id != eos  # the fixture's tokenizer keeps them distinct
    policy = EosAfter(model, eos, after=2, rows=[0, 2])
    gen = sample(
        policy, tokenizer, min_new_tokens=6, max_new_tokens=6, stop_at_eos=True, pad_token_id=pad
    )
    responses = gen.responses()
    # rows 0 and 2 stop with EOS as their third token (the EOS is part of the response)
    assert [len(r) for r in responses] == [3, 6, 3, 6]
    assert responses[0][-1] == eos and responses[2][-1] == eos
    assert gen.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert (gen.response_ids[0, 3:] == pad).all()
    # without stop_at_eos the EOS is just a token and every response has its drawn length
    policy.calls = 0
    gen = sample(policy, tokenizer, min_new_tokens=6, max_new_tokens=6, stop_at_eos=False)
    assert (gen.response_mask.sum(1) == 6).all()


def test_generate_rejects_bad_input(model, tokenizer):
    policy = PolicyWithValueHead(model)
    for queries in (
        [],
        [torch.tensor([], dtype=torch.long)],
        [torch.ones(2, 3, dtype=torch.long)],
        [[5, 999]],
    ):
        with pytest.raises(ValueError, match="non-empty 1-D .* ids < 384"):
            policy.generate(queries, pad_token_id=0)

    def sampled(query):
        torch.manual_seed(0)
        return policy.generate(
            [query], pad_token_id=0, min_new_tokens=2, max_new_tokens=2
        ).response_ids

    assert torch.equal(
        sampled([5, 6, 7]), sampled(torch.tensor([5, 6, 7]))
    )  # a list of ids is taken too
    with pytest.raises(ValueError, match="min_new_tokens"):
        policy.generate([torch.tensor([5])], pad_token_id=0, min_new_tokens=5, max_new_tokens=2)
    with pytest.raises(ValueError, match="eos_token_id"):
        policy.generate([torch.tensor([5])], pad_token_id=0, stop_at_eos=True)


# -- files --------------------------------------------------------------------------------------


def test_value_head_round_trip(tmp_path):
    head = ValueHead(32, init_std=0.3)
    save_value_head(head, tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).exists()
    other = ValueHead(32)
    load_value_head(other, tmp_path)
    torch.testing.assert_close(other.state_dict(), head.state_dict())
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        load_value_head(other, tmp_path / "missing")


def test_policy_save_and_load_pretrained(tmp_path, arch, tokenizer):
    model = add_lora(tiny_model(arch, vocab_size=len(tokenizer)))
    policy = PolicyWithValueHead(model)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad or p is policy.value_head.summary.weight:
                p.normal_()
    policy.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        VALUE_HEAD_FILE,
    }
    fresh = PolicyWithValueHead(add_lora(tiny_model(arch, vocab_size=len(tokenizer))))
    fresh.load_pretrained(tmp_path)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        a, va = policy(ids, torch.ones_like(ids))
        b, vb = fresh(ids, torch.ones_like(ids))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(va, vb)
    with torch.no_grad(), disable_adapters(fresh.model):
        base, _ = fresh(ids, torch.ones_like(ids))
    assert not torch.allclose(base, b)


# -- logits: the model's own ------------------------------------------------------------------


def post_processing_model(kind):
    """A tiny Gemma2 / Granite / Cohere (heads that change the logits after lm_head), with large head
    weights so that the post-processing matters (Gemma2's softcap at 30 bites)."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    common = dict(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config = {
        "gemma2": lambda: Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **common),
        "granite": lambda: GraniteConfig(logits_scaling=8.0, **common),
        "cohere": lambda: CohereConfig(logit_scale=0.0625, **common),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_policy_logits_are_the_model_logits(kind, tokenizer):
    model = add_lora(
        post_processing_model(kind), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    policy = PolicyWithValueHead(model)  # the wrap-time probe passes
    ids = torch.randint(3, 384, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        theirs = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
        ours, _ = policy(ids, mask)
    scale = theirs.abs().max()
    assert scale > 1.0  # the post-processing is not negligible here
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5 * scale.item())
    if kind == "gemma2":
        assert ours.abs().max() <= 30.0  # softcapped, as transformers' logits


def test_wrap_refuses_a_model_whose_logits_it_cannot_reproduce(tokenizer):
    """A head that post-processes its logits in a way minippo does not know (a forward hook halving
    them, standing in for an unknown architecture's scaling): wrapping refuses, naming the problem."""

    def halve(module, args, output):
        output.logits = output.logits / 2
        return output

    model = add_lora(tiny_model("llama", vocab_size=len(tokenizer)), LoRAConfig(r=4))
    model.register_forward_hook(halve)
    with pytest.raises(ValueError, match="logits differ"):
        PolicyWithValueHead(model)


# -- gradient checkpointing -------------------------------------------------------------------


def count_checkpoints(monkeypatch):
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("int8", [False, True])
def test_gradient_checkpointing_in_eval_mode_gives_the_same_gradients(
    arch, tokenizer, monkeypatch, int8
):
    calls = count_checkpoints(monkeypatch)
    grads = []
    for on in (False, True):
        model = tiny_model(arch, vocab_size=len(tokenizer))
        if int8:
            quantize_model(model)
        policy = PolicyWithValueHead(
            add_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
        ).eval()
        policy.gradient_checkpointing = on
        ids = torch.randint(3, len(tokenizer), (3, 12))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        torch.manual_seed(0)
        for p in policy.parameters():  # non-zero B, so every adapter gets a gradient
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        logits, values = policy(ids, mask, response_length=5)
        (logprobs_from_logits(logits, ids[:, -5:]).sum() + values.pow(2).sum()).backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
        if on:
            n_layers = len(policy.decoder_layers())
            assert calls["n"] == n_layers  # every decoder layer, though in eval mode
            with torch.no_grad():
                policy(ids, mask)  # no gradients: nothing to checkpoint
            assert calls["n"] == n_layers
        else:
            assert calls["n"] == 0
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)
