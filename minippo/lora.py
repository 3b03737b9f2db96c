"""LoRA adapters on Linear, GPT-2 Conv1D and bitsandbytes int8 layers; adapter files in peft's layout.

A LoRA layer adds a trainable low-rank update to a frozen layer W (out, in):

    y = base(x) + dropout(x) @ A.T @ B.T * scaling,   A: (r, in), B: (out, r)

with scaling = alpha / r (alpha / sqrt(r) with rsLoRA), A Kaiming-uniform and B zero at init, so
an adapted model starts out equal to its base.  The layer only *calls* the base layer, never reads
its weight, so the base may be int8 (`Linear8bitLt`).
Ref: Hu et al. 2021, LoRA, arXiv:2106.09685, eq. 3; Kalajdzievski 2023, rsLoRA, arXiv:2312.03732.

The API (minLoRA-style verbs): `add_lora`, `disable_adapters`, `lora_state_dict`, `merge_lora`,
`save_adapter`, `load_adapter`.  Saved adapters use peft's files (`adapter_config.json`,
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight`), so
`peft.PeftModel.from_pretrained` loads ours and `load_adapter` loads peft's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

import bitsandbytes as bnb
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fileio import atomic_write
from .quant import dequantize_8bit, keep_8bit_layers_in_eval, resolve_dtype

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Default targets per `config.model_type` (the attention projections, as peft's defaults).
DEFAULT_TARGETS = {
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
}
INITS = ("default", "gaussian")
_PLAIN_NAMES = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")


@dataclass
class LoRAConfig:
    """Where and how to add LoRA adapters (`add_lora`)."""

    r: int = 8
    """rank r of the update B @ A (A: (r, in), B: (out, r)); at most min(in, out) of each layer."""
    alpha: float = 16
    """the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """dropout probability on the adapter's input (the frozen base path never sees it)."""
    target_modules: list[str] | str | None = None
    """module names (suffix match, e.g. "q_proj,v_proj"), a regex on the full module path, "all-linear", or None for the architecture's default."""
    use_rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (arXiv:2312.03732)."""
    init: str = "default"
    """initial A: "default" (Kaiming-uniform, a=sqrt(5), as nn.Linear) or "gaussian" (std 1/r); B is always zero."""

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRAConfig.use_rslora must be True or False, got {self.use_rslora!r}")
        self.target_modules = _normalise_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA output scale: alpha / r (Hu et al. 2021) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _normalise_targets(targets):
    """None | "all-linear" | regex string | names ("a,b" or a list) -> None | str | list[str]."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets == "all-linear":
            return targets
        if _PLAIN_NAMES.fullmatch(targets.strip()):  # plain names, not a regex
            return [t.strip() for t in targets.split(",")]
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"LoRAConfig.target_modules {targets!r} is not a valid regex: {err}") from None
        return targets
    if isinstance(targets, (list, tuple, set)):
        names = sorted(targets) if isinstance(targets, set) else list(targets)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"LoRAConfig.target_modules must be non-empty names, got {targets!r}")
        return names
    raise ValueError(
        f"LoRAConfig.target_modules must be None, a list of names, a regex or 'all-linear', got {targets!r}"
    )


