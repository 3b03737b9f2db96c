"""LoRA: invariants (init == base, disabled == base, merge keeps outputs), a dense reference, the
peft file contract, peft interop both ways, and clear errors.  Tiny random models, CPU."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from minippo import (
    LoRAConfig,
    add_lora,
    disable_adapters,
    load_adapter,
    merge_lora,
    quantize_model,
    save_adapter,
)
from minippo.adapter_files import PEFT_PREFIX
from minippo.lora import LoRALayer, count_parameters, lora_state_dict

TEXTS = ["This movie was great, I loved the acting.", "Awful dialogue, a waste of time."]
DEFAULT_TARGET = {"gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomise_adapters(model, seed=1, std=0.1):
    """Non-zero B so the adapters change the outputs (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def train_step(model, batch, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    opt.step()
    opt.zero_grad()


# -- invariants --------------------------------------------------------------------------------


def test_lora_at_init_equals_base_exactly(model, batch, arch):
    base = logits(model, batch)
    add_lora(model, LoRAConfig(r=4))
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    assert names and all(n.endswith(tuple(DEFAULT_TARGET[arch])) for n in names)
    assert torch.equal(logits(model, batch), base)


def test_only_adapter_params_require_grad(model, arch):
    _, total_before = count_parameters(model)
    add_lora(model, LoRAConfig(r=4))
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable_names and all(".lora_A." in n or ".lora_B." in n for n in trainable_names)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in lora_state_dict(model).values())
    assert total == total_before + trainable


def test_disable_adapters_gives_base_then_trained_exactly(model, batch):
    base = logits(model, batch)
    add_lora(model, LoRAConfig(r=4, alpha=8))
    model.train()
    train_step(model, batch)
    model.eval()
    trained = logits(model, batch)
    assert not torch.allclose(trained, base, atol=1e-4)
    with disable_adapters(model):
        assert torch.equal(logits(model, batch), base)
        with disable_adapters(model):  # nested: still base, and the inner exit keeps them off
            assert torch.equal(logits(model, batch), base)
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), trained)


def test_disable_adapters_is_exception_safe_and_keeps_mode(model, batch):
    add_lora(model, LoRAConfig(r=4))
    randomise_adapters(model)
    trained = logits(model, batch)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapters(model):
            assert model.training
            raise RuntimeError("boom")
    assert model.training
    model.eval()
    assert torch.equal(logits(model, batch), trained)
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoRALayer))


# -- the layer against a dense reference ---------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_layer_equals_dense_reference(kind, use_rslora):
    torch.manual_seed(0)
    in_f, out_f, r, alpha = 12, 20, 4, 6.0
    base = nn.Linear(in_f, out_f) if kind == "linear" else Conv1D(out_f, in_f)
    if kind == "conv1d":
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
        W = base.weight.detach().t()  # Conv1D stores (in, out)
    else:
        W = base.weight.detach()  # (out, in)
    layer = LoRALayer(base, r=r, alpha=alpha, use_rslora=use_rslora)
    nn.init.normal_(layer.lora_B.weight)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()  # (r, in), (out, r)
    scaling = alpha / (r**0.5 if use_rslora else r)
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(3, 5, in_f)  # (B, L, in)
    ref = x @ (W + scaling * B @ A).T + base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert (A.shape, B.shape) == ((r, in_f), (out_f, r))


