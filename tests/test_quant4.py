"""4-bit (QLoRA) bases: NF4/FP4 storage and footprint, LoRA invariants over `Linear4bit`, frozen
packed weights under training, merging, adapter files (peft both ways, an 8-bit adapter on the
4-bit base), loading both ways, clear errors, and a PPO run that learns.  Tiny models, CPU."""

import contextlib
import math

import bitsandbytes as bnb
import pytest
import torch
from tiny import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.pytorch_utils import Conv1D

from minippo import (
    LoRAConfig,
    PPOConfig,
    PPOTrainer,
    add_lora,
    disable_adapters,
    load_adapter,
    load_model,
    merge_lora,
    prepare_model_for_kbit_training,
    quantize_model,
    save_adapter,
)
from minippo.app.memory_plan import model_footprint_bytes
from minippo.lora import LoRALayer, lora_state_dict
from minippo.quant import auto_compute_dtype, dequantize_4bit, is_4bit, is_8bit

TEXTS = ["This movie was great, I loved the acting.", "Awful dialogue, a waste of time."]


@pytest.fixture
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def layers_4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def qlora_model(arch, tokenizer, seed=0, **lora):
    """A tiny model in NF4 with double quantisation, prepared for training, with LoRA adapters."""
    model = quantize_model(tiny_model(arch, len(tokenizer), seed=seed), bits=4)
    prepare_model_for_kbit_training(model)
    return add_lora(model, LoRAConfig(**{"r": 4, "target_modules": "all-linear", **lora}))


