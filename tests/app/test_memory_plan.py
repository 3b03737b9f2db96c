"""The memory planner: the blog's arithmetic, and predictions checked against measurements.

Measurements are of models small enough for this machine: the weights' footprint (bytes of
parameters and buffers, plus int8 row scales) and the peak tensor memory of one LoRA forward +
backward, taken with `TensorMemoryTracker` (an allocation tracker that works on CPU and GPU).
Each prediction must be within 15% of its measurement.
"""

import json
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from minippo.app.memory_plan import (
    GiB,
    PlanConfig,
    TensorMemoryTracker,
    format_plan,
    model_shape,
    plan_memory,
    tensor_footprint_bytes,
)
from minippo.lora import LoRAConfig, add_lora

TOL = 0.15
TARGETS = {  # the planner's target sets, as module names of each architecture
    "gpt_neox": {"qkv": ["query_key_value"], "attention": ["query_key_value", "attention.dense"]},
    "llama": {"qkv": ["q_proj", "k_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}


def build(arch, hidden=128, layers=2, vocab=1000, inner=None, seed=0):
    """A random model from a config (not tiny: the sizes the planner's constants matter at)."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=inner or 4 * hidden,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    if arch == "gpt_neox":
        return AutoModelForCausalLM.from_config(GPTNeoXConfig(**common))
    return AutoModelForCausalLM.from_config(
        LlamaConfig(num_key_value_heads=hidden // 64, tie_word_embeddings=True, **common)
    )


def plan_for(model, **kw):
    """The planner's plan for `model`, its shapes read from the model's config.json."""
    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)
        return plan_memory(PlanConfig(model=folder, reserve_gib=0, **kw))


def close(predicted, measured, tol=TOL):
    return abs(predicted - measured) <= tol * measured


# ------------------------------------------------------------------------ the blog's arithmetic


def test_20b_in_bf16_does_not_fit_24gb_but_int8_with_adapters_does():
    bf16 = plan_memory(PlanConfig(params=20e9, gpu_gib=24, dtype="bf16"))
    assert bf16.parts["weights"] == pytest.approx(40e9, rel=0.05)  # ~40 GB, 2 bytes a parameter
    assert not bf16.fits
    int8 = plan_memory(PlanConfig(params=20e9, gpu_gib=24, dtype="int8"))
    assert int8.parts["weights"] == pytest.approx(20e9, rel=0.05)  # ~1 byte a parameter
    assert int8.fits and int8.total < 24 * GiB
    # Adapters: a few tens of millions of trainable parameters, so gradients + Adam are < 1 GiB.
    assert int8.parts["gradients"] + int8.parts["optimiser state"] < GiB
    # Full fine-tuning in bf16 with Adam is the classic 16 bytes a parameter.
    full = plan_memory(PlanConfig(params=20e9, dtype="bf16", lora_r=0))
    assert full.parts["weights"] + full.parts["gradients"] + full.parts["optimiser state"] == pytest.approx(
        16 * 20e9, rel=0.01
    )
    text = format_plan(int8)
    assert "fits in 24 GiB: yes" in text and "| bf16 weights + LoRA |" in text
    assert f"data parallel on N GPUs (torchrun): {int8.total / GiB:.2f} GiB per GPU" in text


def test_known_and_folder_shapes(tmp_path):
    neox = plan_memory(PlanConfig(model="gpt-neox-20b"))
    assert neox.params == pytest.approx(20.55e9, rel=0.01)  # GPT-NeoX-20B has 20.55B parameters
    model = build("llama", hidden=64, layers=2, vocab=500)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    shape = model_shape(PlanConfig(model=str(tmp_path)))
    assert (shape.arch, shape.hidden, shape.layers, shape.vocab, shape.tied) == ("llama", 64, 2, 500, True)
    counted = plan_memory(PlanConfig(model=str(tmp_path))).params
    assert counted == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(params=1e9, dtype="int4"), "dtype"),
        (dict(params=1e9, lora_r=0), "cannot be trained"),
        (dict(), "how big"),
        (dict(params=1e9, lora_targets="mlp"), "lora_targets"),
    ],
)
def test_config_errors_name_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        PlanConfig(**bad)


# ----------------------------------------------------------------- predictions vs measurements


@pytest.mark.parametrize("hidden, vocab", [(128, 1000), (256, 2000), (384, 4000)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weight_bytes_match_the_footprint(hidden, vocab, dtype):
    model = build("gpt_neox", hidden=hidden, vocab=vocab).to(
        {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    )
    predicted = plan_for(model, dtype=dtype).parts["weights"]
    assert close(predicted, tensor_footprint_bytes(model))


@pytest.mark.parametrize("hidden, vocab", [(128, 1000), (256, 2000), (384, 4000)])
def test_int8_weight_bytes_match_the_footprint(hidden, vocab):
    from minippo.quant import model_footprint_bytes, quantize_model

    model = quantize_model(build("gpt_neox", hidden=hidden, vocab=vocab))  # rest stays fp32
    predicted = plan_for(model, dtype="int8", compute_dtype="fp32").parts["weights"]
    assert close(predicted, model_footprint_bytes(model))


def measure_forward_backward(model, batch, seq_len, checkpointing):
    """Peak bytes of new tensors in a LoRA forward + backward of the PPO kind (log-probs of the
    tokens, a value head), and the bytes of the trainable parameters' gradients."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = torch.nn.Linear(model.config.hidden_size, 1)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len))  # (B, L)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row, as in PPO batches
    with TensorMemoryTracker() as mem:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        logits = out.logits[:, :-1].float()  # (B, L-1, V)
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        values = head(out.hidden_states[-1].float()).squeeze(-1)  # (B, L)
        (-logprobs.mean() + values.pow(2).mean()).backward()
    return mem.peak


@pytest.mark.parametrize(
    "arch, hidden, vocab, targets, checkpointing",
    [
        ("gpt_neox", 128, 2000, "qkv", False),  # logits-heavy
        ("gpt_neox", 256, 2000, "attention", False),
        ("gpt_neox", 256, 2000, "qkv", True),
        ("gpt_neox", 384, 500, "attention", True),  # block-heavy
        ("llama", 128, 2000, "attention", False),
        ("llama", 256, 2000, "qkv", True),
        ("llama", 384, 500, "qkv", False),
        ("llama", 384, 500, "attention", True),
    ],
)
def test_forward_backward_peak_matches_the_plan(arch, hidden, vocab, targets, checkpointing):
    torch.manual_seed(0)
    model = build(arch, hidden=hidden, layers=3, vocab=vocab)
    add_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=TARGETS[arch][targets]))
    batch, seq_len = 4, 64
    measured = measure_forward_backward(model, batch, seq_len, checkpointing)
    plan = plan_for(
        model,
        dtype="fp32",
        lora_r=16,
        lora_targets=targets,
        batch_size=batch,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
    )
    predicted = plan.parts["activations"] + plan.parts["gradients"]
    assert close(predicted, measured), (predicted, measured)


def test_tracker_counts_new_tensors_once_and_frees():
    x = torch.ones(1024)  # made before: not counted
    with TensorMemoryTracker() as mem:
        y = x * 2  # 4 KiB
        z = y.view(32, 32)  # a view: no new storage
        y.add_(1)  # in place: none
        w = z + 1  # 4 KiB more, peak 8 KiB
        del y, z, w
        v = x * 3  # the others were freed: 4 KiB live
    assert mem.peak == 8192 and mem.current == 4096
    del v


# ------------------------------------------------------------------------------- on a CUDA GPU


@pytest.mark.cuda
def test_cuda_forward_backward_peak_matches_the_plan():
    """The same check with the CUDA caching allocator's own counter (max_memory_allocated)."""
    torch.manual_seed(0)
    model = build("gpt_neox", hidden=512, layers=4, vocab=8000).cuda()
    add_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=TARGETS["gpt_neox"]["attention"]))
    model.train()
    head = torch.nn.Linear(512, 1).cuda()
    batch, seq_len = 8, 128
    ids = torch.randint(3, 8000, (batch, seq_len), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    logprobs = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    values = head(out.hidden_states[-1].float()).squeeze(-1)
    (-logprobs.mean() + values.pow(2).mean()).backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    plan = plan_for(
        model,
        dtype="fp32",
        lora_r=16,
        lora_targets="attention",
        batch_size=batch,
        seq_len=seq_len,
        gradient_checkpointing=False,
    )
    predicted = plan.parts["activations"] + plan.parts["gradients"]
    assert close(predicted, measured), (predicted, measured)


@pytest.mark.cuda
def test_cuda_int8_weights_match_the_plan():
    """LLM.int8 on the GPU: memory_allocated after quantising matches the planner's weights."""
    from minippo.quant import quantize_model

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = quantize_model(build("gpt_neox", hidden=1024, layers=4, vocab=8000).half().cuda())
    torch.cuda.synchronize()
    measured = torch.cuda.memory_allocated() - before
    predicted = plan_for(model, dtype="int8", compute_dtype="fp16").parts["weights"]
    assert close(predicted, measured), (predicted, measured)
