"""LoRA: invariants (init == base, disabled == base, merge keeps outputs), a dense reference and
clear errors.  Tiny random models, CPU.  The adapter files are tested in test_adapter_files.py."""

import json

import pytest
import torch
from tiny import logits, randomise_adapters, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from minippo import LoRAConfig, add_lora, disable_adapters, merge_lora, quantize_model
from minippo.lora import LoRALayer, count_parameters, lora_state_dict

TEXTS = ["This movie was great, I loved the acting.", "Awful dialogue, a waste of time."]
DEFAULT_TARGET = {
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@pytest.fixture
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


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
    torch.testing.assert_close(
        logits(merged, batch), adapted, rtol=1e-5, atol=1e-5
    )  # measured <= 2e-7
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


def test_adapter_math_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = LoRALayer(torch.nn.Linear(16, 8), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    dtypes = []
    layer.lora_A.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = layer(x) - layer.base_layer(x)
    assert dtypes == [torch.float32]
    exact = x @ layer.delta_weight().T
    assert (delta.float() - exact).abs().max() < 0.05  # only the bf16 output cast rounds


@pytest.mark.parametrize("out_features", [8, 40])
def test_adapter_gradients_are_those_of_two_linear_layers(out_features):
    """The adapter's product has the gradients of x @ A.T * scaling @ B.T, for x, A and B, on 3-D
    inputs."""
    torch.manual_seed(0)
    layer = LoRALayer(torch.nn.Linear(24, out_features), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x, g = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, out_features)
    layer(x).backward(g)
    a, b = (
        layer.lora_A.weight.detach().requires_grad_(),
        layer.lora_B.weight.detach().requires_grad_(),
    )
    x2 = x.detach().requires_grad_()
    (
        layer.base_layer(x2) + nn.functional.linear(nn.functional.linear(x2, a) * layer.scaling, b)
    ).backward(g)
    for ours, reference in (
        (x.grad, x2.grad),
        (layer.lora_A.weight.grad, a.grad),
        (layer.lora_B.weight.grad, b.grad),
    ):
        torch.testing.assert_close(ours, reference)  # float32 tolerances


# -- the base is the base -----------------------------------------------------------------------
def save_tiny_llama_64(path):
    """A tiny llama whose layer sizes are multiples of 64: bitsandbytes' AVX512-BF16 4-bit CPU kernel,
    which a forward without gradients switches to, needs them."""
    from tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fast_path", [False, True])
def test_add_lora_and_disable_adapters_keep_the_base_bit_for_bit(tmp_path, bits, fast_path):
    """A model loaded by transformers with BitsAndBytesConfig computes, with adapters added and switched
    off, the logits it computed before, bit for bit: on the plain path, and on the fast path switched on
    (`minippo.fast.enable`) before the first logits."""
    import transformers

    from minippo import fast
    from minippo.fast.int8 import int8_matmul_is_native

    if fast_path and bits == 8 and not int8_matmul_is_native("cpu"):
        pytest.skip("the fast int8 layers need VNNI or AMX")
    folder = save_tiny_llama_64(tmp_path / "tiny")
    options = {"load_in_8bit": True} if bits == 8 else {"load_in_4bit": True}
    if bits == 4:
        options["bnb_4bit_compute_dtype"] = torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=transformers.BitsAndBytesConfig(**options),
        device_map={"": "cpu"},
        dtype=torch.float32,
    )
    if fast_path:
        fast.enable(model)
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    add_lora(model, LoRAConfig(target_modules="all-linear"))
    randomise_adapters(model)
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, want)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, want)  # the adapters are on again


# -- named adapters ----------------------------------------------------------------------------
REWARD = LoRAConfig(r=2, alpha=6, target_modules=["q_proj", "o_proj"])  # own targets, rank, alpha


def two_adapters(tokenizer, bits=0, seed=0):
    """A tiny llama (k-bit for bits 8 / 4) with a "default" adapter on q, v and a "reward" one on q, o."""
    model = tiny_model("llama", len(tokenizer), seed=seed)
    if bits:
        quantize_model(model, bits=bits)
    add_lora(model, LoRAConfig(r=4))
    add_lora(model, REWARD, adapter_name="reward")
    return randomise_adapters(model, seed=seed + 1)