def test_lora_layer_on_int8_base_adds_the_dense_update():
    """Over a Linear8bitLt the adapter adds exactly x @ (scaling * B @ A).T to the int8 output."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    base = quantize_model(nn.Sequential(nn.Linear(16, 24)))[0]
    assert isinstance(base, bnb.nn.Linear8bitLt)
    layer = LoRALayer(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight  # (out, in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


def test_lora_layer_keeps_input_dtype():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoRALayer(base, r=2, alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_init_modes():
    torch.manual_seed(0)
    default = LoRALayer(nn.Linear(64, 64), r=8, alpha=8)
    gaussian = LoRALayer(nn.Linear(64, 64), r=8, alpha=8, init="gaussian")
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert default.lora_A.weight.abs().max() <= bound
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.15)
    assert not default.lora_B.weight.any() and not gaussian.lora_B.weight.any()


def test_dropout_only_in_train_mode(model, batch):
    add_lora(model, LoRAConfig(r=4, dropout=0.5))
    randomise_adapters(model)
    a, b = logits(model, batch), logits(model, batch)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = logits(model, batch)
    assert not torch.equal(a, c)


# -- target selection and errors -------------------------------------------------------------


def test_target_modules_forms(tokenizer):
    def wrapped(cfg):
        m = add_lora(tiny_model("llama", len(tokenizer)), cfg)
        return sorted(n for n, x in m.named_modules() if isinstance(x, LoRALayer))

    names = wrapped(LoRAConfig(target_modules=["q_proj", "v_proj"]))
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert wrapped(LoRAConfig(target_modules="q_proj, v_proj")) == names
    assert wrapped(LoRAConfig(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj")) == names[:2]
    all_linear = wrapped(LoRAConfig(target_modules="all-linear"))
    assert len(all_linear) == 14 and not any("lm_head" in n for n in all_linear)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRAConfig(alpha=-1)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        LoRAConfig(init="pissa")
    with pytest.raises(ValueError, match="regex"):
        LoRAConfig(target_modules="q_proj(")
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig(target_modules=[])


def test_no_match_lists_existing_names(model):
    with pytest.raises(ValueError, match="matched no Linear-like module") as err:
        add_lora(model, LoRAConfig(target_modules=["nonexistent_proj"]))
    assert "lm_head" in str(err.value)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_rank_too_large(model):
    with pytest.raises(ValueError, match="exceeds min"):
        add_lora(model, LoRAConfig(r=33))
    assert all(p.requires_grad for p in model.parameters())  # untouched on error


def test_add_lora_twice_is_an_error(model):
    add_lora(model, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoRAConfig(r=2))


# -- merging -------------------------------------------------------------------------------


def test_merge_fp32_matches_and_reloads_in_plain_transformers(model, batch, tmp_path, arch):
    add_lora(model, LoRAConfig(r=4, use_rslora=arch == "llama"))
    randomise_adapters(model)
    adapted = logits(model, batch)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    if arch == "gpt2":
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)  # measured <= 2e-7
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(plain, batch), logits(merged, batch))


def test_merge_to_bf16(model, batch):
    add_lora(model, LoRAConfig(r=4))
    randomise_adapters(model)
    adapted = logits(model, batch)
    merged = merge_lora(model, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    # measured max |diff| 3e-3 .. 4.5e-3 (bf16 rounding of every weight)
    torch.testing.assert_close(logits(merged, batch).float(), adapted, rtol=0, atol=2e-2)


def test_merge_8bit_within_quantisation_error(model, batch, tmp_path, arch):
    """8-bit base + adapter, merged to fp32: the merged weights are the dequantised ones, so the
    only difference left is the int8 *activation* quantisation of the 8-bit forward (measured
    max |diff| 3e-3 .. 4.8e-3 on logits of std ~0.11 here; tolerance 1e-2)."""
    quantize_model(model)
    add_lora(model, LoRAConfig(r=4))
    randomise_adapters(model)
    adapted = logits(model, batch)
    merged = merge_lora(model)
    assert not any(p.dtype == torch.int8 for p in merged.parameters())
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-2)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(plain, batch), logits(merged, batch))


# -- adapter files ---------------------------------------------------------------------------


def test_save_load_round_trip_bit_exact(tokenizer, batch, tmp_path, arch):
    model = add_lora(tiny_model(arch, len(tokenizer)), LoRAConfig(r=4, alpha=8))
    randomise_adapters(model)
    expected = logits(model, batch)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    fresh = tiny_model(arch, len(tokenizer))
    load_adapter(fresh, tmp_path / "adapter")
    for key, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[key], value)
    assert torch.equal(logits(fresh, batch), expected)
    # loading into a model that already has matching LoRA layers overwrites them
    other = add_lora(tiny_model(arch, len(tokenizer)), LoRAConfig(r=4, alpha=8))
    load_adapter(other, tmp_path / "adapter")
    assert torch.equal(logits(other, batch), expected)


def test_peft_file_contract(model, tmp_path, arch):
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05))
    folder = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="org/tiny")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    assert cfg["target_modules"] == DEFAULT_TARGET[arch]
    assert cfg["bias"] == "none" and cfg["use_rslora"] is False and cfg["modules_to_save"] is None
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    assert cfg["base_model_name_or_path"] == "org/tiny" and cfg["init_lora_weights"] is True
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    assert set(tensors) == {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    layer = dict(model.named_modules())[names[0]]
    assert tensors[f"{PEFT_PREFIX}{names[0]}.lora_A.weight"].shape == (4, layer.in_features)
    assert tensors[f"{PEFT_PREFIX}{names[0]}.lora_B.weight"].shape == (layer.out_features, 4)
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp")]


def test_save_load_through_a_wrapper(tokenizer, batch, tmp_path):
    class ValueHeadWrapper(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.pretrained_model = lm
            self.v_head = nn.Linear(32, 1)

    lm = randomise_adapters(add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=4)))
    save_adapter(ValueHeadWrapper(lm), tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(k.startswith(PEFT_PREFIX + "model.layers.") for k in keys)
    wrapper = ValueHeadWrapper(tiny_model("llama", len(tokenizer)))
    load_adapter(wrapper, tmp_path / "a")
    assert torch.equal(logits(wrapper.pretrained_model, batch), logits(lm, batch))


def test_mismatched_adapters_raise_clear_errors(tokenizer, tmp_path):
    llama = randomise_adapters(add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=4)))
    save_adapter(llama, tmp_path / "a", base_model_name_or_path="org/tiny-llama")

    # other architecture: the target modules do not exist there
    with pytest.raises(ValueError, match="matched no Linear-like module"):
        load_adapter(tiny_model("gpt_neox", len(tokenizer)), tmp_path / "a")
    # other rank than the model's LoRA layers
    with pytest.raises(ValueError, match="r=4.*r=2"):
        load_adapter(add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=2)), tmp_path / "a")
    # other base model name
    named = tiny_model("llama", len(tokenizer))
    named.name_or_path = "org/other-model"
    with pytest.raises(ValueError, match="org/tiny-llama.*org/other-model"):
        load_adapter(named, tmp_path / "a")
    load_adapter(named, tmp_path / "a", check_base=False)
    # other shapes (a wider model with the same module names)
    wider = tiny_model("llama", len(tokenizer))
    wider.model.layers[0].self_attn.q_proj = nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(wider, tmp_path / "a")
    assert not any(isinstance(m, LoRALayer) for m in wider.modules())  # nothing changed

    # missing and unexpected keys
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first.replace("layers.0", "layers.7")] = tensors.pop(first)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="1 missing key.*\n.*1 unexpected key"):
        load_adapter(tiny_model("llama", len(tokenizer)), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        load_adapter(tiny_model("llama", len(tokenizer)), tmp_path / "nowhere")


# -- peft interop -----------------------------------------------------------------------------


def test_peft_loads_our_adapter_with_identical_logits(tokenizer, batch, tmp_path, arch):
    from peft import PeftModel

    ours = randomise_adapters(add_lora(tiny_model(arch, len(tokenizer)), LoRAConfig(r=4, alpha=8)))
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_model(arch, len(tokenizer)), tmp_path / "ours").eval()
    assert torch.equal(logits(theirs, batch), logits(ours, batch))


def test_we_load_a_peft_adapter_with_identical_logits(tokenizer, batch, tmp_path, arch):
    from peft import LoraConfig, get_peft_model

    target = DEFAULT_TARGET[arch]
    peft_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=target,
        use_rslora=True,
        fan_in_fan_out=arch == "gpt2",
        task_type="CAUSAL_LM",
    )
    theirs = get_peft_model(tiny_model(arch, len(tokenizer)), peft_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = load_adapter(tiny_model(arch, len(tokenizer)), tmp_path / "theirs")
    assert all(m.use_rslora for m in ours.modules() if isinstance(m, LoRALayer))
    assert torch.equal(logits(ours, batch), logits(theirs, batch))


def test_saved_tiny_model_folder_names_match(tmp_path, tokenizer):
    """base_model_name_or_path defaults to the model's own name: load works on the same folder."""
    path = save_tiny_model(tmp_path / "tiny-llama", "llama")
    model = add_lora(AutoModelForCausalLM.from_pretrained(path), LoRAConfig(r=2))
    save_adapter(model, tmp_path / "a")
    assert json.load(open(tmp_path / "a" / "adapter_config.json"))["base_model_name_or_path"] == path
    load_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path / "a")


