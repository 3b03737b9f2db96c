"""The fast path: faster forms of the plain path's pieces, each tested against it (tests/fast/).

One switch turns them all on for a model: ``minippo.load_model(..., fast=True)``, or `enable(model)` for a
model loaded elsewhere, called before its first forward. `enable` replaces modules by the classes of this
package (`model.set_submodule`), so what it chose for each layer shows in ``repr(model)``, and sets the
plain marker ``model.minippo_fast = True``. The core never needs this package: it finds the fast LM head's
methods by duck typing. A student may skip it (docs/fast.md lists each piece, its reference, its tolerance).

- int8.py: bitsandbytes' CPU LLM.int8() forward bit for bit, each input quantised once for the layers
  that read it, the input gradient through the int8 GEMM;
- head.py: log-probs and entropies from the hidden states without the logits (a hand-written gradient);
- rows.py: log-probs and entropies of logits a few rows at a time (cache-sized);
- storage.py: embeddings (and the tied LM head) stored in bf16 on a CPU with native bf16;
- sampling.py: inverse-CDF sampling;
- allocator.py: glibc malloc kept from returning freed memory (a process setting: the CLI calls it)."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from ..quant import cpu_bf16_is_native, is_8bit
from .head import FastLMHead
from .int8 import FastLinear8bitLt, Int8InputReuse, int8_matmul_is_native
from .storage import StoredEmbedding

__all__ = ["enable", "is_native"]


def is_native(device: torch.device | str) -> bool:
    """Whether `device` has the native paths the fast path builds on: CUDA, or a CPU with native bf16
    (AVX512_BF16 or AMX; `$MINIPPO_CPU_BF16` overrides the probe) or an int8 GEMM (VNNI or AMX)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    return cpu_bf16_is_native() or int8_matmul_is_native(device)


def enable(
    model: nn.Module,
    *,
    int8: bool | None = None,
    int8_backward: bool | None = None,
    embeddings_dtype: torch.dtype | str | None = "auto",
    head: bool = True,
) -> nn.Module:
    """Swap in the fast modules, in place; returns `model`. Call it before the first forward: from then on
    the model computes one function, which `add_lora` and `disable_adapters` keep.

    ``int8``: each frozen `Linear8bitLt` -> `FastLinear8bitLt` (None: on a CPU with an int8 GEMM; on CUDA
    bitsandbytes' own kernels are the fast ones). ``int8_backward``: its input gradient through the int8
    GEMM (None: where that is native). ``embeddings_dtype``: store the input embeddings and the LM head
    in it ("auto": bf16 for an 8-bit model on a CPU with native bf16; None: as they are). ``head``: the
    LM head (a bias-free float nn.Linear) -> `FastLMHead`."""
    if getattr(model, "minippo_fast", False):
        return model
    first = next(model.parameters())
    device = first.device
    cpu = device.type == "cpu"
    native_int8 = int8_matmul_is_native(device)
    if int8 is None:
        int8 = cpu and native_int8
    if int8_backward is None:
        int8_backward = native_int8
    if embeddings_dtype == "auto":
        bf16 = cpu and cpu_bf16_is_native() and is_8bit(model)
        embeddings_dtype = torch.bfloat16 if bf16 else None
    if int8:
        _fast_int8_layers(model, int8_backward)
    _fast_embeddings_and_head(model, embeddings_dtype, head)
    model.minippo_fast = True
    return model


def _fast_int8_layers(model: nn.Module, int8_backward: bool) -> None:
    """Each `Linear8bitLt` -> `FastLinear8bitLt`, sharing one `Int8InputReuse` scoped to a forward of the
    backbone (`model.base_model`: both `model(...)` and the policy's backbone calls run through it)."""
    reuse = Int8InputReuse()
    reuse.attach(getattr(model, "base_model", model))
    model.minippo_int8_reuse = reuse  # its hook handles: `reuse.handles`
    for name, module in list(model.named_modules()):
        if type(module) is bnb.nn.Linear8bitLt:
            model.set_submodule(name, FastLinear8bitLt(module, reuse, int8_backward))


def _fast_embeddings_and_head(model: nn.Module, dtype: torch.dtype | None, head: bool) -> None:
    """The input embeddings -> `StoredEmbedding` (with ``dtype``), the LM head -> `FastLMHead` (its weight
    in ``dtype`` too; one Parameter where the two are tied)."""
    embedding = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    names = {id(m): name for name, m in model.named_modules()}
    plain_embedding = type(embedding) is nn.Embedding and embedding.max_norm is None
    plain_head = type(lm_head) is nn.Linear and lm_head.bias is None
    plain_head = plain_head and lm_head.weight.is_floating_point()
    hidden_dtype = embedding.weight.dtype
    stored = {}  # id(original weight) -> its stored Parameter
    if dtype is not None and plain_embedding and dtype != hidden_dtype:
        weight = _stored(embedding.weight, dtype, stored)
        model.set_submodule(names[id(embedding)], StoredEmbedding(embedding, weight, hidden_dtype))
    if head and plain_head:
        weight = lm_head.weight
        out_dtype = None
        if dtype is not None and dtype != weight.dtype:
            weight = _stored(weight, dtype, stored)
            out_dtype = hidden_dtype
        model.set_submodule(names[id(lm_head)], FastLMHead(lm_head, weight, out_dtype))


def _stored(weight: nn.Parameter, dtype: torch.dtype, stored: dict) -> nn.Parameter:
    """``weight`` as a frozen Parameter of ``dtype``, the same one for a weight seen twice (tied)."""
    if id(weight) not in stored:
        stored[id(weight)] = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    return stored[id(weight)]
