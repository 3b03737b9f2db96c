"""k-bit loading (bitsandbytes LLM.int8() and 4-bit NF4 / FP4) and k-bit training preparation.

`Linear8bitLt` stores each weight row as int8 with an fp32 absmax scale (SCB) and quantises the
activations per row, except outlier columns above `threshold` (fp16).  Ref: arXiv:2208.07339, sec. 3.
`Linear4bit` stores blocks of 64 weights as 4-bit codes (NF4 or FP4) with one absmax scale (8-bit
with double quantisation), dequantised at matmul time.  Ref: QLoRA, arXiv:2305.14314.
`load_model` / `quantize_model` get there; `prepare_model_for_kbit_training` freezes everything else.

The layers are bitsandbytes' own, forward and backward: in eval mode (PPO's rollouts and updates) an
8-bit layer computes LLM.int8() (activations rounded to fp16, then to int8 per row, outlier columns in
float) and passes its input gradient ``grad @ (SCB / 127 * CB)``, so LoRA layers below it train. In train
mode (SFT) bitsandbytes' CPU path computes ``x @ (SCB / 127 * CB).T`` instead: the same int8 weight,
without quantising the activations, so SFT trains against a function within the activations' int8
rounding of the eval-mode one (on CUDA both modes run LLM.int8()). `load_model(..., fast=True)` swaps
in the faster modules of `minippo.fast` (docs/fast.md); nothing here needs them."""

from __future__ import annotations

import logging
import os

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import compat

logger = logging.getLogger(__name__)

_DTYPES = {
    **dict.fromkeys(("float32", "fp32", "float"), torch.float32),
    **dict.fromkeys(("bfloat16", "bf16"), torch.bfloat16),
    **dict.fromkeys(("float16", "fp16", "half"), torch.float16),
}
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
CPU_BF16_ENV = "MINIPPO_CPU_BF16"  # 0 / 1: override the CPU's native-bf16 probe


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


def cpu_bf16_is_native() -> bool:
    """AVX512_BF16 or AMX (torch's capability report; elsewhere bf16 matmuls run slower than fp32), unless
    `$MINIPPO_CPU_BF16` says: 0 takes the float32 paths of a CPU without them anyway, 1 the bf16 ones."""
    if (setting := os.environ.get(CPU_BF16_ENV, "")) not in ("", "0", "1"):
        raise ValueError(
            f"{CPU_BF16_ENV}={setting!r}: set it to 0 (float32 paths), 1 (bf16 paths) or unset it"
        )
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return setting == "1" if setting else native


def auto_compute_dtype(
    device, model: nn.Module | None = None, eight_bit: bool = False
) -> torch.dtype:
    """bfloat16 where it is native (CUDA that supports it; a CPU with AVX512_BF16 or AMX), else float32.
    A model with 8-bit layers on a CPU gets float32 (bitsandbytes' CPU int8 path under autocast is fp16)."""
    device = torch.device(device)
    eight_bit = eight_bit or (model is not None and is_8bit(model))
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    cpu_bf16 = device.type == "cpu" and cpu_bf16_is_native() and not eight_bit
    dtype = torch.bfloat16 if cuda_bf16 or cpu_bf16 else torch.float32
    cpu = f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_bf16_is_native()}"
    logger.debug("compute_dtype auto -> %s on %s (%s)", dtype, device, cpu)
    return dtype


def resolve_compute_dtype(
    name: torch.dtype | str, device: torch.device | str, model=None
) -> torch.dtype:
    return auto_compute_dtype(device, model) if name == "auto" else resolve_dtype(name)


# -- inspecting k-bit layers -------------------------------------------------------------------
def is_8bit(module: nn.Module) -> bool:
    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules())


def is_4bit(module: nn.Module) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())


def int8_weight_and_scales(layer: bnb.nn.Linear8bitLt):
    """(CB, SCB): int8 weight (out, in) and fp32 row scales (out,).  bitsandbytes keeps them on
    `layer.weight` after quantisation and moves them to `layer.state` at the first forward."""
    CB, SCB = getattr(layer.weight, "CB", None), getattr(layer.weight, "SCB", None)
    if CB is None or SCB is None:
        CB, SCB = layer.state.CB, layer.state.SCB
    if CB is None and layer.weight.dtype == torch.int8:
        CB = layer.weight.data
    return CB, SCB


