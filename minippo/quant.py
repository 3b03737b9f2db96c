"""k-bit loading (bitsandbytes LLM.int8() and 4-bit NF4 / FP4) and k-bit training preparation.

`Linear8bitLt` stores each weight row as int8 with an fp32 absmax scale (SCB) and quantises the
activations per row, except outlier columns above `threshold` (fp16).  Ref: arXiv:2208.07339, sec. 3.
`Linear4bit` stores blocks of 64 weights as 4-bit codes (NF4 or FP4) with one absmax scale (8-bit
with double quantisation), dequantised at matmul time.  Ref: QLoRA, arXiv:2305.14314.
`load_model` / `quantize_model` get there; `prepare_model_for_kbit_training` freezes everything and
pins the k-bit layers to one function on every device (`pin_kbit_layers`)."""

from __future__ import annotations

import logging
import os
import weakref

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

_DTYPES = {
    **dict.fromkeys(("float32", "fp32", "float"), torch.float32),
    **dict.fromkeys(("bfloat16", "bf16"), torch.bfloat16),
    **dict.fromkeys(("float16", "fp16", "half"), torch.float16),
}
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
_LOGGED_AUTO: set = set()
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
    if (device.type, dtype) not in _LOGGED_AUTO:
        _LOGGED_AUTO.add((device.type, dtype))
        cpu = f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_bf16_is_native()}"
        logger.info("compute_dtype auto -> %s on %s (%s)", dtype, device, cpu)
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
            "load it with minippo.load_model / quantize_model, or call minippo.quant.pin_kbit_layers first"
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
    return keep_4bit_layers_unpacked(model)


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
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load a Hugging Face causal LM in eval mode, optionally with its Linear layers in 8-bit or 4-bit.

    Float parameters get `dtype` ("auto": what `auto_compute_dtype` picks, so that the frozen float parts
    are stored in the dtype their matmuls run in, and an 8-bit model's embeddings in bf16 on a CPU with
    native bf16: `store_embeddings_in`); the k-bit options are `quantize_model`'s. transformers'
    `BitsAndBytesConfig` path is tried first; if it fails here or leaves no k-bit layer, a float load is
    quantised by `quantize_model`. Extra keyword arguments go to `from_pretrained`."""
    import transformers
    from packaging.version import Version

    if load_in_8bit and load_in_4bit:
        raise ValueError(
            "load_in_8bit and load_in_4bit are exclusive: choose one (or neither, for float)"
        )
    bits = 4 if load_in_4bit else 8 if load_in_8bit else 0
    device, auto = torch.device(device), dtype == "auto"
    dtype = auto_compute_dtype(device, eight_bit=bits == 8) if auto else dtype
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs, model = {dtype_kw: resolve_dtype(dtype), **from_pretrained_kwargs}, None
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
    if auto and bits == 8 and device.type == "cpu" and cpu_bf16_is_native():
        store_embeddings_in(model, torch.bfloat16)
    return keep_4bit_layers_unpacked(model).eval()


def store_embeddings_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the frozen input and output embeddings (one matrix where tied) in `dtype`, in place; the hidden
    states keep theirs (lookups and logits cast back, the LM head's input to `dtype`).  `load_model`
    ("auto") does so for an 8-bit model on a CPU with native bf16, where a bf16 LM head is ~4x faster."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = getattr(emb, "_minippo_hidden_dtype", emb.weight.dtype)
    for module in [m for m in (emb, head) if m is not None]:
        for p in module.parameters(recurse=False):
            p.data, p._minippo_stored = (
                p.data.to(dtype),
                True,
            )  # prepare_model_for_kbit_training keeps it
        if getattr(module, "_minippo_hidden_dtype", None) is None:
            module._minippo_hidden_dtype = hidden
            module.register_forward_hook(lambda m, args, out: out.to(m._minippo_hidden_dtype))
            if module is head:
                module.register_forward_pre_hook(
                    lambda m, args: (args[0].to(m.weight.dtype), *args[1:])
                )
    return model


# -- preparing for training --------------------------------------------------------------------
# the last input's (weak reference, (version, threshold), quantisation): q, k, v (or gate, up) read one x
_last_input: list = [None, None, None]


def _quantise_rows(a: torch.Tensor, threshold: float):
    """(CA, scale, cols, a[:, cols]) of `int8_linear` for its input rows a (N, in)."""
    cols = (_absmax(a, 0)[0] >= threshold).nonzero()[:, 0]  # (k,) outlier columns
    rest = a.index_fill(1, cols, 0) if len(cols) else a  # (N, in) without them
    scale = _absmax(rest, 1)  # (N, 1)
    outliers = a[:, cols]  # (N, k)
    if len(cols):  # an outlier column's entries under the threshold count in their rows' absmax too
        sub = outliers.abs()
        scale = torch.maximum(scale, sub.masked_fill_(sub >= threshold, 0).amax(1, keepdim=True))
    return (rest * (127 / scale.clamp_(min=1e-8))).round_().to(torch.int8), scale, cols, outliers


def int8_linear(x: torch.Tensor, layer: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """LLM.int8() as bitsandbytes' CPU path computes it, but in float32 (not float16) and scaled in place:
    outlier columns (|x| >= threshold anywhere) through a float matmul on their dequantised weight
    columns, the rest of each row of x as int8 (its absmax -> 127) through bitsandbytes' int8 GEMM."""
    (CB, SCB), threshold = int8_weight_and_scales(layer), layer.state.threshold or float("inf")
    last, key = (
        _last_input,
        None if x.is_inference() else (x._version, threshold),
    )  # no version: no reuse
    if key is None or last[1] != key or last[0]() is not x:
        last[:] = weakref.ref(x), key, _quantise_rows(x.reshape(-1, x.shape[-1]).float(), threshold)
    CA, scale, cols, outliers = last[2]
    out = torch.ops.bitsandbytes.int8_linear_matmul(CA, CB).float().mul_(scale / 127**2).mul_(SCB)
    if len(cols):
        out.addmm_(outliers, (CB[:, cols].float() * (SCB[:, None] / 127)).t())  # (N, out)
    out = out if layer.bias is None else out.add_(layer.bias)
    return out.view(*x.shape[:-1], -1).to(x.dtype)