def test_merge_of_a_transformers_8bit_model_saves_a_plain_model(tiny_model_dir, batch, tmp_path):
    """transformers' 8-bit load marks the model (hf_quantizer, quantization_config): merge removes it."""
    from minippo import load_model

    model = load_model(tiny_model_dir, load_in_8bit=True)
    assert model.config.quantization_config is not None
    add_lora(model, LoRAConfig(r=4))
    randomise_adapters(model)
    adapted = logits(model, batch)
    merged = merge_lora(model)
    assert not hasattr(merged.config, "quantization_config") and merged.hf_quantizer is None
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=0, atol=1e-2)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.load(open(tmp_path / "merged" / "config.json"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(plain, batch), logits(merged, batch))


def test_interrupted_save_keeps_the_previous_adapter(tokenizer, batch, tmp_path, monkeypatch):
    import minippo.adapter_files as lora_module

    model = randomise_adapters(add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=4)))
    save_adapter(model, tmp_path / "a")
    expected = logits(model, batch)

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    randomise_adapters(model, seed=7)
    monkeypatch.setattr(lora_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = load_adapter(tiny_model("llama", len(tokenizer)), tmp_path / "a")
    assert torch.equal(logits(fresh, batch), expected)


def test_adapter_math_runs_in_fp32_under_bf16_autocast():
    from minippo.lora import LoRALayer

    torch.manual_seed(0)
    layer = LoRALayer(torch.nn.Linear(16, 8), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    dtypes = []
    layer.lora_B.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = layer(x) - layer.base_layer(x)
    assert dtypes == [torch.float32]
    exact = x @ layer.delta_weight().T
    assert (delta.float() - exact).abs().max() < 0.05  # only the bf16 output cast rounds