def one_adapter(tokenizer, other, name, bits=0, seed=0):
    """The same base with only adapter `name` of `other`, under the same name (its weights copied)."""
    from minippo.lora import lora_state_dict as state

    model = tiny_model("llama", len(tokenizer), seed=seed)
    if bits:
        quantize_model(model, bits=bits)
    add_lora(model, other.lora_configs[name], adapter_name=name)
    with torch.no_grad():
        for key, value in state(model, name).items():
            value.copy_(state(other, name)[key])
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_named_adapters_on_a_kbit_base_select_and_leave_the_base_exact(tokenizer, batch, bits):
    from minippo.lora import adapter_layers, adapter_names, use_adapter

    base = quantize_model(tiny_model("llama", len(tokenizer)), bits=bits)
    expected_base = logits(base, batch)
    model = two_adapters(tokenizer, bits)
    assert adapter_names(model) == ["default", "reward"]
    o_proj = model.model.layers[0].self_attn.o_proj  # targeted only by the second adapter
    assert isinstance(o_proj, LoRALayer) and o_proj.adapter_name == "reward"
    q_proj = model.model.layers[0].self_attn.q_proj  # both: "reward" inside "default"
    assert (q_proj.adapter_name, q_proj.base_layer.adapter_name) == ("default", "reward")
    assert [n for n, _ in adapter_layers(model, "reward")][:2] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
    ]
    assert {m.r for _, m in adapter_layers(model, "reward")} == {2}
    with disable_adapters(model):
        assert torch.equal(logits(model, batch), expected_base)  # bit for bit
    # the first adapter is the active one; each alone equals a model holding only it
    policy = logits(model, batch)
    assert torch.equal(policy, logits(one_adapter(tokenizer, model, "default", bits), batch))
    with use_adapter(model, "reward"):
        reward = logits(model, batch)
    assert torch.equal(reward, logits(one_adapter(tokenizer, model, "reward", bits), batch))
    assert not torch.equal(reward, policy) and not torch.equal(reward, expected_base)
    assert torch.equal(logits(model, batch), policy)


def test_use_adapter_and_disable_adapters_nest_and_restore(tokenizer, batch):
    from minippo.lora import use_adapter

    model = two_adapters(tokenizer)
    policy = logits(model, batch)
    with disable_adapters(model):
        base = logits(model, batch)
    with use_adapter(model, "reward"):
        reward = logits(model, batch)
        with disable_adapters(model):
            assert torch.equal(logits(model, batch), base)
            with use_adapter(model, "default"):
                assert torch.equal(logits(model, batch), policy)
            assert torch.equal(logits(model, batch), base)
        assert torch.equal(logits(model, batch), reward)
        with pytest.raises(RuntimeError, match="boom"):
            with use_adapter(model, "default"):
                raise RuntimeError("boom")
        assert torch.equal(logits(model, batch), reward)
    assert torch.equal(logits(model, batch), policy)


def test_second_adapter_trains_apart_from_the_first(tokenizer, batch):
    from minippo.lora import adapter_parameters, use_adapter

    model = tiny_model("llama", len(tokenizer))
    add_lora(model, LoRAConfig(r=4))
    add_lora(model, REWARD, adapter_name="reward")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    policy, reward = adapter_parameters(model, "default"), adapter_parameters(model, "reward")
    assert trainable == {id(p) for p in policy + reward}  # the first adapter stays trainable
    before = [p.detach().clone() for p in policy]
    opt = torch.optim.Adam(reward, lr=1e-2)
    with use_adapter(model, "reward"):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is None for p in policy)  # an inactive adapter gets no gradient
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(policy, before))


def test_adapter_names_are_checked(tokenizer):
    from minippo.lora import adapter_parameters, use_adapter

    model = two_adapters(tokenizer)
    for call in (
        lambda: use_adapter(model, "critic"),
        lambda: merge_lora(model, adapter_name="critic"),
        lambda: adapter_parameters(model, "critic"),
    ):
        with pytest.raises(ValueError, match=r"no adapter named 'critic'.*\['default', 'reward'\]"):
            call()
    with pytest.raises(
        ValueError, match=r"already has LoRA adapter 'reward'.*\['default', 'reward'\]"
    ):
        add_lora(model, REWARD, adapter_name="reward")
    with pytest.raises(ValueError, match="adapter_name must be"):
        add_lora(model, REWARD, adapter_name="a.b")


def test_merge_one_named_adapter_keeps_the_other(tokenizer, batch):
    from minippo.lora import adapter_names, use_adapter

    model = two_adapters(tokenizer, bits=8)
    with use_adapter(model, "reward"):
        reward = logits(model, batch)
    merged = merge_lora(model, adapter_name="reward")
    assert adapter_names(merged) == ["default"]
    assert all(
        m.lora_A.weight.dtype == torch.float32 for m in merged.modules() if isinstance(m, LoRALayer)
    )
    with disable_adapters(merged):  # the base now holds the reward adapter (8-bit: dequantised)
        torch.testing.assert_close(logits(merged, batch), reward, rtol=0, atol=1e-2)
    assert list(merged.lora_configs) == ["default"]
    merge_lora(merged)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