def train(model, batch, steps=2, lr=1e-2):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def randomise_adapters(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# -- storage -----------------------------------------------------------------------------------


def test_quantize_model_4bit_stores_packed_nf4_and_skips_lm_head(model, arch):
    n_linear = sum(type(m) is nn.Linear or isinstance(m, Conv1D) for m in model.modules())
    quantize_model(model, bits=4)
    layers = layers_4bit(model)
    assert len(layers) == n_linear - 1  # all but lm_head
    assert is_4bit(model) and not is_8bit(model) and not is_4bit(model.get_output_embeddings())
    for m in layers.values():
        state = m.weight.quant_state
        assert (
            m.weight.dtype == torch.uint8
            and m.weight.numel() == m.in_features * m.out_features // 2
        )
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
        assert m.compute_dtype == auto_compute_dtype(
            "cpu"
        )  # "auto": bf16 where the CPU runs it natively
        assert not m.support_avx512bf16_for_cpu  # kept on the portable path (see test below)
    if arch == "gpt2":  # Conv1D (in, out) became Linear4bit (out, in) and remembers its origin
        c_attn = model.transformer.h[0].attn.c_attn
        assert c_attn.quant_state.shape == (96, 32) and c_attn.source_cls is Conv1D


def test_4bit_logits_close_to_fp32(model, batch, arch):
    """NF4 rounds each weight to one of 16 levels per block of 64: on logits of std ~0.11, measured mean
    |logit diff| 0.009 .. 0.020 and max 0.025 .. 0.18 (the max varies with the CPU kind's kernels; 8-bit:
    ~2e-3); tolerances 0.04 (mean) and 0.3 (max)."""
    ref = logits(model, batch)
    quantize_model(model, bits=4)
    diff = (logits(model, batch) - ref).abs()
    assert 0 < diff.mean() < 0.04 and diff.max() < 0.3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_is_bitsandbytes_own_within_a_code_step(quant_type):
    """Each weight is within half the widest gap of the 16-value code book (NF4: 1 - 0.7230;
    FP4: 1/3) times its block's absmax, plus the 8-bit rounding of that absmax (double quant)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    W = linear.weight.detach().clone()  # (out, in)
    layer = quantize_model(nn.Sequential(linear), bits=4, quant_type=quant_type)[0]
    deq = dequantize_4bit(layer)
    state = layer.weight.quant_state
    assert torch.equal(deq, bnb.functional.dequantize_4bit(layer.weight.data, state))
    code = state.code.sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = W.reshape(-1, 64).abs().amax(dim=1, keepdim=True)  # (blocks, 1)
    err = (deq - W).reshape(-1, 64).abs()
    assert err.max() > 0 and (err <= (half_gap + 0.02) * absmax).all()
    x = torch.randn(5, 128)  # the layer computes with exactly this weight
    torch.testing.assert_close(layer(x), x @ deq.t() + linear.bias, rtol=1e-5, atol=1e-6)


def packed_bytes_expected(layers, double_quant=True):
    """QLoRA's storage (arXiv:2305.14314, sec. 3): 4 bits a weight, one scale per block of 64
    (8-bit with double quantisation, then one fp32 scale per 256 scales, an fp32 offset and the
    256-value fp32 code book of those 8-bit scales; fp32 without), and the 16-value fp32 code book
    of each layer (bitsandbytes keeps both code books per layer)."""
    total = 0
    for m in layers:
        n = m.in_features * m.out_features
        blocks = math.ceil(n / 64)
        scales = blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 if double_quant else 4 * blocks
        total += n // 2 + scales + 16 * 4
    return total


@pytest.mark.parametrize("double_quant", [True, False])
def test_footprint_is_about_half_a_byte_per_quantised_weight(double_quant):
    """A model whose Linear layers dominate (H=256, 2 layers): the 4-bit layers take 0.516 bytes a
    weight with double quantisation (0.5 + 1/64 + 4/16384) and 0.5625 without, plus ~1 KiB of code
    books per layer (measured 0.526 here, where a layer has only 65-176k weights)."""
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=384,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    fp32 = model_footprint_bytes(model)
    quantize_model(model, bits=4, double_quant=double_quant)
    layers = list(layers_4bit(model).values())
    weights = sum(m.in_features * m.out_features for m in layers)
    rest = fp32 - 4 * weights  # embeddings, norms, lm_head: still fp32
    measured = model_footprint_bytes(model) - rest
    assert measured == packed_bytes_expected(layers, double_quant)
    assert 0.5 < measured / weights < 0.6
    code_books = len(layers) * (16 * 4 + (4 + 256 * 4 if double_quant else 0))
    per_weight = (measured - code_books) / weights
    assert per_weight == pytest.approx(
        0.5 + 1 / 64 + 4 / 16384 if double_quant else 0.5625, abs=1e-3
    )


# -- LoRA over 4-bit ---------------------------------------------------------------------------


def test_lora_at_init_equals_the_4bit_base_exactly(tokenizer, batch, arch):
    base = quantize_model(tiny_model(arch, len(tokenizer)), bits=4)
    expected = logits(base, batch)
    adapted = qlora_model(arch, tokenizer)
    assert all(
        isinstance(m.base_layer, bnb.nn.Linear4bit)
        for m in adapted.modules()
        if isinstance(m, LoRALayer)
    )
    assert torch.equal(logits(adapted, batch), expected)


def test_disable_adapters_is_the_4bit_base_exactly_after_training(tokenizer, batch, arch):
    model = qlora_model(arch, tokenizer)
    base = logits(model, batch)
    train(model, batch)
    assert not torch.allclose(logits(model, batch), base, atol=1e-3)
    with disable_adapters(model):
        assert torch.equal(logits(model, batch), base)


def test_only_adapters_and_value_head_train_and_packed_weights_stay_bit_exact(
    tokenizer, batch, arch
):
    trainer = PPOTrainer(
        PPOConfig(batch_size=2, mini_batch_size=2), qlora_model(arch, tokenizer), tokenizer
    )
    named = dict(trainer.policy.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert any(n.startswith("value_head.") for n in trainable)
    model = trainer.policy.model
    frozen = {
        n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone(), dequantize_4bit(m))
        for n, m in layers_4bit(model).items()
    }
    train(model, batch)  # Adam steps on the adapters, through every 4-bit layer's backward
    for name, m in layers_4bit(model).items():
        assert not m.weight.requires_grad and m.weight.grad is None
        assert torch.equal(m.weight.data, frozen[name][0])
        assert torch.equal(m.weight.quant_state.absmax, frozen[name][1])
        assert torch.equal(dequantize_4bit(m), frozen[name][2])


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_grads_in_4bit(tokenizer, batch, use_reentrant):
    def grads(checkpointing):
        model = quantize_model(tiny_model("llama", len(tokenizer)), bits=4)
        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, use_reentrant=use_reentrant
        )
        add_lora(model, LoRAConfig(r=4, init="gaussian"))
        with torch.no_grad():  # non-zero B so A gets gradients too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    assert all(
        g.abs().sum() > 0 for g in checkpointed.values()
    )  # the lowest adapter gets gradients too
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_dequantize_refuses_a_repacked_cpu_weight():
    """bitsandbytes' AVX512-BF16 inference repacking (turned off by minippo) rounds the scales to
    bf16: a layer in that state is refused with the fix rather than dequantised wrongly."""
    layer = quantize_model(nn.Sequential(nn.Linear(64, 64)), bits=4)[0]
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked.*keep_4bit_layers_unpacked"):
        dequantize_4bit(layer)


# -- merging -----------------------------------------------------------------------------------


def test_merge_4bit_matches_the_adapted_model_and_reloads(tokenizer, batch, tmp_path, arch):
    """The 4-bit layers dequantise the same weight at every matmul that the merge writes, so the
    merged model equals the adapted 4-bit one up to fp32 rounding (measured <= 1.5e-7); its
    distance to the *float* model is NF4's quantisation error (test_4bit_logits_close_to_fp32)."""
    model = randomise_adapters(qlora_model(arch, tokenizer, target_modules=None))
    adapted = logits(model, batch)
    merged = merge_lora(model)
    assert not is_4bit(merged) and not any(isinstance(m, LoRALayer) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    if arch == "gpt2":
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(plain, batch), logits(merged, batch))


def test_merge_of_a_transformers_4bit_model_saves_a_plain_model(tiny_model_dir, batch, tmp_path):
    import json

    model = load_model(tiny_model_dir, load_in_4bit=True)
    assert model.config.quantization_config is not None and getattr(
        model, "is_loaded_in_4bit", False
    )
    randomise_adapters(add_lora(model, LoRAConfig(r=4)))
    adapted = logits(model, batch)
    merged = merge_lora(model)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.load(open(tmp_path / "merged" / "config.json"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(plain, batch), logits(merged, batch))


# -- adapter files -----------------------------------------------------------------------------


def test_peft_loads_our_4bit_adapter_with_the_same_logits(tokenizer, batch, tmp_path, arch):
    from peft import PeftModel

    ours = train(qlora_model(arch, tokenizer, target_modules=None), batch)
    save_adapter(ours, tmp_path / "ours")
    base = quantize_model(tiny_model(arch, len(tokenizer)), bits=4)  # same weights, same NF4 codes
    theirs = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    assert torch.equal(logits(theirs, batch), logits(ours, batch))
    # and back: our loader on a fresh 4-bit base gives the same model again
    again = load_adapter(
        quantize_model(tiny_model(arch, len(tokenizer)), bits=4), tmp_path / "ours"
    )
    assert torch.equal(logits(again, batch), logits(ours, batch))


def test_an_8bit_adapter_loads_on_the_4bit_base(tokenizer, batch, tmp_path, arch):
    """What a user should expect: the file loads unchanged (same module names and shapes), so the
    update B @ A is the same; the adapted 4-bit model differs from the adapted 8-bit one by about
    as much as the two bases differ (NF4's rounding; measured 0.65-1.0x that gap, ~5% of the
    adapter's own effect on the logits), and the adapter's gain in loss carries over (measured
    within 2%).  Re-tune briefly on the 4-bit base where that difference matters."""
    model8 = quantize_model(tiny_model(arch, len(tokenizer)))
    prepare_model_for_kbit_training(model8)
    add_lora(model8, LoRAConfig(r=4, alpha=32))
    train(model8, batch, steps=3, lr=3e-2)
    save_adapter(model8, tmp_path / "a8")
    with disable_adapters(model8):
        base8 = logits(model8, batch)
    adapted8 = logits(model8, batch)

    model4 = load_adapter(quantize_model(tiny_model(arch, len(tokenizer)), bits=4), tmp_path / "a8")
    for key, value in lora_state_dict(model8).items():
        assert torch.equal(lora_state_dict(model4)[key], value)
    with disable_adapters(model4):
        base4 = logits(model4, batch)
    adapted4 = logits(model4, batch)
    gap, base_gap = (adapted4 - adapted8).abs().max(), (base4 - base8).abs().max()
    assert 0 < gap < 2 * base_gap
    assert gap < 0.2 * (adapted8 - base8).abs().max()

    def loss(model, adapters=True):
        with torch.no_grad(), disable_adapters(model) if not adapters else contextlib.nullcontext():
            return model(**batch, labels=batch["input_ids"]).loss.item()

    gain8 = loss(model8, adapters=False) - loss(model8)
    gain4 = loss(model4, adapters=False) - loss(model4)
    assert gain8 > 0.05 and gain4 == pytest.approx(gain8, rel=0.1)


# -- loading and errors ------------------------------------------------------------------------


def test_load_model_4bit_transformers_path_and_fallback_agree(tiny_model_dir, batch, monkeypatch):
    via_transformers = load_model(tiny_model_dir, load_in_4bit=True)
    assert getattr(via_transformers, "is_loaded_in_4bit", False) and is_4bit(via_transformers)
    assert all(not m.support_avx512bf16_for_cpu for m in layers_4bit(via_transformers).values())

    def broken(*args, **kwargs):
        raise RuntimeError("no bitsandbytes backend here")

    import transformers

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", broken)
    ours = load_model(tiny_model_dir, load_in_4bit=True)
    assert not getattr(ours, "is_loaded_in_4bit", False) and is_4bit(ours)
    assert layers_4bit(ours).keys() == layers_4bit(via_transformers).keys()
    for name, m in layers_4bit(ours).items():
        assert torch.equal(dequantize_4bit(m), dequantize_4bit(layers_4bit(via_transformers)[name]))
    assert torch.equal(logits(ours, batch), logits(via_transformers, batch))


def test_load_model_4bit_options(tiny_model_dir):
    fp4 = load_model(
        tiny_model_dir,
        load_in_4bit=True,
        quant_type="fp4",
        double_quant=False,
        compute_dtype="bf16",
    )
    layer = next(iter(layers_4bit(fp4).values()))
    assert layer.weight.quant_state.quant_type == "fp4" and not layer.weight.quant_state.nested
    assert layer.compute_dtype == torch.bfloat16


def test_4bit_request_without_4bit_support_is_a_clear_error(tiny_model_dir, monkeypatch):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for 'bitsandbytes::quantize_4bit' on this backend")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    with pytest.raises(ValueError, match="cannot run 4-bit .* on device 'cpu'.*--quant 8bit"):
        load_model(tiny_model_dir, load_in_4bit=True)
    with pytest.raises(ValueError, match="cannot run 4-bit"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), bits=4)
    quantize_model(nn.Sequential(nn.Linear(64, 64)))  # 8-bit is unaffected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3), "bits must be 8"),
        (dict(bits=4, quant_type="int4"), "quant_type must be one of"),
    ],
)
def test_bad_quantisation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), **kwargs)