def _absmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """max |t| along ``dim`` (kept): two reductions, no |t| copy."""
    return torch.maximum(t.amax(dim, keepdim=True), -t.amin(dim, keepdim=True))


class _Int8Linear(torch.autograd.Function):
    """`int8_linear`; the input gradient ``grad @ (SCB / 127 * CB)`` as one matmul in ``layer.grad_dtype``:
    None, the gradient's; bf16, CB exact and the scaled gradient rounded (as CUDA's fp16); int8, each row of
    the scaled gradient rounded to int8 (absmax -> 127) for the int8 GEMM, as SwitchBack, arXiv:2304.13013."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return int8_linear(x, layer)

    @staticmethod
    def backward(ctx, grad):
        (CB, SCB), dtype = int8_weight_and_scales(ctx.layer), ctx.layer.grad_dtype or grad.dtype
        g = grad.reshape(-1, grad.shape[-1]).float() * (SCB / 127)  # (N, out)
        if dtype != torch.int8:
            return (g.to(dtype) @ CB.to(dtype)).view(*grad.shape[:-1], -1).to(grad.dtype), None
        scale = _absmax(g, 1).clamp_(min=1e-30)  # (N, 1)
        g = torch._int_mm(g.mul_(127 / scale).round_().to(torch.int8), CB).float().mul_(scale / 127)
        return g.view(*grad.shape[:-1], -1).to(grad.dtype), None  # (..., in)


class _EvalPinnedLinear8bitLt(bnb.nn.Linear8bitLt):
    """A frozen Linear8bitLt whose `train()` keeps its pinned mode (`int8_path`); on a CPU the int8 path
    is `int8_linear`, its input gradient in `grad_dtype` (above); on CUDA bitsandbytes' own kernels."""

    int8_path, grad_dtype = True, None

    def train(self, mode: bool = True):
        return super().train(not self.int8_path)

    def forward(self, x):
        if self.int8_path and x.device.type == "cpu":
            return _Int8Linear.apply(x, self)
        return super().forward(x)


def int8_matmul_is_native(device: torch.device | str) -> bool:
    """CUDA, or a CPU with VNNI or AMX; elsewhere torch's int8 GEMM is emulated, slower than float32."""
    cpu = torch.cpu
    return (
        torch.device(device).type != "cpu"
        or cpu._is_vnni_supported()
        or cpu._is_amx_tile_supported()
    )


def keep_8bit_layers_in_eval(model: nn.Module, int8_path: bool | None = None) -> nn.Module:
    """Pin every `Linear8bitLt` of `model` to one mode for good, whatever `model.train()` says, in place:
    ``int8_path=True``: the int8 matmul with outliers (`int8_linear` on a CPU, bitsandbytes' on CUDA).
    ``False``: the CPU train-mode path, a float matmul on the dequantised weight.  ``None``: the int8
    path where `int8_matmul_is_native`, there with its input gradient through the GEMM (``grad_dtype``)."""
    for module in model.modules():
        if type(module) is bnb.nn.Linear8bitLt:
            module.__class__ = _EvalPinnedLinear8bitLt
        if isinstance(module, _EvalPinnedLinear8bitLt):
            native = int8_matmul_is_native(module.weight.device)
            module.int8_path = native if int8_path is None else int8_path
            module.grad_dtype = torch.int8 if module.int8_path and native else None
            module.train(False)
    return model


def keep_4bit_layers_unpacked(model: nn.Module) -> nn.Module:
    """Keep every `Linear4bit` on the portable path, in place: the AVX512-BF16 CPU repacking rounds the
    block scales to bf16 and drops input gradients, so rollouts and training would see two functions."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def pin_kbit_layers(model: nn.Module) -> nn.Module:
    """`keep_8bit_layers_in_eval` and `keep_4bit_layers_unpacked`: one function on every device."""
    return keep_4bit_layers_unpacked(keep_8bit_layers_in_eval(model))


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = False, use_reentrant: bool = True
) -> nn.Module:
    """Make a (k-bit) causal LM ready for adapter training, in place, as peft's (whose blog-era int8
    version cast only norms); returns it: 1. freeze all; 2. float params to fp32 (not packed 4-bit, nor
    `store_embeddings_in`'s); 3. fp32 logits (output-embedding hook); 4. input embeddings' output
    requires grad, for re-entrant checkpointing; 5. optional gradient checkpointing; 6. `pin_kbit_layers`."""
    for p in model.parameters():
        p.requires_grad_(False)
        kept = isinstance(p, bnb.nn.Params4bit) or getattr(p, "_minippo_stored", False)
        if p.dtype in (torch.float16, torch.bfloat16) and not kept:
            p.data = p.data.float()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_minippo_logits_fp32", False):
        head.register_forward_hook(lambda module, inputs, output: output.float())
        head._minippo_logits_fp32 = True
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return pin_kbit_layers(model)
