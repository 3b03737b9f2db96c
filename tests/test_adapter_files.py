"""Adapter files: the peft file contract, save/load round trips, peft interop both ways, clear errors
on mismatched adapters, and crash-safe saving.  Tiny random models, CPU."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import logits, randomise_adapters, save_tiny_model, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from minippo import LoRAConfig, add_lora, load_adapter, save_adapter
from minippo.adapter_files import PEFT_PREFIX
from minippo.lora import LoRALayer, lora_state_dict

TEXTS = ["This movie was great, I loved the acting.", "Awful dialogue, a waste of time."]
DEFAULT_TARGET = {
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@pytest.fixture
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


# -- the peft file contract ----------------------------------------------------------------------


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


# -- peft interop ----------------------------------------------------------------------------


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
    assert (
        json.load(open(tmp_path / "a" / "adapter_config.json"))["base_model_name_or_path"] == path
    )
    load_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path / "a")


def test_interrupted_save_keeps_the_previous_adapter(tokenizer, batch, tmp_path, monkeypatch):
    import minippo.adapter_files as adapter_files

    model = randomise_adapters(add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=4)))
    save_adapter(model, tmp_path / "a")
    expected = logits(model, batch)

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    randomise_adapters(model, seed=7)
    monkeypatch.setattr(adapter_files, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = load_adapter(tiny_model("llama", len(tokenizer)), tmp_path / "a")
    assert torch.equal(logits(fresh, batch), expected)


# -- named adapters ------------------------------------------------------------------------------
# scaling 4, a power of two: peft scales after B, we before; exact either way, so logits compare bit for bit
REWARD = LoRAConfig(r=2, alpha=8, target_modules=["q_proj", "o_proj"])


def two_adapters(tokenizer, bits=0):
    from minippo import quantize_model

    model = tiny_model("llama", len(tokenizer))
    if bits:
        quantize_model(model, bits=bits)
    add_lora(model, LoRAConfig(r=4, alpha=8))
    add_lora(model, REWARD, adapter_name="reward")
    return randomise_adapters(model)


def adapter_logits(model, batch):
    """{"base", "default", "reward"}: the logits with no adapter, and with each alone."""
    from minippo.lora import disable_adapters, use_adapter

    out = {}
    with disable_adapters(model):
        out["base"] = logits(model, batch)
    for name in ("default", "reward"):
        with use_adapter(model, name):
            out[name] = logits(model, batch)
    return out


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_named_adapters_save_in_peft_layout_and_load_back(tokenizer, batch, tmp_path, bits):
    model = two_adapters(tokenizer, bits)
    expected = adapter_logits(model, batch)
    assert save_adapter(model, tmp_path / "a") == str(tmp_path / "a")
    assert save_adapter(model, tmp_path / "a", adapter_name="reward") == str(
        tmp_path / "a" / "reward"
    )
    cfg = json.load(open(tmp_path / "a" / "reward" / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (2, 8, ["q_proj", "o_proj"])
    keys = load_file(tmp_path / "a" / "reward" / "adapter_model.safetensors")
    assert f"{PEFT_PREFIX}model.layers.0.self_attn.o_proj.lora_A.weight" in keys  # no name in keys
    assert not any("reward" in k or "base_layer" in k for k in keys)
    fresh = tiny_model("llama", len(tokenizer))
    if bits:
        from minippo import quantize_model

        quantize_model(fresh, bits=bits)
    load_adapter(fresh, tmp_path / "a")
    load_adapter(fresh, tmp_path / "a", adapter_name="reward")
    got = adapter_logits(fresh, batch)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # an adapter saved alone loads under any name (a reward adapter beside the policy's)
    other = add_lora(tiny_model("llama", len(tokenizer)), LoRAConfig(r=4, alpha=8))
    load_adapter(other, tmp_path / "a" / "reward", adapter_name="critic")
    from minippo.lora import adapter_names

    assert adapter_names(other) == ["default", "critic"]
    with pytest.raises(ValueError, match=r"no adapter named 'value'.*\['default', 'critic'\]"):
        save_adapter(other, tmp_path / "b", adapter_name="value")


def test_peft_loads_our_named_adapters(tokenizer, batch, tmp_path):
    from peft import PeftModel

    model = two_adapters(tokenizer)
    expected = adapter_logits(model, batch)
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a", adapter_name="reward")
    theirs = PeftModel.from_pretrained(tiny_model("llama", len(tokenizer)), tmp_path / "a")
    theirs.load_adapter(tmp_path / "a" / "reward", adapter_name="reward")
    theirs.eval()
    assert torch.equal(logits(theirs, batch), expected["default"])
    theirs.set_adapter("reward")
    assert torch.equal(logits(theirs, batch), expected["reward"])
    with theirs.disable_adapter():
        assert torch.equal(logits(theirs, batch), expected["base"])


def test_we_load_peft_named_adapters(tokenizer, batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    from minippo.lora import use_adapter

    default = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = get_peft_model(tiny_model("llama", len(tokenizer)), default)
    theirs.add_adapter("reward", LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval().save_pretrained(tmp_path / "theirs")  # default in the folder, reward in reward/
    assert (tmp_path / "theirs" / "reward" / "adapter_model.safetensors").exists()
    expected = {"default": logits(theirs, batch)}
    theirs.set_adapter("reward")
    expected["reward"] = logits(theirs, batch)
    ours = load_adapter(tiny_model("llama", len(tokenizer)), tmp_path / "theirs")
    load_adapter(ours, tmp_path / "theirs", adapter_name="reward")
    assert torch.equal(logits(ours, batch), expected["default"])
    with use_adapter(ours, "reward"):
        assert torch.equal(logits(ours, batch), expected["reward"])
