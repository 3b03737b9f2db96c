"""k-bit loading (bitsandbytes LLM.int8() and 4-bit NF4 / FP4) and k-bit training preparation.

A frozen base model whose Linear layers are bitsandbytes `Linear8bitLt` holds about one byte per
weight: each weight row is stored as int8 with one fp32 absmax scale per row (SCB), and at matmul
time the activations are quantised per row too, except the columns holding outliers above
`threshold`, which run in fp16.  Ref: Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339, sec. 3.

A 4-bit base (QLoRA) uses bitsandbytes `Linear4bit`: each block of 64 weights is stored as 4-bit
codes (NF4: the quantiles of a normal distribution; FP4: a 4-bit float) with one absmax scale per
block; with double quantisation those scales are themselves stored in 8-bit, in blocks of 256 with
one fp32 scale each: 0.5 + 1/64 + 4/(64*256) = 0.516 bytes per weight instead of 0.5 + 4/64 = 0.5625.
At matmul time the weight is dequantised to the compute dtype, block by block.
Ref: Dettmers et al. 2023, QLoRA, arXiv:2305.14314, sec. 3 (NF4, double quantisation).

Two ways to get there:

- `load_model(name, load_in_8bit=True)` or `load_model(name, load_in_4bit=True)`: transformers'
  `BitsAndBytesConfig` path where it works, else a float load followed by `quantize_model`;
- `quantize_model(model, bits=8)` / `quantize_model(model, bits=4)`: replace the `nn.Linear` (and
  GPT-2 `Conv1D`) modules of a model already in memory, in place.

Then `prepare_model_for_kbit_training` freezes everything and pins the k-bit layers
(`pin_kbit_layers`) to one function on every device: the 8-bit layers in eval mode (bitsandbytes'
*train* mode on CPU dequantises the weight and runs a float matmul, whereas its eval mode runs the
real int8 path with the outlier threshold that CUDA runs), and the 4-bit layers unpacked
(bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first no-grad eval
forward, rounding the block scales to bf16 and leaving a path without gradients to the input).
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


QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
# Named base precisions (the application's --quant) and the `load_model` arguments each stands for.
QUANT_MODES = {"none": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}


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


# ---------------------------------------------------------------------------------------------
# Inspecting 4-bit layers


def is_4bit(module: nn.Module) -> bool:
    """True when `module` is, or contains, a bitsandbytes `Linear4bit` layer (NF4 or FP4)."""
    return any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())


def _quant_state_tensors(layer: bnb.nn.Linear4bit) -> list[torch.Tensor]:
    """The tensors a 4-bit weight keeps outside its parameter: block scales (8-bit with double
    quantisation), the 16-value code book, and the second level's scales, offset and code book."""
    state = layer.weight.quant_state
    if state is None:
        return []
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def dequantize_4bit(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The float weight (out, in), fp32, of a `Linear4bit`, by bitsandbytes' own dequantisation
    (`bnb.functional.dequantize_4bit`: code[q] * block absmax, block by block).

    A layer not quantised yet (float weight, before `.to(device)`) returns its weight in fp32.
    """
    weight = layer.weight
    state = weight.quant_state
    if not getattr(weight, "bnb_quantized", False) or state is None:
        return weight.detach().float()
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "this Linear4bit was repacked by bitsandbytes for its AVX512-BF16 CPU inference kernel "
            "(block scales rounded to bf16); load the model with minippo.load_model / quantize_model, "
            "or call minippo.quant.pin_kbit_layers(model) before its first forward"
        )
    return bnb.functional.dequantize_4bit(weight.data, state).float()  # (out, in)


def model_footprint_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once (tied weights
    share storage), plus what bitsandbytes keeps outside the parameters: the fp32 row scales of
    `Linear8bitLt` and the quantisation state (block scales, code books) of `Linear4bit`."""
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
        if isinstance(m, bnb.nn.Linear4bit):
            for t in _quant_state_tensors(m):
                add(t)
    return total


def check_4bit_support(device: torch.device | str = "cpu") -> None:
    """Raise a ValueError naming the fix when this bitsandbytes cannot run 4-bit layers on `device`.

    Probes by quantising and dequantising one block, which is what `Linear4bit` needs there.
    """
    device = torch.device(device)
    fix = (
        "upgrade bitsandbytes (0.48 and later run 4-bit on a CPU; CUDA GPUs for longer), use "
        "another device, or load the base in 8-bit (load_in_8bit=True, --quant 8bit)"
    )
    if not hasattr(bnb.nn, "Linear4bit"):
        raise ValueError(f"bitsandbytes {bnb.__version__} has no Linear4bit: {fix}")
    try:
        probe = torch.linspace(-1, 1, 64, device=device)
        packed, state = bnb.functional.quantize_4bit(probe, quant_type="nf4")
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:  # noqa: BLE001 - any failure means: no 4-bit here
        raise ValueError(
            f"bitsandbytes {bnb.__version__} cannot run 4-bit (NF4/FP4) layers on device {device.type!r} "
            f"({type(err).__name__}: {err}); {fix}"
        ) from None


def quant_load_kwargs(quant: str) -> dict:
    """ "none" / "8bit" / "4bit" -> the `load_model` keyword arguments it stands for."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {sorted(QUANT_MODES)}, got {quant!r}")
    return dict(QUANT_MODES[quant])


def _check_quant_args(bits: int, quant_type: str) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 (LLM.int8) or 4 (NF4/FP4, QLoRA), got {bits!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


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
    *,
    bits: int = 8,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = "auto",
) -> nn.Module:
    """Replace every `nn.Linear` and transformers `Conv1D` of `model` by a frozen int8
    `bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=threshold)` (bits=8), or by a frozen
    `bnb.nn.Linear4bit(quant_type=quant_type, compress_statistics=double_quant)` (bits=4), in place.

    4-bit layers dequantise to `compute_dtype` at matmul time ("auto": `auto_compute_dtype`) and
    return the input's dtype; `threshold` applies to 8-bit only.

    GPT-2's `Conv1D` stores its weight as (in, out); it is transposed to the (out, in) layout of
    `Linear8bitLt` and the new layer remembers `source_cls = Conv1D` (as transformers does) so that
    `merge_lora` can write a `Conv1D` back.  Skipped: modules whose path ends with a name in
    `skip_modules`, weights tied to an embedding, and LoRA adapter matrices (quantise *before*
    adding LoRA).  The weights are quantised by the new layer's `.to(device)`; `device` defaults to
    the device the model's weights are on.  Returns `model`.

    Ref: Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339; Dettmers et al. 2023, QLoRA,
    arXiv:2305.14314.
    """
    _check_quant_args(bits, quant_type)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if bits == 4:
        check_4bit_support(device)
        compute_dtype = resolve_compute_dtype(compute_dtype or "auto", device)
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
        if bits == 4:
            layer = _to_linear4bit(module, device, quant_type, double_quant, compute_dtype)
        else:
            layer = _to_linear8bit(module, threshold, device)
        model.set_submodule(name, layer)
    if not targets:
        logger.warning("quantize_model: no nn.Linear / Conv1D module to quantise")
    return keep_4bit_layers_unpacked(model)


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


def _to_linear4bit(
    module: nn.Module, device: torch.device, quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> bnb.nn.Linear4bit:
    """A quantised Linear4bit computing (up to NF4/FP4 rounding) the map of an nn.Linear or Conv1D."""
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.t()  # (in, out) -> (out, in)
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    # Params4bit quantises on its first .to(device) (blocks of 64 along the flattened (out, in) weight).
    layer.weight = bnb.nn.Params4bit(
        weight.to("cpu").contiguous(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=layer,
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
    load_in_4bit: bool = False,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    threshold: float = 6.0,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = "auto",
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a Hugging Face causal LM, optionally with its Linear layers in 8-bit or 4-bit, in eval mode.

    Float parameters (and the non-quantised ones of a k-bit model: embeddings, norms, lm_head)
    get `dtype` (torch dtype or "float32" / "bfloat16" / "float16"; fp16 is ~10x slower than bf16
    on CPU).  `load_in_8bit`: LLM.int8() layers with outlier `threshold`.  `load_in_4bit`: QLoRA's
    `quant_type` ("nf4" or "fp4") with `double_quant` scales, dequantised to `compute_dtype` at
    matmul time ("auto": fp32 on a CPU, bf16 on a CUDA GPU that has it).  Either way transformers'
    `BitsAndBytesConfig` path is tried first; if it fails on this machine (no accelerate,
    unsupported device, ...) or leaves no k-bit layer, the model is loaded in float and
    `quantize_model` converts it.  Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit are exclusive: choose one (or neither, for float)")
    bits = 4 if load_in_4bit else 8 if load_in_8bit else 0
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    kwargs = {_from_pretrained_dtype_kw(): dtype, **from_pretrained_kwargs}
    if bits == 4:
        _check_quant_args(bits, quant_type)
        check_4bit_support(device)
        compute_dtype = resolve_compute_dtype(compute_dtype or "auto", device)
    if bits:
        try:
            from transformers import BitsAndBytesConfig

            if bits == 4:
                bnb_config = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type=quant_type,
                    bnb_4bit_use_double_quant=double_quant,
                    bnb_4bit_compute_dtype=compute_dtype,
                )
            else:
                bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
            target = str(device)  # device_map wants "cpu" or a CUDA index
            if device.type == "cuda":
                target = device.index if device.index is not None else torch.cuda.current_device()
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, quantization_config=bnb_config, device_map={"": target}, **kwargs
            )
            if (is_4bit if bits == 4 else is_8bit)(model):
                return keep_4bit_layers_unpacked(model).eval()
            logger.warning("transformers' %d-bit load left no %d-bit layer; quantising ourselves", bits, bits)
        except Exception as err:  # noqa: BLE001 - any failure here has a working fallback
            logger.warning("transformers' %d-bit load failed (%s); quantising ourselves", bits, err)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if bits:
        quantize_model(
            model,
            threshold=threshold,
            device=device,
            bits=bits,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
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


def keep_4bit_layers_unpacked(model: nn.Module) -> nn.Module:
    """Keep every `Linear4bit` of `model` on bitsandbytes' portable 4-bit path, in place.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel at the first
    eval forward without gradients: it rounds the block scales to bf16 (a different function from
    the one training then sees) and the repacked path passes no gradient to the input.  Rollouts,
    the reference policy and training steps must see one function, so minippo turns that off.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def pin_kbit_layers(model: nn.Module) -> nn.Module:
    """Pin the frozen k-bit layers of `model` to the function every device runs: 8-bit in eval mode
    (`keep_8bit_layers_in_eval`), 4-bit unpacked (`keep_4bit_layers_unpacked`).  In place."""
    return keep_4bit_layers_unpacked(keep_8bit_layers_in_eval(model))


def _upcast_logits_hook(module, inputs, output):
    return output.float()


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = False, use_reentrant: bool = True
) -> nn.Module:
    """Make a (possibly 8-bit or 4-bit) causal LM ready for adapter training, in place; returns it.

    1. freeze every parameter;
    2. cast the floating parameters (norms, embeddings, biases, lm_head; not the packed k-bit
       weights) to fp32;
    3. upcast the logits to fp32 (a forward hook on the output embeddings);
    4. make the input embeddings' output require grad, so re-entrant gradient checkpointing
       (which needs an input that requires grad) still reaches the adapters;
    5. optionally enable gradient checkpointing (`use_reentrant` True or False);
    6. pin the k-bit layers (`pin_kbit_layers`): 8-bit in eval mode, 4-bit unpacked.

    Note: as peft's `prepare_model_for_kbit_training`; the blog-era `prepare_model_for_int8_training`
    cast only the layer norms.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and not isinstance(p, bnb.nn.Params4bit):
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
    pin_kbit_layers(model)
    return model