def dequantize_8bit(layer: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """The fp32 weight (out, in) of a `Linear8bitLt`: CB * SCB / 127 per row (float if not quantised yet)."""
    if layer.weight.dtype != torch.int8:
        return layer.weight.detach().float()
    CB, SCB = int8_weight_and_scales(layer)
    if SCB is None:
        raise ValueError("this Linear8bitLt holds int8 data but no row scales (SCB)")
    return bnb.functional.int8_vectorwise_dequant(CB, SCB).float()  # (out, in)


def dequantize_4bit(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The fp32 weight (out, in) of a `Linear4bit`: code[q] * block absmax (float if not quantised yet)."""
    weight, state = layer.weight, layer.weight.quant_state
    if not getattr(weight, "bnb_quantized", False) or state is None:
        return weight.detach().float()
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "this Linear4bit was repacked for bitsandbytes' AVX512-BF16 CPU kernel (scales rounded to bf16); "
            "load it with minippo.load_model / quantize_model, or call "
            "minippo.compat.keep_4bit_layers_unpacked(model) before its first forward"
        )
    return bnb.functional.dequantize_4bit(weight.data, state).float()  # (out, in)


# -- quantising --------------------------------------------------------------------------------
def check_4bit_support(device: torch.device | str = "cpu") -> None:
    """ValueError naming the fix unless this bitsandbytes runs 4-bit on `device` (probed on one block)."""
    device = torch.device(device)
    try:
        probe = torch.linspace(-1, 1, 64, device=device)
        bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(probe, quant_type="nf4"))
    except Exception as err:  # noqa: BLE001 - any failure means: no 4-bit here
        raise ValueError(
            f"bitsandbytes {bnb.__version__} cannot run 4-bit (NF4/FP4) layers on device {device.type!r} "
            f"({type(err).__name__}: {err}); upgrade bitsandbytes (0.48 and later run 4-bit on a CPU; "
            "CUDA GPUs for longer), use another device, or load the base in 8-bit (load_in_8bit=True, "
            "--quant 8bit)"
        ) from None


def _check_quant_args(bits: int, quant_type: str, device: torch.device, compute_dtype):
    """ValueError for bad arguments or no 4-bit support on `device`; returns the compute dtype."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 (LLM.int8) or 4 (NF4/FP4, QLoRA), got {bits!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if bits == 4:
        check_4bit_support(device)
        return resolve_compute_dtype(compute_dtype or "auto", device)
    return compute_dtype


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
    """Replace every `nn.Linear` and GPT-2 `Conv1D` of `model` by a frozen bitsandbytes layer, in place:
    `Linear8bitLt` (bits=8) or `Linear4bit` (bits=4, with `quant_type`, `double_quant`, `compute_dtype`).
    A Conv1D weight (in, out) is transposed; the layer keeps `source_cls = Conv1D` for `merge_lora`.
    Skipped: paths ending with a name in `skip_modules`, weights tied to an embedding, LoRA matrices
    (quantise *before* adding LoRA).  `device`: the weights' by default.  Returns `model`."""
    first = next(model.parameters(), None)
    device = torch.device(device or (first.device if first is not None else "cpu"))
    compute_dtype = _check_quant_args(bits, quant_type, device, compute_dtype)
    tied = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }  # e.g. a tied lm_head
    targets = []
    for name, m in model.named_modules():
        linear = type(m) is nn.Linear or isinstance(m, Conv1D)
        skip = any(name == k or name.endswith("." + k) for k in skip_modules)
        lora = {"lora_A", "lora_B"} & set(name.split("."))
        if linear and not skip and not lora and id(m.weight) not in tied:
            targets.append((name, m))
    options = (bits, threshold, quant_type, double_quant, compute_dtype)
    for name, module in targets:
        model.set_submodule(name, _kbit_layer(module, device, *options))
    if not targets:
        logger.warning("quantize_model: no nn.Linear / Conv1D module to quantise")
    compat.keep_4bit_layers_unpacked(model)
    return model


def _kbit_layer(
    module, device, bits, threshold, quant_type, double_quant, compute_dtype
) -> nn.Module:
    """A frozen Linear8bitLt / Linear4bit computing (up to rounding) the map of an nn.Linear or Conv1D."""
    weight = module.weight.detach().to("cpu")
    weight = (
        weight.t() if isinstance(module, Conv1D) else weight
    )  # a Conv1D's (in, out) -> (out, in)
    dims = (weight.shape[1], weight.shape[0], module.bias is not None)
    # Both weight classes quantise float CPU data on .to(device) (4-bit: blocks of 64 of the flat weight).
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(
            *dims, has_fp16_weights=False, threshold=threshold, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(
            weight.contiguous(), requires_grad=False, has_fp16_weights=False
        )
    else:
        kw = {"compress_statistics": double_quant, "quant_type": quant_type}
        layer = bnb.nn.Linear4bit(*dims, compute_dtype=compute_dtype, device="meta", **kw)
        layer.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, module=layer, **kw
        )
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to("cpu").clone(), requires_grad=False)
    layer.source_cls = type(module)
    return layer.to(device)


