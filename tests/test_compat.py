"""minippo.compat: each shim picks the name its library version has, and the 4-bit one keeps a layer's
function and its input gradient."""

import bitsandbytes as bnb
import pytest
import torch
from tiny import tiny_model
from torch import nn

from minippo import compat
from minippo.quant import quantize_model


def test_transformers_names():
    assert compat.from_pretrained_dtype_kwarg() in ("dtype", "torch_dtype")
    model = tiny_model("llama", 64)
    assert compat.kv_cache_arg(model.base_model) in ("cache", "past_key_values")
    config = model.config
    compat.set_config_dtype(config, torch.bfloat16)
    assert getattr(config, "dtype", getattr(config, "torch_dtype", None)) == torch.bfloat16


def test_gradient_checkpointing_is_switched_on_by_either_name():
    model = tiny_model("llama", 64).train()
    compat.enable_gradient_checkpointing(model, use_reentrant=False)
    assert model.is_gradient_checkpointing


def test_4bit_layers_kept_unpacked_keep_their_input_gradient():
    """After the shim, a forward without gradients in eval mode (which bitsandbytes repacks on an
    AVX512-BF16 CPU) leaves the layer's function and its input gradient as they were."""
    layer = quantize_model(nn.Sequential(nn.Linear(64, 64)), bits=4)[0].eval()
    assert compat.keep_4bit_layers_unpacked(nn.Sequential(layer)) == []
    x = torch.randn(3, 64, requires_grad=True)
    want = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x.detach()), want.detach())
    assert not compat.is_repacked_for_cpu(layer)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_repacked_4bit_layer_is_named():
    layer = quantize_model(nn.Sequential(nn.Linear(64, 64)), bits=4)[0]
    layer.weight.quant_state.packing_format_for_cpu = True
    assert compat.keep_4bit_layers_unpacked(nn.Sequential(layer)) == ["0"]
    from minippo.quant import prepare_model_for_kbit_training

    with pytest.raises(ValueError, match="repacked.*keep_4bit_layers_unpacked"):
        prepare_model_for_kbit_training(nn.Sequential(layer))
    assert isinstance(layer, bnb.nn.Linear4bit)
