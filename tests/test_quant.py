"""8-bit loading: int8 storage, footprint, fp32 agreement, eval pinning, k-bit training
preparation (gradient checkpointing in both re-entrant modes), frozen int8 weights under training."""

import json

import bitsandbytes as bnb
import pytest
import torch
from tiny import randomise_adapters, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.pytorch_utils import Conv1D

import minippo.quant as quant
from minippo import (
    LoRAConfig,
    add_lora,
    load_model,
    prepare_model_for_kbit_training,
    quantize_model,
)
from minippo.app.memory_plan import model_footprint_bytes
from minippo.quant import dequantize_8bit, is_8bit

TEXTS = ["This movie was great, I loved the acting.", "Awful dialogue, a waste of time."]


@pytest.fixture
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def int8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}


def test_quantize_model_stores_int8_and_skips_lm_head(model, arch):
    n_linear = sum(type(m) is nn.Linear or isinstance(m, Conv1D) for m in model.modules())
    quantize_model(model)
    layers = int8_layers(model)
    assert len(layers) == n_linear - 1  # all but lm_head
    assert all(m.weight.dtype == torch.int8 for m in layers.values())
    assert not any(n.endswith("lm_head") for n in layers)
    assert is_8bit(model) and not is_8bit(model.get_output_embeddings())
    if arch == "gpt2":  # Conv1D (in, out) became Linear8bitLt (out, in) and remembers its origin
        c_attn = model.transformer.h[0].attn.c_attn
        assert c_attn.weight.shape == (96, 32) and c_attn.source_cls is Conv1D


def test_8bit_logits_close_to_fp32(model, batch, arch):
    """Measured max |logit diff| 1.4e-3 .. 2.1e-3 (logits std ~0.1): tolerance 1e-2 absolute."""
    ref = logits(model, batch)
    quantize_model(model)
    diff = (logits(model, batch) - ref).abs().max().item()
    assert 0 < diff < 1e-2


def test_dequantize_matches_weight_within_about_half_a_step(model, arch):
    """bitsandbytes rounds the fp16-cast weight: measured error <= 0.52 of a row's step."""
    name, original = next(
        (n, m) for n, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, Conv1D)
    )
    W = original.weight.detach().clone()
    W = W.t() if isinstance(original, Conv1D) else W  # (out, in)
    quantize_model(model)
    layer = model.get_submodule(name)
    deq = dequantize_8bit(layer)  # before any forward: CB/SCB on layer.weight
    step = W.abs().amax(dim=1, keepdim=True) / 127  # (out, 1) row quantisation step
    assert (deq - W).abs().le(0.55 * step).all()
    layer(torch.randn(3, layer.in_features))  # bnb moves CB/SCB to layer.state
    assert layer.weight.SCB is None and layer.state.SCB is not None
    assert torch.equal(dequantize_8bit(layer), deq)
    manual = layer.state.CB.float() * layer.state.SCB.float().unsqueeze(1) / 127
    torch.testing.assert_close(deq, manual)


def test_footprint_is_about_one_byte_per_quantised_weight():
    """Exact accounting on a tiny model; on a model whose Linear layers dominate (H=256, 2 layers,
    V=384) the 8-bit footprint is about a third of the fp32 one (measured 0.336; the fp32
    embeddings, lm_head and norms are not quantised)."""
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
    quantize_model(model)
    layers = int8_layers(model).values()
    weights = sum(m.weight.numel() for m in layers)
    rows = sum(m.out_features for m in layers)
    assert (
        model_footprint_bytes(model) == fp32 - 3 * weights + 4 * rows
    )  # 1 byte each + fp32 row scale
    ratio = model_footprint_bytes(model) / fp32
    assert 0.3 < ratio < 0.37


