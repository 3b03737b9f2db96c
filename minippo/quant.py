"""8-bit loading and k-bit training preparation (bitsandbytes LLM.int8()).

A frozen base model whose Linear layers are bitsandbytes `Linear8bitLt` holds about one byte per
weight: each weight row is stored as int8 with one fp32 absmax scale per row (SCB), and at matmul
time the activations are quantised per row too, except the columns holding outliers above
`threshold`, which run in fp16.  Ref: Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339, sec. 3.

Two ways to get there:

- `load_model(name, load_in_8bit=True)`: transformers' `BitsAndBytesConfig` path where it works,
  else a float load followed by `quantize_model`;
- `quantize_model(model)`: replace the `nn.Linear` (and GPT-2 `Conv1D`) modules of a model already
  in memory, in place.

Then `prepare_model_for_kbit_training` freezes everything and pins the 8-bit layers in eval mode:
bitsandbytes' *train* mode on CPU dequantises the weight and runs a float matmul, whereas its eval
mode runs the real int8 path (with the outlier threshold) that CUDA runs, so pinning eval makes
rollouts and training steps see the same function on every device.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / "float32" / "bf16" / ... -> a torch floating dtype (ValueError otherwise)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def auto_compute_dtype(device: torch.device | str, model: nn.Module | None = None) -> torch.dtype:
    """The faster matmul dtype on ``device``, from torch's own capability report.

    CUDA: bfloat16 where the GPU supports it, else float32. CPU: bfloat16 only where the CPU runs it
    natively (AVX512_BF16 or AMX tiles); without them bf16 matmuls are emulated and several times
    slower than float32. A model with 8-bit layers on a CPU always gets float32: under autocast
    bitsandbytes' CPU int8 path does its element-wise work in float16, which CPUs run slowly.
    """
    device = torch.device(device)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    elif device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        int8 = model is not None and is_8bit(model)
        dtype = torch.bfloat16 if native and not int8 else torch.float32
    else:
        dtype = torch.float32
    if (device.type, dtype) not in _LOGGED_AUTO:
        _LOGGED_AUTO.add((device.type, dtype))
        logger.info(
            "compute_dtype auto -> %s on %s (%s)", dtype, device, torch.backends.cpu.get_cpu_capability()
        )
    return dtype


_LOGGED_AUTO: set = set()


def resolve_compute_dtype(
    name: torch.dtype | str, device: torch.device | str, model: nn.Module | None = None
) -> torch.dtype:
    """``"auto"`` -> `auto_compute_dtype`; any other name -> `resolve_dtype`."""
    return auto_compute_dtype(device, model) if name == "auto" else resolve_dtype(name)


# ---------------------------------------------------------------------------------------------
# Inspecting 8-bit layers


def is_8bit(module: nn.Module) -> bool:
    """True when `module` is, or contains, a bitsandbytes `Linear8bitLt` layer."""
    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules())


def _int8_weight_and_scales(layer: bnb.nn.Linear8bitLt):
    """(CB, SCB) of a quantised layer: int8 weight (out, in) and fp32 row scales (out,).

    bitsandbytes keeps them on `layer.weight.CB/SCB` after quantisation and moves them to
    `layer.state.CB/SCB` at the first forward (setting `weight.SCB` to None); read either.
    """
    weight = layer.weight
    CB = getattr(weight, "CB", None)
    SCB = getattr(weight, "SCB", None)
    if CB is None or SCB is None:
        CB, SCB = layer.state.CB, layer.state.SCB
    if CB is None and weight.dtype == torch.int8:
        CB = weight.data
    return CB, SCB


def dequantize_8bit(layer: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """The float weight (out, in), fp32, of a `Linear8bitLt`: CB * SCB / 127 row by row.

    A layer not quantised yet (float weight, before `.to(device)`) returns its weight in fp32.
    """
    CB, SCB = _int8_weight_and_scales(layer)
    if CB is None or layer.weight.dtype != torch.int8:
        if layer.weight.dtype == torch.int8:
            raise ValueError("this Linear8bitLt holds int8 data but no row scales (SCB)")
        return layer.weight.detach().float()
    if SCB is None:
        raise ValueError("this Linear8bitLt holds int8 data but no row scales (SCB)")
    return bnb.functional.int8_vectorwise_dequant(CB, SCB).float()  # (out, in)


def model_footprint_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once (tied weights
    share storage), plus the fp32 row scales that `Linear8bitLt` keeps outside its parameters."""
    seen: set[tuple] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.device.type == "meta":
            return
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for t in model.parameters():
        add(t)
    for t in model.buffers():
        add(t)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            add(_int8_weight_and_scales(m)[1])
    return total


# ---------------------------------------------------------------------------------------------
# Quantising


def _name_matches(name: str, keys) -> bool:
    """`name` equals one of `keys` or ends with "." + key (module-path suffix match)."""
    return any(name == k or name.endswith("." + k) for k in keys)