# ---------------------------------------------------------------------------------------------
# The layer


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (Linear8bitLt included) or transformers' Conv1D: the layers LoRA can wrap."""
    return isinstance(module, (nn.Linear, Conv1D))


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear / Linear8bitLt / Conv1D (weight (in, out))."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class LoRALayer(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T * scaling, for x (..., in), y (..., out).

    `base_layer` is an nn.Linear, a GPT-2 Conv1D or a bitsandbytes Linear8bitLt, only ever
    called.  `lora_A` (in -> r) and `lora_B` (r -> out) are bias-free nn.Linear in fp32, so state
    dict keys read `<path>.lora_A.weight` (A: (r, in)), `<path>.lora_B.weight` (B: (out, r)), as
    peft's.  The adapter runs in fp32 (the input is cast to A's dtype) and its output is cast to
    the base output's dtype, which is the input dtype for a base in that dtype.  With `disabled`
    True the layer is exactly its base layer.
    Ref: Hu et al. 2021, arXiv:2106.09685, eq. 3.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoRALayer wraps nn.Linear, Conv1D or Linear8bitLt, not {type(base_layer).__name__}")
        in_features, out_features = layer_dims(base_layer)
        if r > min(in_features, out_features):
            raise ValueError(
                f"LoRA rank r={r} exceeds min(in, out) = min({in_features}, {out_features}) of this "
                f"layer; choose r <= {min(in_features, out_features)}"
            )
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str = "default") -> None:
        """A Kaiming-uniform (a=sqrt(5), nn.Linear's default) or N(0, 1/r^2); B zeros (so B @ A = 0)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.disabled:
            return out
        x_a = self.lora_dropout(x.to(self.lora_A.weight.dtype))  # (..., in), fp32
        delta = self.lora_B(self.lora_A(x_a)) * self.scaling  # (..., r) -> (..., out)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), fp32: the dense update the adapter adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, disabled={self.disabled}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(module path, layer) for every LoRALayer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


# ---------------------------------------------------------------------------------------------
# Adding adapters


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (elements; an int8 weight counts as many as a float one)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _model_type(model: nn.Module) -> str | None:
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "model_type", None)


def _linear_like_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the Linear-like modules of `model`, outside existing LoRA layers."""
    inside_lora = set()
    for name, module in lora_layers(model):
        inside_lora.update(f"{name}.{sub}" for sub in ("base_layer", "lora_A", "lora_B"))
    return [
        (name, m) for name, m in model.named_modules()
        if is_linear_like(m) and name and name not in inside_lora
    ]


def resolve_target_modules(model: nn.Module, config: LoRAConfig):
    """The config's targets, or the default for the model's architecture (names list / regex / 'all-linear')."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = _model_type(model)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target_modules for model_type {model_type!r}; set LoRAConfig.target_modules "
            f"(e.g. ['q_proj', 'v_proj'] or 'all-linear'). Linear-like modules: {_suffixes(model)}"
        )
    return list(DEFAULT_TARGETS[model_type])


def _suffixes(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_like_names(model)})


def find_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs that `add_lora(model, config)` would wrap; ValueError if none."""
    targets = resolve_target_modules(model, config)
    candidates = _linear_like_names(model)
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [(n, m) for n, m in candidates if m is not head and n.rsplit(".", 1)[-1] != "lm_head"]
    elif isinstance(targets, str):
        found = [(n, m) for n, m in candidates if re.fullmatch(targets, n)]
    else:
        found = [(n, m) for n, m in candidates if any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(
            f"LoRA target_modules {targets!r} matched no Linear-like module. Names that exist: "
            f"{_suffixes(model)} (e.g. {[n for n, _ in candidates[:4]]})"
        )
    return found


def add_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Wrap the target layers of `model` in `LoRALayer`s and freeze everything else, in place.

    Every parameter that is not a LoRA A/B matrix gets requires_grad=False (a value head on a
    wrapper passed here too: unfreeze it afterwards).  Frozen 8-bit base layers are pinned in eval
    mode (`keep_8bit_layers_in_eval`).  The resolved config is kept as `model.lora_config` for
    `save_adapter`.  Returns `model`; see `count_parameters` for the trainable/total counts
    (also logged).
    """
    config = config or LoRAConfig()
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA layers; add_lora once per model (merge_lora first to stack)")
    found = find_targets(model, config)
    too_small = [(n, layer_dims(m)) for n, m in found if config.r > min(layer_dims(m))]
    if too_small:
        name, (i, o) = too_small[0]
        raise ValueError(
            f"LoRA rank r={config.r} exceeds min(in, out) of {len(too_small)} target layer(s), e.g. "
            f"{name} with (in, out) = ({i}, {o}); choose r <= {min(min(d) for _, d in too_small)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in found:
        layer = LoRALayer(module, config.r, config.alpha, config.dropout, config.use_rslora, config.init)
        layer.train(module.training)
        model.set_submodule(name, layer)
    keep_8bit_layers_in_eval(model)
    resolved = resolve_target_modules(model, config)
    if resolved == "all-linear":  # saved as the names it expanded to, as peft does
        resolved = sorted({n.rsplit(".", 1)[-1] for n, _ in found})
    model.lora_config = dataclasses.replace(config, target_modules=resolved)
    trainable, total = count_parameters(model)
    logger.info(
        "add_lora: %d layers, r=%d; trainable params %d / %d (%.3f%%)",
        len(found), config.r, trainable, total, 100.0 * trainable / max(total, 1),
    )
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager under which every LoRA layer of `model` is its base layer exactly.

    Restores each layer's previous flag on exit, also on an exception; nests (an inner exit keeps
    the outer block's adapters disabled).  Does not change train/eval mode.
    """
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A.weight": A (r, in), "<path>.lora_B.weight": B (out, r)} for every LoRA layer (detached)."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


# ---------------------------------------------------------------------------------------------
# Merging


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as fp32 (out, in): dequantised for int8, transposed for Conv1D."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return dequantize_8bit(layer)
    if isinstance(layer, Conv1D):
        return layer.weight.detach().float().t()
    return layer.weight.detach().float()


def _plain_layer(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """An nn.Linear (or a Conv1D where the original layer was one) holding weight (out, in)."""
    out_features, in_features = weight.shape
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    as_conv1d = isinstance(layer, Conv1D) or issubclass(getattr(layer, "source_cls", nn.Linear), Conv1D)
    if as_conv1d:
        new = Conv1D(out_features, in_features).to(weight.device)
        new.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)  # (in, out)
        new.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros_like(new.bias, dtype=dtype),
                                requires_grad=False)
    else:
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return new.train(layer.training)