# -- loading -----------------------------------------------------------------------------------
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
    fast: bool = False,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a Hugging Face causal LM in eval mode, optionally with its Linear layers in 8-bit or 4-bit.

    Float parameters get `dtype` ("auto": what `auto_compute_dtype` picks, so that the frozen float parts
    are stored in the dtype their matmuls run in); the k-bit options are `quantize_model`'s. transformers'
    `BitsAndBytesConfig` path is tried first; if it fails here or leaves no k-bit layer, a float load is
    quantised by `quantize_model`. ``fast=True`` then calls `minippo.fast.enable(model)`, which swaps in
    the faster modules (each tested against the plain one; docs/fast.md) before the first forward; with
    ``dtype="auto"`` it also picks the embeddings' storage dtype (bf16 where `minippo.fast` finds it native).
    Extra keyword arguments go to `from_pretrained`."""
    import transformers

    if load_in_8bit and load_in_4bit:
        raise ValueError(
            "load_in_8bit and load_in_4bit are exclusive: choose one (or neither, for float)"
        )
    bits = 4 if load_in_4bit else 8 if load_in_8bit else 0
    device = torch.device(device)
    auto = dtype == "auto"
    if auto:
        dtype = auto_compute_dtype(device, eight_bit=bits == 8)
    kwargs = {compat.from_pretrained_dtype_kwarg(): resolve_dtype(dtype), **from_pretrained_kwargs}
    model = None
    if bits == 4:
        compute_dtype = _check_quant_args(bits, quant_type, device, compute_dtype)
    if bits:
        try:
            four = dict(bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)
            four |= dict(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant)
            eight = dict(load_in_8bit=True, llm_int8_threshold=threshold)
            bnb_config = transformers.BitsAndBytesConfig(**(four if bits == 4 else eight))
            target = str(device)  # device_map wants "cpu" or a CUDA index
            if device.type == "cuda":
                target = device.index if device.index is not None else torch.cuda.current_device()
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name_or_path, quantization_config=bnb_config, device_map={"": target}, **kwargs
            )
            if not (is_4bit if bits == 4 else is_8bit)(model):
                logger.warning(
                    "transformers' %d-bit load left no such layer; quantising ourselves", bits
                )
                model = None
        except Exception as err:  # noqa: BLE001 - any failure here has a working fallback
            logger.warning("transformers' %d-bit load failed (%s); quantising ourselves", bits, err)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        if bits:
            options = {
                "quant_type": quant_type,
                "double_quant": double_quant,
                "compute_dtype": compute_dtype,
            }
            quantize_model(model, threshold=threshold, device=device, bits=bits, **options)
        model = model.to(device)
    compat.keep_4bit_layers_unpacked(model)  # before the first forward: one function in every mode
    model.eval()
    if fast:
        from . import fast as fast_path  # only here: the plain path never imports it

        fast_path.enable(model, embeddings_dtype="auto" if auto else None)
    return model


# -- preparing for training --------------------------------------------------------------------
def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = False, use_reentrant: bool = True
) -> nn.Module:
    """Make a (k-bit) causal LM ready for adapter training, in place, as peft's (whose blog-era int8
    version cast only norms); returns it. The k-bit layers keep the function they compute.
    1. freeze all;
    2. fp16 / bf16 float params to fp32 (not packed 4-bit ones, nor those a module stores in a dtype of
       its own, ``module.minippo_stored_dtype``: `minippo.fast`'s bf16 embeddings);
    3. fp32 logits (a forward hook on the output embeddings, its handle kept as
       ``model.minippo_fp32_logits``);
    4. the input embeddings' output requires grad, for re-entrant checkpointing;
    5. optional gradient checkpointing;
    6. 4-bit layers kept in the layout that has input gradients (`compat.keep_4bit_layers_unpacked`;
       a ValueError where bitsandbytes repacked one already)."""
    if repacked := compat.keep_4bit_layers_unpacked(model):
        raise ValueError(
            f"{len(repacked)} Linear4bit layer(s) (e.g. {repacked[0]}) were repacked by bitsandbytes' "
            "AVX512-BF16 CPU inference kernel at a forward without gradients; that layout passes no "
            "gradient to its input. Load the model with minippo.load_model, or call "
            "minippo.compat.keep_4bit_layers_unpacked(model) right after loading, before its first forward"
        )
    kept = set()  # parameters stored in a dtype of their own (`minippo.fast`'s bf16 embeddings)
    for module in model.modules():
        if getattr(module, "minippo_stored_dtype", None) is not None:
            kept |= {id(p) for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        low = p.dtype in (torch.float16, torch.bfloat16)
        if low and not isinstance(p, bnb.nn.Params4bit) and id(p) not in kept:
            p.data = p.data.float()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(model, "minippo_fp32_logits", None) is None:
        model.minippo_fp32_logits = head.register_forward_hook(_float_output)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if use_gradient_checkpointing:
        compat.enable_gradient_checkpointing(model, use_reentrant)
    return model


def _float_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()