def _tied_to_embedding(model: nn.Module) -> set[int]:
    """ids of parameters shared with an nn.Embedding (e.g. a tied lm_head): never quantised."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize_model(
    model: nn.Module,
    skip_modules=("lm_head",),
    threshold: float = 6.0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` and transformers `Conv1D` of `model` by a frozen int8
    `bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=threshold)`, in place.

    GPT-2's `Conv1D` stores its weight as (in, out); it is transposed to the (out, in) layout of
    `Linear8bitLt` and the new layer remembers `source_cls = Conv1D` (as transformers does) so that
    `merge_lora` can write a `Conv1D` back.  Skipped: modules whose path ends with a name in
    `skip_modules`, weights tied to an embedding, and LoRA adapter matrices (quantise *before*
    adding LoRA).  The weights are quantised by `Linear8bitLt.to(device)`; `device` defaults to the
    device the model's weights are on.  Returns `model`.

    Ref: Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    tied = _tied_to_embedding(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear and not isinstance(module, Conv1D):
            continue
        parts = name.split(".")
        if _name_matches(name, skip_modules) or "lora_A" in parts or "lora_B" in parts:
            continue
        if id(module.weight) in tied:
            continue
        targets.append((name, module))
    for name, module in targets:
        model.set_submodule(name, _to_linear8bit(module, threshold, device))
    if not targets:
        logger.warning("quantize_model: no nn.Linear / Conv1D module to quantise")
    return model


def _to_linear8bit(module: nn.Module, threshold: float, device: torch.device) -> bnb.nn.Linear8bitLt:
    """A quantised Linear8bitLt computing the same map as an nn.Linear or Conv1D."""
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.t()  # (in, out) -> (out, in)
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=module.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    # Int8Params quantises on .to(device) only when its float data sits on the CPU.
    layer.weight = bnb.nn.Int8Params(
        weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False
    )
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to("cpu").clone(), requires_grad=False)
    layer.source_cls = type(module)
    return layer.to(device)


# ---------------------------------------------------------------------------------------------
# Loading


def _from_pretrained_dtype_kw() -> str:
    """transformers >= 4.56 calls the argument `dtype`; older versions `torch_dtype`."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(
    name_or_path: str,
    *,
    load_in_8bit: bool = False,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    threshold: float = 6.0,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a Hugging Face causal LM, optionally with its Linear layers in 8-bit, in eval mode.

    Float parameters (and the non-quantised ones of an 8-bit model: embeddings, norms, lm_head)
    get `dtype` (torch dtype or "float32" / "bfloat16" / "float16"; fp16 is ~10x slower than bf16
    on CPU).  With `load_in_8bit`, transformers' `BitsAndBytesConfig` path is tried first; if it
    fails on this machine (no accelerate, unsupported device, ...) or leaves no int8 layer, the model
    is loaded in float and `quantize_model` converts it.  Extra keyword arguments go to
    `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    kwargs = {_from_pretrained_dtype_kw(): dtype, **from_pretrained_kwargs}
    if load_in_8bit:
        try:
            from transformers import BitsAndBytesConfig

            bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
            target = str(device)  # device_map wants "cpu" or a CUDA index
            if device.type == "cuda":
                target = device.index if device.index is not None else torch.cuda.current_device()
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, quantization_config=bnb_config, device_map={"": target}, **kwargs
            )
            if is_8bit(model):
                return model.eval()
            logger.warning("transformers' 8-bit load left no int8 layer; quantising ourselves")
        except Exception as err:  # noqa: BLE001 - any failure here has a working fallback
            logger.warning("transformers' 8-bit load failed (%s); quantising ourselves", err)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if load_in_8bit:
        quantize_model(model, threshold=threshold, device=device)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Preparing for training


class _EvalPinnedLinear8bitLt(bnb.nn.Linear8bitLt):
    """A frozen Linear8bitLt that stays in eval mode: `train()` is a no-op for it.

    Swapped in as the instance's class by `keep_8bit_layers_in_eval`; still an `isinstance` of
    `Linear8bitLt`, so bitsandbytes, transformers and peft treat it as one.
    """

    def train(self, mode: bool = True):
        return super().train(False)


def keep_8bit_layers_in_eval(model: nn.Module) -> nn.Module:
    """Pin every `Linear8bitLt` of `model` in eval mode for good (`model.train()` leaves them in
    eval), so CPU runs the same int8 matmul with outlier threshold as CUDA does.  In place."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            if type(module) is bnb.nn.Linear8bitLt:
                module.__class__ = _EvalPinnedLinear8bitLt
            module.train(False)
    return model


def _upcast_logits_hook(module, inputs, output):
    return output.float()


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = False, use_reentrant: bool = True
) -> nn.Module:
    """Make a (possibly 8-bit) causal LM ready for adapter training, in place; returns it.

    1. freeze every parameter;
    2. cast non-int8 floating parameters (norms, embeddings, biases, lm_head) to fp32;
    3. upcast the logits to fp32 (a forward hook on the output embeddings);
    4. make the input embeddings' output require grad, so re-entrant gradient checkpointing
       (which needs an input that requires grad) still reaches the adapters;
    5. optionally enable gradient checkpointing (`use_reentrant` True or False);
    6. pin the 8-bit layers in eval mode (`keep_8bit_layers_in_eval`).

    Note: as peft's `prepare_model_for_kbit_training`; the blog-era `prepare_model_for_int8_training`
    cast only the layer norms.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_minippo_logits_fp32", False):
        head.register_forward_hook(_upcast_logits_hook)
        head._minippo_logits_fp32 = True
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    keep_8bit_layers_in_eval(model)
    return model