def _strip_quantization(model: nn.Module) -> None:
    """Remove transformers' 8-bit markers so `save_pretrained` writes a plain float model."""
    for target in {id(m): m for m in (model, _unwrap(model))}.values():
        for attr in ("quantization_method", "is_loaded_in_8bit", "is_loaded_in_4bit", "_weight_conversions"):
            if attr in vars(target):
                delattr(target, attr)
        if getattr(target, "hf_quantizer", None) is not None:
            target.hf_quantizer = None
        config = getattr(target, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def merge_lora(model: nn.Module, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Fold every adapter into its base weight, W' = W + scaling * B @ A, and return a plain model.

    In place: each LoRALayer becomes an nn.Linear (a Conv1D where the base was or came from one,
    so GPT-2 folders load in plain transformers) holding W' in `dtype`; int8 bases are dequantised
    first (W = CB * SCB / 127), and every remaining `Linear8bitLt` is replaced by a dequantised
    layer too.  All floating parameters are cast to `dtype` and transformers' quantisation markers
    are removed, so `model.save_pretrained(dir)` loads with bare `AutoModelForCausalLM`.
    Merging is always this explicit call (never a side effect of `.eval()`).
    """
    dtype = resolve_dtype(dtype)
    with torch.no_grad():
        for name, layer in list(lora_layers(model)):
            base = layer.base_layer
            weight = _float_weight(base) + layer.delta_weight().to(base.weight.device)  # (out, in)
            model.set_submodule(name, _plain_layer(base, weight, dtype))
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear8bitLt):
                model.set_submodule(name, _plain_layer(module, dequantize_8bit(module), dtype))
    _strip_quantization(model)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    lm = _unwrap(model)
    if hasattr(lm, "tie_weights"):
        lm.tie_weights()
    config = getattr(lm, "config", None)
    if config is not None:
        setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    for target in (model, lm):
        if "lora_config" in vars(target):
            del target.lora_config
    return model


# ---------------------------------------------------------------------------------------------
# Adapter files (peft layout)


def _unwrap(model: nn.Module) -> nn.Module:
    """The language model inside a wrapper (`.pretrained_model`, as trl's value-head models), or `model`."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "pretrained_model", None)
    if isinstance(inner, nn.Module):
        return inner
    children = [m for m in model.children() if isinstance(m, PreTrainedModel)]
    return children[0] if len(children) == 1 else model


def _base_name(lm: nn.Module) -> str | None:
    name = getattr(lm, "name_or_path", None) or getattr(getattr(lm, "config", None), "_name_or_path", None)
    return name or None


def adapter_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` fields (peft's LoraConfig) describing `model`'s adapters."""
    lm = _unwrap(model)
    layers = [layer for _, layer in lora_layers(lm)]
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora (or load_adapter) first")
    first = layers[0]
    config = getattr(lm, "lora_config", None) or getattr(model, "lora_config", None)
    if config is not None:
        targets, init = config.target_modules, config.init
        dropout = config.dropout
    else:
        targets = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(lm)})
        init = "default"
        dropout = getattr(first.lora_dropout, "p", 0.0)
    conv1d = _model_type(lm) == "gpt2" or any(
        isinstance(l.base_layer, Conv1D) or issubclass(getattr(l.base_layer, "source_cls", nn.Linear), Conv1D)
        for l in layers
    )
    alpha = first.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or _base_name(lm),
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> str:
    """Write `adapter_config.json` + `adapter_model.safetensors` (peft's layout) to `directory`.

    Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, paths relative to
    the language model (a wrapper with `.pretrained_model` is unwrapped).  Each file is written to a
    temp file and renamed into place, so an interrupted save never leaves a corrupt adapter.
    Returns the directory.
    """
    lm = _unwrap(model)
    config = adapter_config_dict(model, base_model_name_or_path)
    tensors = {
        PEFT_PREFIX + key: value.detach().to("cpu").contiguous()
        for key, value in lora_state_dict(lm).items()
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS),
                  lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(os.path.join(directory, ADAPTER_CONFIG), lambda path: open(path, "w").write(text))
    return directory


def _config_from_peft(cfg: dict, where: str) -> LoRAConfig:
    """A LoRAConfig from an adapter_config.json dict; ValueError for features we do not support."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "bias": cfg.get("bias", "none") != "none",
        "use_dora": bool(cfg.get("use_dora")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{where}: adapter uses {bad}, which minippo's LoRA does not support")
    init = cfg.get("init_lora_weights", True)
    return LoRAConfig(
        r=int(cfg["r"]),
        alpha=cfg.get("lora_alpha", 8),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=cfg.get("target_modules"),
        use_rslora=bool(cfg.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "default",
    )


def _same_model_name(a: str, b: str) -> bool:
    """Hub id vs local folder of the same model compare equal by their last path component."""
    return os.path.basename(a.rstrip("/\\")) == os.path.basename(b.rstrip("/\\"))


def load_adapter(model: nn.Module, directory: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load a LoRA adapter saved by `save_adapter` or by peft into `model`, in place; returns it.

    A model without LoRA layers gets them first (`add_lora` with the file's config); a model with
    LoRA layers must match the file's rank and scaling.  Raises ValueError, naming what differs,
    when the adapter's base model name differs from the model's (`check_base=False` skips this
    check), or when keys are missing or unexpected, or shapes differ; nothing is changed then.
    """
    directory = os.fspath(directory)
    lm = _unwrap(model)
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {os.path.basename(path)} in {directory}: not a saved adapter")
    with open(config_path) as f:
        cfg = json.load(f)
    config = _config_from_peft(cfg, config_path)

    # 1. Same base model?
    saved_base, ours = cfg.get("base_model_name_or_path"), _base_name(lm)
    if check_base and saved_base and ours and not _same_model_name(saved_base, ours):
        raise ValueError(
            f"adapter in {directory} was trained on base model {saved_base!r}, but this model is "
            f"{ours!r}; pass check_base=False to load it anyway"
        )

    # 2. Expected shapes: from existing LoRA layers, else from the layers add_lora would wrap.
    existing = dict(lora_layers(lm))
    if existing:
        for name, layer in existing.items():
            if layer.r != config.r or not math.isclose(layer.scaling, config.scaling):
                raise ValueError(
                    f"adapter in {directory} has r={config.r}, scaling={config.scaling:g}, but the model's "
                    f"LoRA layer {name} has r={layer.r}, scaling={layer.scaling:g}"
                )
        dims = {name: (layer.in_features, layer.out_features) for name, layer in existing.items()}
    else:
        dims = {name: layer_dims(m) for name, m in find_targets(lm, config)}
    expected = {}
    for name, (i, o) in dims.items():
        expected[f"{name}.lora_A.weight"] = (config.r, i)
        expected[f"{name}.lora_B.weight"] = (o, config.r)

    # 3. Compare the file's keys and shapes with those.
    raw = load_file(weights_path)
    tensors = {}
    for key, value in raw.items():
        key = key.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors[key] = value
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [(k, tuple(tensors[k].shape), expected[k]) for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"adapter in {directory} does not fit this model (base {saved_base!r} vs {ours!r}):"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if wrong:
            lines.append("  shape mismatch (key, file, model): " + "; ".join(map(str, wrong[:3])))
        raise ValueError("\n".join(lines))

    # 4. Load.
    if not existing:
        add_lora(lm, config)
    layers = dict(lora_layers(lm))
    with torch.no_grad():
        for key, value in tensors.items():
            path, which = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            param = getattr(layers[path], which).weight
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return model
