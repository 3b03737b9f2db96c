"""Version shims for transformers and bitsandbytes, in one place, each with the versions it covers.

The rest of the core calls these instead of testing versions itself, so that a reader meets the
algorithm, not the history of two libraries' APIs. Delete a shim when its oldest version is dropped
from setup.cfg."""

from __future__ import annotations

import inspect
import logging

import bitsandbytes as bnb
import torch
import transformers
from packaging.version import Version
from torch import nn

logger = logging.getLogger(__name__)


# -- transformers ------------------------------------------------------------------------------
def from_pretrained_dtype_kwarg() -> str:
    """The `from_pretrained` keyword for the parameters' dtype: "dtype" from transformers 4.56 on,
    "torch_dtype" before (4.56 deprecated it)."""
    if Version(transformers.__version__) >= Version("4.56"):
        return "dtype"
    return "torch_dtype"


def set_config_dtype(config, dtype: torch.dtype) -> None:
    """Record `dtype` in a model config: `config.dtype` (transformers >= 4.56), else `torch_dtype`."""
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)


def kv_cache_arg(backbone: nn.Module) -> str:
    """The name under which a backbone's forward takes and returns its KV cache: "cache" where its
    forward has that parameter (transformers 5.x), else "past_key_values" (4.x)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    """transformers' own checkpointing of the decoder layers: `activation_checkpointing_enable`
    (transformers 5.x) or `gradient_checkpointing_enable` (4.x)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# -- bitsandbytes ------------------------------------------------------------------------------
def is_repacked_for_cpu(layer: bnb.nn.Linear4bit) -> bool:
    """Whether bitsandbytes converted this 4-bit layer to its AVX512-BF16 CPU inference layout
    (`quant_state.packing_format_for_cpu`, bitsandbytes 0.48 and later; never set before)."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_4bit_layers_unpacked(model: nn.Module) -> list[str]:
    """Keep every `Linear4bit` of `model` in the layout it was quantised in; returns the names of the
    layers bitsandbytes has repacked already (and that this cannot undo).

    On a CPU with AVX512-BF16, bitsandbytes 0.48 and later (checked up to 0.50) convert a `Linear4bit`
    at its first eval-mode forward without gradients to another layout (`support_avx512bf16_for_cpu`,
    set in its `__init__`): the block scales are rounded to bf16, so the layer computes another function
    from then on, and the kernel of that layout passes no gradient to its input, so LoRA layers below it
    would silently stop learning. Setting the flag to False keeps the portable kernel, whose numbers are
    the ones the layer computes with gradients. Versions without the flag need nothing."""
    repacked = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if is_repacked_for_cpu(module):
                repacked.append(name)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return repacked
