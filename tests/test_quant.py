"""8-bit loading: int8 storage, footprint, fp32 agreement, eval pinning, k-bit training
preparation (gradient checkpointing in both re-entrant modes), frozen int8 weights under training."""

import json

import bitsandbytes as bnb
import pytest
import torch
from tiny import tiny_model
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
from minippo.policy import PolicyWithValueHead
from minippo.quant import dequantize_8bit, is_8bit, keep_8bit_layers_in_eval, store_embeddings_in

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


def test_8bit_layers_stay_in_eval_mode(model, batch):
    quantize_model(model)
    keep_8bit_layers_in_eval(model, int8_path=True)
    model.train()
    assert model.training
    assert all(not m.training for m in int8_layers(model).values())
    assert all(m.training for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in int8_layers(model).values())


def test_pinned_eval_keeps_int8_path_in_train_mode(tokenizer, batch):
    """Llama has no dropout: with the 8-bit layers pinned, train-mode logits == eval-mode logits."""
    model = quantize_model(tiny_model("llama", len(tokenizer)))
    keep_8bit_layers_in_eval(model, int8_path=True)
    eval_logits = logits(model, batch)
    model.train()
    assert torch.equal(logits(model, batch), eval_logits)


def test_8bit_path_follows_the_cpu(tokenizer, batch, monkeypatch):
    """The int8 GEMM where the CPU has VNNI/AMX; else the dequantising float matmul, whose logits are
    at least as close to fp32 (no activation quantisation), in train and eval mode alike."""
    fp32, errors = logits(tiny_model("llama", len(tokenizer)), batch), {}
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        model = keep_8bit_layers_in_eval(quantize_model(tiny_model("llama", len(tokenizer))))
        layers = int8_layers(model).values()
        assert all(m.int8_path == native and m.training == (not native) for m in layers)
        eval_logits = logits(model, batch)
        model.train()
        assert torch.equal(logits(model, batch), eval_logits)  # pinned: one function in both modes
        errors[native] = (eval_logits - fp32).abs().max()
    assert errors[True] < 1e-2
    assert errors[False] <= errors[True]  # the float matmul on int8 weights: no activation rounding


def test_int8_linear_is_llm_int8_in_float32(tokenizer):
    """minippo's CPU int8 forward: bitsandbytes' LLM.int8() (outlier columns in float, the rest int8 per
    row) computed in float32: as close to the float matmul on the dequantised weight as bitsandbytes'
    float16 version, and closer to it than to that matmul; any input rank; outlier columns exact."""
    model = keep_8bit_layers_in_eval(
        quantize_model(tiny_model("llama", len(tokenizer))), int8_path=True
    )
    torch.manual_seed(0)
    for layer in int8_layers(model).values():
        x = torch.randn(16, 5, layer.in_features)
        x[1, 2, 3] = 9.0  # an outlier (threshold 6): column 3 goes through the float matmul
        bias = 0 if layer.bias is None else layer.bias
        exact = x @ dequantize_8bit(layer).t() + bias
        ours, theirs = quant.int8_linear(x, layer), bnb.nn.Linear8bitLt.forward(layer, x)
        assert ours.shape == exact.shape and ours.dtype == torch.float32
        error, theirs_error = (ours - exact).abs().mean(), (theirs - exact).abs().mean()
        assert 0 < error <= 1.02 * theirs_error and (ours - theirs).abs().mean() < theirs_error
        assert torch.equal(layer(x), ours)  # the pinned layer's forward on a CPU
        assert torch.equal(quant.int8_linear(x.view(80, -1), layer), ours.view(80, -1))
        assert torch.equal(quant.int8_linear(x.view(4, 4, 5, -1), layer), ours.view(4, 4, 5, -1))
        outliers = torch.zeros_like(x)
        outliers[..., 3] = torch.linspace(-8, 8, 80).view(16, 5)
        torch.testing.assert_close(
            quant.int8_linear(outliers, layer), outliers @ dequantize_8bit(layer).t() + bias
        )


def test_int8_linear_quantises_an_input_once_for_the_layers_that_read_it(tokenizer, monkeypatch):
    """q, k and v (gate and up) read one tensor: its int8 rows and outlier columns are made once and
    reused, with each layer's numbers those of a fresh quantisation; an in-place change of the input, or
    another tensor, is quantised anew."""
    model = keep_8bit_layers_in_eval(
        quantize_model(tiny_model("llama", len(tokenizer))), int8_path=True
    )
    attention = model.model.layers[0].self_attn
    made = []
    quantise = quant._quantise_rows
    monkeypatch.setattr(quant, "_quantise_rows", lambda *args: made.append(1) or quantise(*args))
    layers = attention.q_proj, attention.k_proj, attention.v_proj
    x = torch.randn(3, 5, attention.q_proj.in_features)
    x[0, 1, 2] = 9.0  # an outlier column
    outs = [quant.int8_linear(x, layer) for layer in layers]
    assert len(made) == 1  # once for the three
    fresh = [quant.int8_linear(x.clone(), layer) for layer in layers]  # another tensor each time
    assert len(made) == 4 and all(torch.equal(a, b) for a, b in zip(outs, fresh))
    quant.int8_linear(x, layers[0])
    x.mul_(-0.5)  # changed in place: quantised anew
    after = quant.int8_linear(x, layers[0])
    assert len(made) == 6 and torch.equal(after, quant.int8_linear(x.clone(), layers[0]))

    with torch.inference_mode():  # inference tensors have no version counter: quantised each call
        y, before = torch.randn(3, 5, attention.q_proj.in_features), len(made)
        outs = [quant.int8_linear(y, layer) for layer in layers]
        assert len(made) == before + 3
        y.mul_(-0.5)
        assert torch.equal(quant.int8_linear(y, layers[0]), quant.int8_linear(y.clone(), layers[0]))


