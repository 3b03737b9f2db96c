"""minippo.fast.enable: one switch, its choices visible in repr(model), the model's function kept."""

import pytest
import torch
from tiny import logits as batch_logits
from tiny import tiny_model

from minippo import fast
from minippo.fast.head import FastLMHead
from minippo.fast.int8 import FastLinear8bitLt, int8_matmul_is_native
from minippo.fast.storage import StoredEmbedding
from minippo.lora import LoRAConfig, add_lora, disable_adapters
from minippo.policy import PolicyWithValueHead
from minippo.quant import prepare_model_for_kbit_training, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")
needs_int8 = pytest.mark.skipif(
    not int8_matmul_is_native("cpu"), reason="the fast int8 layers need VNNI or AMX"
)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@needs_int8
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_enable_swaps_modules_visibly_and_keeps_the_logits_bit_for_bit(arch, tokenizer):
    model = quantize_model(tiny_model(arch, len(tokenizer))).eval()
    ids = torch.randint(3, 300, (2, 9))
    want = logits(model, ids)  # bitsandbytes' own layers, eval mode
    assert fast.enable(model) is model and model.minippo_fast is True
    text = repr(model)
    assert "FastLinear8bitLt" in text and "FastLMHead" in text and "input_grad=int8" in text
    assert "Linear8bitLt(" not in text.replace("FastLinear8bitLt(", "")
    assert isinstance(model.get_output_embeddings(), FastLMHead)
    assert len(model.minippo_int8_reuse.handles) == 2  # the scope's hook handles, kept
    assert torch.equal(logits(model, ids), want)
    assert fast.enable(model) is model  # a second call changes nothing
    add_lora(model, LoRAConfig(target_modules="all-linear"))
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), want)
    assert all(
        isinstance(m.base_layer, FastLinear8bitLt)
        for m in model.modules()
        if hasattr(m, "base_layer")
    )


def test_embeddings_stored_in_bf16_keep_float32_hidden_states(tokenizer):
    """Lookups are the bf16-rounded rows in float32, bit for bit; the tied LM head is the same bf16
    Parameter; the logits within bf16 rounding (2% of their largest magnitude); prepare keeps bf16."""
    model = tiny_model("gpt2", len(tokenizer))  # tied input and output embeddings
    ids = torch.randint(3, 300, (2, 9))
    want = logits(model, ids)
    rounded = model.get_input_embeddings().weight.detach().to(torch.bfloat16).float()
    fast.enable(model, embeddings_dtype=torch.bfloat16)
    emb = model.get_input_embeddings()
    assert isinstance(emb, StoredEmbedding) and emb.weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight is emb.weight
    assert "weight_dtype=torch.bfloat16" in repr(model)
    assert torch.equal(emb(ids), rounded[ids])
    got = logits(model, ids)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    prepare_model_for_kbit_training(model)
    assert emb.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].ln_1.weight.dtype == torch.float32


def test_the_policy_uses_the_fast_head_by_duck_typing(tokenizer):
    """PolicyWithValueHead finds the fused log-probs, the row-blocked functions and the sampler on the
    LM head: the log-probs and LoRA gradients as the plain head's (within 1e-5), generation runs."""
    torch.manual_seed(0)
    plain = add_lora(
        tiny_model("llama", len(tokenizer)), LoRAConfig(r=2, target_modules="all-linear")
    )
    torch.manual_seed(0)
    model = fast.enable(tiny_model("llama", len(tokenizer)))
    add_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    policies = [PolicyWithValueHead(m) for m in (plain, model)]
    assert [p.fused_head for p in policies] == [False, True]
    ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(ids)
    out = []
    for policy in policies:
        logp, ent, _ = policy.response_logprobs(ids, mask, ids[:, -4:], 0.7)
        params = [p for n, p in policy.named_parameters() if "lora_A" in n]
        out.append((logp, ent, *torch.autograd.grad(logp.sum(), params)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    gen = policies[1].generate([ids[0, :3]], pad_token_id=0, min_new_tokens=3, max_new_tokens=3)
    assert gen.response_ids.shape == (1, 3)


def int8_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]


@pytest.fixture
def batch(tokenizer):
    return tokenizer(
        ["This movie was great", "Boring and too long"], return_tensors="pt", padding=True
    )


@pytest.mark.parametrize(
    "arch", ["llama", "gpt2", "gpt_neox"]
)  # gpt2 ties its LM head, the others not
def test_embeddings_stored_in_bf16_keep_the_hidden_states_float32(tokenizer, batch, arch):
    """fast.enable(embeddings_dtype=bf16): bf16 embedding and LM head weights (one matrix where tied),
    float32 hidden states, logits within 2% of the float32 model's largest; idempotent; prepare keeps the
    bf16 storage; LoRA gradients as with float32 embeddings (cosine > 0.999); the logits are the policy's
    own (check_logits)."""
    models, grads = {}, {}
    for stored in (False, True):
        model = quantize_model(tiny_model(arch, len(tokenizer)))
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if stored:
            for _ in range(2):
                fast.enable(model, int8=False, embeddings_dtype=torch.bfloat16)
        prepare_model_for_kbit_training(model)
        add_lora(model, LoRAConfig(r=4, init="gaussian", target_modules="all-linear"))
        models[stored] = model
        out = model(**batch, labels=batch["input_ids"], output_hidden_states=True)
        out.loss.backward()
        grads[stored] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        assert out.logits.dtype == torch.float32 and out.hidden_states[0].dtype == torch.float32
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tied == (arch == "gpt2")
    for module in (models[True].get_input_embeddings(), models[True].get_output_embeddings()):
        assert module.weight.dtype == torch.bfloat16
    assert models[False].get_input_embeddings().weight.dtype == torch.float32
    fp32, bf16 = batch_logits(models[False], batch), batch_logits(models[True], batch)
    assert 0 < (bf16 - fp32).abs().max() < 2e-2 * fp32.abs().max()  # rounded weights, nothing else
    assert torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0) > 0.999
    PolicyWithValueHead(models[True]).check_logits(
        rtol=1e-6
    )  # minippo's logits are the model's own