def test_footprint_counts_tied_weights_once(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model_footprint_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_8bit_layers_are_bitsandbytes_own_and_follow_the_model_mode(tokenizer):
    """prepare_model_for_kbit_training and add_lora leave bitsandbytes' own Linear8bitLt class and its
    train/eval mode alone (no re-classing, no pinning)."""
    model = quantize_model(tiny_model("llama", len(tokenizer)))
    prepare_model_for_kbit_training(model)
    add_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    layers = int8_layers(model).values()
    assert layers and all(type(m) is bnb.nn.Linear8bitLt for m in layers)
    model.train()
    assert all(m.training for m in layers)
    model.eval()
    assert all(not m.training for m in layers)


def test_eval_mode_8bit_passes_the_input_gradient_so_lora_below_trains(tokenizer):
    """bitsandbytes' eval-mode LLM.int8() (PPO's mode) has an input gradient: grad @ (CB * SCB / 127),
    the dequantised weight (within float32 rounding); the adapters of the first layer get gradients."""
    model = quantize_model(tiny_model("llama", len(tokenizer))).eval()
    for layer in int8_layers(model).values():
        x = torch.randn(2, 5, layer.in_features, requires_grad=True)
        grad = torch.randn(2, 5, layer.out_features)
        layer(x).backward(grad)
        torch.testing.assert_close(x.grad, grad @ dequantize_8bit(layer), atol=1e-5, rtol=1e-5)
    prepare_model_for_kbit_training(model)
    randomise_adapters(add_lora(model, LoRAConfig(r=4, target_modules="all-linear")))
    model.eval()
    ids = torch.arange(3, 19).view(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    first = model.model.layers[0].self_attn.q_proj
    assert first.lora_A.weight.grad is not None and first.lora_A.weight.grad.abs().sum() > 0


def test_train_mode_8bit_on_a_cpu_is_the_dequantised_matmul(tokenizer):
    """bitsandbytes' CPU train mode (SFT's): x @ (CB * SCB / 127).T, no activation quantisation; eval
    mode quantises the activations, a function within their int8 rounding of it."""
    model = quantize_model(tiny_model("llama", len(tokenizer)))
    torch.manual_seed(0)
    for layer in int8_layers(model).values():
        x = torch.randn(3, 5, layer.in_features)
        exact = x @ dequantize_8bit(layer).t()
        torch.testing.assert_close(layer.train()(x), exact, atol=1e-5, rtol=1e-5)
        eval_out = layer.eval()(x)
        assert 0 < (eval_out - exact).abs().max() < 0.05 * exact.abs().max()


def test_8bit_model_runs_under_inference_mode(tokenizer, batch):
    """`torch.inference_mode()`, as users write around generation and evaluation, gives the no_grad logits."""
    model = quantize_model(tiny_model("llama", len(tokenizer))).eval()
    expected = logits(model, batch)
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, expected)


def test_load_model_fast_stores_8bit_embeddings_in_bf16_where_native(
    tiny_model_dir, batch, monkeypatch
):
    """fast=True with dtype="auto" + 8-bit: embeddings in bf16 on a CPU with native bf16 only; the plain
    path and an explicit dtype keep float32."""
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        auto = load_model(tiny_model_dir, load_in_8bit=True, dtype="auto", fast=True)
        assert auto.minippo_fast is True
        assert auto.lm_head.weight.dtype == (torch.bfloat16 if native else torch.float32)
        assert (
            auto.model.norm.weight.dtype == torch.float32
            and logits(auto, batch).dtype == torch.float32
        )
        plain = load_model(tiny_model_dir, load_in_8bit=True, dtype="auto")
        assert plain.lm_head.weight.dtype == torch.float32
        assert not hasattr(plain, "minippo_fast")
    explicit = load_model(tiny_model_dir, load_in_8bit=True, fast=True)
    assert explicit.lm_head.weight.dtype == torch.float32
    assert (
        load_model(tiny_model_dir, dtype="auto").lm_head.weight.dtype == torch.bfloat16
    )  # float model


def test_cpu_bf16_setting_overrides_the_probe(tiny_model_dir, monkeypatch):
    """$MINIPPO_CPU_BF16=0 takes the float32 paths on a CPU with native bf16 (the paths a CPU without it
    takes), 1 the bf16 ones on a CPU without; any other value is refused with the fix in the message."""
    for native, setting in ((True, "0"), (False, "1"), (True, "")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setenv(quant.CPU_BF16_ENV, setting)
        bf16 = setting == "1" or (native and not setting)
        assert quant.cpu_bf16_is_native() is bf16
        assert quant.auto_compute_dtype("cpu") == (torch.bfloat16 if bf16 else torch.float32)
        auto = load_model(tiny_model_dir, load_in_8bit=True, dtype="auto", fast=True)
        assert auto.lm_head.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    monkeypatch.setenv(quant.CPU_BF16_ENV, "yes")
    with pytest.raises(
        ValueError, match=r"MINIPPO_CPU_BF16='yes': set it to 0 .*, 1 .* or unset it"
    ):
        quant.auto_compute_dtype("cpu")


def test_prepare_freezes_upcasts_and_returns_fp32_logits(tokenizer, batch):
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    quantize_model(model)
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    floats = [p for p in model.parameters() if p.dtype != torch.int8]
    assert floats and all(p.dtype == torch.float32 for p in floats)
    assert model.model.norm.weight.dtype == torch.float32
    assert logits(model, batch).dtype == torch.float32


def test_optimiser_step_changes_outputs_but_not_int8_weights(model, batch):
    quantize_model(model)
    prepare_model_for_kbit_training(model)
    add_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    frozen = {
        n: (m.weight.data.clone(), dequantize_8bit(m).clone())
        for n, m in int8_layers(model).items()
    }
    before = logits(model, batch)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert not torch.allclose(logits(model, batch), before, atol=1e-3)
    for name, m in int8_layers(model).items():
        assert m.weight.dtype == torch.int8 and not m.weight.requires_grad
        assert torch.equal(m.weight.data, frozen[name][0])
        assert torch.equal(dequantize_8bit(m), frozen[name][1])


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_grads(tokenizer, batch, arch, use_reentrant):
    def grads(checkpointing):
        model = quantize_model(tiny_model(arch, len(tokenizer)))
        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, use_reentrant=use_reentrant
        )
        add_lora(model, LoRAConfig(r=4, init="gaussian"))
        with torch.no_grad():  # non-zero B so A gets gradients too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model.train()
        torch.manual_seed(0)  # same dropout masks (gpt2 / gpt_neox have dropout)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    assert all(g.abs().sum() > 0 for g in checkpointed.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


# -- loading -----------------------------------------------------------------------------------


def test_load_model_float_dtypes(tiny_model_dir, batch):
    fp32 = load_model(tiny_model_dir)
    assert not fp32.training and fp32.model.norm.weight.dtype == torch.float32
    bf16 = load_model(tiny_model_dir, dtype="bfloat16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")


def test_load_model_8bit_transformers_path_and_fallback_agree(tiny_model_dir, batch, monkeypatch):
    via_transformers = load_model(tiny_model_dir, load_in_8bit=True)
    assert getattr(via_transformers, "is_loaded_in_8bit", False)
    assert all(m.weight.dtype == torch.int8 for m in int8_layers(via_transformers).values())

    def broken(*args, **kwargs):
        raise RuntimeError("no bitsandbytes backend here")

    import transformers

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", broken)
    ours = load_model(tiny_model_dir, load_in_8bit=True)
    assert not getattr(ours, "is_loaded_in_8bit", False) and is_8bit(ours)
    assert int8_layers(ours).keys() == int8_layers(via_transformers).keys()
    assert torch.equal(logits(ours, batch), logits(via_transformers, batch))


def test_resolve_dtype():
    assert quant.resolve_dtype("bf16") is torch.bfloat16
    assert quant.resolve_dtype("torch.float16") is torch.float16
    assert quant.resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="floating"):
        quant.resolve_dtype(torch.int8)


@pytest.mark.cuda
def test_8bit_lora_forward_backward_on_cuda(tokenizer, batch):
    model = quantize_model(tiny_model("llama", len(tokenizer)), device="cuda")
    assert next(iter(int8_layers(model).values())).weight.device.type == "cuda"
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    add_lora(model, LoRAConfig(r=4))
    model.to("cuda").train()
    batch = {k: v.cuda() for k, v in batch.items()}
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "cuda" for g in grads)
    assert all(m.weight.dtype == torch.int8 for m in int8_layers(model).values())


def test_a_model_with_its_own_code_is_refused_unless_asked(tmp_path, tokenizer):
    """A folder whose config names its own Python code (``auto_map``) loads only with
    ``trust_remote_code=True``: running a model folder's code is the user's decision, never a default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "custom"
    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(folder)
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        '    model_type = "minippo_custom"\n'
    )
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = LlamaConfig.from_pretrained(folder).to_dict()
    config["model_type"] = "minippo_custom"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(folder))
    loaded = load_model(str(folder), trust_remote_code=True)
    assert type(loaded).__name__ == "CustomForCausalLM" and isinstance(loaded, LlamaForCausalLM)