def test_load_in_8bit_and_4bit_are_exclusive(tiny_model_dir):
    with pytest.raises(ValueError, match="exclusive"):
        load_model(tiny_model_dir, load_in_8bit=True, load_in_4bit=True)


# -- end to end --------------------------------------------------------------------------------


def test_ppo_raises_a_simple_reward_in_4bit(tokenizer):
    """As tests/test_ppo.py's 8-bit run: reward = share of response tokens whose id is a multiple
    of 8; PPO on a 4-bit base must raise it clearly within 30 steps with the KL kept near target."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = tiny_model("llama", len(tokenizer))
        with torch.no_grad():  # a trained LM's logit range (see tests/test_ppo.py)
            model.get_output_embeddings().weight.mul_(30.0)
        quantize_model(model, bits=4)
        prepare_model_for_kbit_training(model)
        add_lora(model, LoRAConfig(target_modules="all-linear"))
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
        )
        trainer = PPOTrainer(config, model, tokenizer)
        prompts = [
            "This movie",
            "A wonderful, moving picture with a",
            "Boring and",
            "The best film of",
        ]
        queries = [torch.tensor(tokenizer(prompts[i % 4])["input_ids"]) for i in range(64)]
        rewards, kls = [], []
        for _ in range(30):
            responses = trainer.generate(queries)
            stats = trainer.step(
                queries, responses, [(r % 8 == 0).float().mean().item() for r in responses]
            )
            rewards.append(stats["env/reward_mean"])
            kls.append(stats["objective/kl"])
    finally:
        torch.set_num_threads(threads)
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert end > start + 0.1, rewards
    assert max(kls[-5:]) < 3 * config.target, kls
    assert is_4bit(model)


@pytest.mark.cuda
def test_4bit_lora_forward_backward_on_cuda(tokenizer, batch):
    model = quantize_model(tiny_model("llama", len(tokenizer)), bits=4, device="cuda")
    layer = next(iter(layers_4bit(model).values()))
    assert layer.weight.device.type == "cuda" and layer.compute_dtype in (
        torch.bfloat16,
        torch.float16,
    )
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    add_lora(model, LoRAConfig(r=4))
    model.to("cuda").train()
    batch = {k: v.cuda() for k, v in batch.items()}
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.device.type == "cuda" for g in grads.values())
    # lora_B starts at zero, so at the first step lora_A's gradient (which goes through B) is zero too
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    merged = merge_lora(model)
    assert not is_4bit(merged)