def test_8bit_model_runs_under_inference_mode(tokenizer, batch):
    """`torch.inference_mode()`, as users write around generation and evaluation, gives the no_grad logits."""
    model = keep_8bit_layers_in_eval(
        quantize_model(tiny_model("llama", len(tokenizer))), int8_path=True
    )
    expected = logits(model, batch)
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, expected)


def test_int8_input_gradient_in_bf16_or_int8(tokenizer):
    """grad_dtype bf16 or int8: the same forward bit for bit; the input gradient one bf16 matmul on the exact
    int8 weight, or the gradient's rows rounded to int8 through the int8 GEMM: within that rounding of
    the fp32 gradient on the dequantised weight (bitsandbytes' own), on 2-D and 3-D inputs."""
    model = keep_8bit_layers_in_eval(
        quantize_model(tiny_model("llama", len(tokenizer))), int8_path=True
    )
    for layer in int8_layers(model).values():
        for shape in ((2, 5), (7,)):
            x = torch.randn(*shape, layer.in_features)
            grads, outs = {}, {}
            for dtype in (None, torch.bfloat16, torch.int8):
                layer.grad_dtype, x.grad = dtype, None
                outs[dtype] = layer(x.requires_grad_())
                grad = torch.linspace(-1, 1, outs[dtype].numel()).view_as(outs[dtype]) ** 3
                outs[dtype].backward(grad)
                grads[dtype] = x.grad
                assert torch.equal(outs[None], outs[dtype]) and x.grad.shape == x.shape
            exact = grad @ dequantize_8bit(layer)  # (*shape, in)
            for dtype, tolerance in ((None, 1e-5), (torch.bfloat16, 1e-2), (torch.int8, 1e-2)):
                error = (grads[dtype] - exact).abs().max() / exact.abs().max()
                assert (dtype is None or 0 < error) and error < tolerance  # rounded, not skipped


def test_int8_input_gradient_follows_the_cpu(tokenizer, monkeypatch):
    """The input gradient through the int8 GEMM wherever the int8 path is native; LoRA gradients as with
    the float32 or bf16 input gradient (cosine > 0.999), with the layers recomputed in backward too."""
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda native=native: native)
        model = quantize_model(tiny_model("llama", len(tokenizer)))
        for int8_path in (None, True, False):
            keep_8bit_layers_in_eval(model, int8_path=int8_path)
            layers = int8_layers(model).values()
            assert {m.int8_path for m in layers} == {native if int8_path is None else int8_path}
            int8_grad = native and int8_path is not False
            assert {m.grad_dtype for m in layers} == {torch.int8 if int8_grad else None}
    grads = {}
    runs = ((None, False), (torch.bfloat16, False), (torch.int8, False), (torch.int8, True))
    for dtype, checkpointing in runs:
        torch.manual_seed(0)
        model = quantize_model(tiny_model("llama", len(tokenizer)))
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        add_lora(model, LoRAConfig(r=4, alpha=8))
        for layer in int8_layers(model).values():
            layer.int8_path, layer.grad_dtype = True, dtype
        model.train()
        ids = torch.arange(3, 19).view(2, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[dtype, checkpointing] = torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.requires_grad]
        )
    reference = grads.pop((None, False))
    assert reference.abs().sum() > 0
    for grad in grads.values():  # bf16, int8, and int8 with the layers recomputed in backward
        assert torch.nn.functional.cosine_similarity(reference, grad, dim=0) > 0.999


@pytest.mark.parametrize(
    "arch", ["llama", "gpt2", "gpt_neox"]
)  # gpt2 ties its LM head, the others not
def test_embeddings_stored_in_bf16_keep_the_hidden_states_float32(tokenizer, batch, arch):
    """store_embeddings_in: bf16 embedding and LM head weights (still one matrix where tied), float32
    hidden states and logits close to the float32 model's; idempotent; prepare keeps the bf16 storage;
    LoRA gradients as with float32 embeddings; the logits are the policy's own (check_logits)."""
    models, grads = {}, {}
    for stored in (False, True):
        model = quantize_model(tiny_model(arch, len(tokenizer)))
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if stored:
            for _ in range(2):
                store_embeddings_in(model, torch.bfloat16)
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
    fp32, bf16 = logits(models[False], batch), logits(models[True], batch)
    assert 0 < (bf16 - fp32).abs().max() < 2e-2 * fp32.abs().max()  # rounded weights, nothing else
    assert torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0) > 0.999
    PolicyWithValueHead(models[True]).check_logits(
        rtol=1e-6
    )  # minippo's logits are the model's own


def test_load_model_stores_8bit_embeddings_in_bf16_where_native(tiny_model_dir, batch, monkeypatch):
    """dtype="auto" + 8-bit: embeddings in bf16 on a CPU with native bf16 only; an explicit dtype is kept."""
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        auto = load_model(tiny_model_dir, load_in_8bit=True, dtype="auto")
        assert auto.lm_head.weight.dtype == (torch.bfloat16 if native else torch.float32)
        assert (
            auto.model.norm.weight.dtype == torch.float32
            and logits(auto, batch).dtype == torch.float32
        )
    assert load_model(tiny_model_dir, load_in_8bit=True).lm_head.weight.dtype == torch.float32
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
        auto = load_model(tiny_model_dir, load_in_8bit=True, dtype="auto")
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
