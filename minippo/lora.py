"""LoRA adapters on Linear, GPT-2 Conv1D and bitsandbytes 8-bit / 4-bit layers: the layer and its injection.

A LoRA layer adds a trainable low-rank update to a frozen layer W (out, in):

    y = base(x) + dropout(x) @ A.T @ B.T * scaling,   A: (r, in), B: (out, r)

with scaling = alpha / r (alpha / sqrt(r) with rsLoRA) and B = 0 at init, so an adapted model starts
as its base.  The layer only *calls* the base, never reads its weight, so the base may be int8 or 4-bit.
Ref: Hu et al. 2021, LoRA, arXiv:2106.09685, eq. 3; Kalajdzievski 2023, rsLoRA, arXiv:2312.03732.
minLoRA-style API: `add_lora`, `disable_adapters`, `lora_state_dict`, `merge_lora`; files: `adapter_files`.

Named adapters: `add_lora(model, config, adapter_name="reward")` adds a second adapter to a model that has
one (peft's multi-adapter model, on one copy of the base weights).  A layer with two adapters is two
LoRALayers, one inside the other, each adding its own update; the new one starts inactive (the active one
stays, as in peft), `use_adapter(model, name)` runs a block with only `name` on."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterator

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import compat
from .checks import BOOL, FRACTION, POSITIVE, POSITIVE_INT, check_fields, one_of
from .quant import dequantize_4bit, dequantize_8bit, resolve_dtype

logger = logging.getLogger(__name__)

_QV = ("q_proj", "v_proj")
# Default targets per `config.model_type` (the attention projections, as peft's defaults).
DEFAULT_TARGETS = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "gptj"), _QV
    ),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), ("query_key_value",)),
    "gpt2": ("c_attn",),
    "phi3": ("qkv_proj",),
}
INITS = ("default", "gaussian")
_PLAIN_NAMES = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")


@dataclasses.dataclass
class LoRAConfig:
    """Where and how to add LoRA adapters (`add_lora`)."""

    r: int = 8
    """rank r of the update B @ A (A: (r, in), B: (out, r)); at most min(in, out) of each layer."""
    alpha: float = 16
    """the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """dropout probability on the adapter's input (the frozen base path never sees it)."""
    target_modules: list[str] | str | None = None
    """names (suffix match: "q_proj,v_proj"), a regex on the full path, "all-linear", or None (default)."""
    use_rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (arXiv:2312.03732)."""
    init: str = "default"
    """initial A: "default" (Kaiming-uniform, a=sqrt(5), as nn.Linear) or "gaussian" (std 1/r); B is zero."""

    def __post_init__(self):
        check_fields(self, POSITIVE_INT, "r")
        check_fields(self, POSITIVE, "alpha")
        check_fields(self, FRACTION, "dropout")
        check_fields(self, one_of(*INITS), "init")
        check_fields(self, BOOL, "use_rslora")
        self.target_modules = _normalise_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA output scale: alpha / r (Hu et al. 2021) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _normalise_targets(targets):
    """None | "all-linear" | regex string | names ("a,b" or a list) -> None | str | list[str]."""
    if targets is None or targets == "all-linear":
        return targets
    if isinstance(targets, str) and _PLAIN_NAMES.fullmatch(
        targets.strip()
    ):  # plain names, not a regex
        targets = [t.strip() for t in targets.split(",")]
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"LoRAConfig.target_modules {targets!r} is not a valid regex: {err}"
            ) from None
        return targets
    names = isinstance(targets, (list, tuple, set)) and all(
        isinstance(t, str) and t for t in targets
    )
    if not names or not targets:
        raise ValueError(
            f"LoRAConfig.target_modules must be None, names, a regex or 'all-linear', got {targets!r}"
        )
    return sorted(targets) if isinstance(targets, set) else list(targets)


# -- the layer ---------------------------------------------------------------------------------
def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (Linear8bitLt and Linear4bit included) or transformers' Conv1D: the layers LoRA can wrap."""
    return isinstance(module, (nn.Linear, Conv1D))


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear / Linear8bitLt / Conv1D (weight (in, out))."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def from_conv1d(module: nn.Module) -> bool:
    """A GPT-2 Conv1D, or a k-bit layer quantised from one (`source_cls`, as transformers marks it)."""
    return isinstance(module, Conv1D) or issubclass(
        getattr(module, "source_cls", nn.Linear), Conv1D
    )


class LoRALayer(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T * scaling, for x (..., in), y (..., out).  Ref: Hu et al., eq. 3.

    `base_layer` is only ever called.  `lora_A` (in -> r) and `lora_B` (r -> out) are bias-free fp32
    nn.Linear, so state dict keys are peft's (`<path>.lora_A.weight`).  The adapter runs in fp32, also
    under autocast, cast to the base output's dtype; `disabled` makes the layer its base.  `adapter_name`
    names the adapter the layer belongs to; a second adapter on the same layer is a LoRALayer inserted as
    this one's `base_layer` (`add_lora`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout=0.0,
        use_rslora=False,
        init="default",
        adapter_name: str = "default",
    ):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"LoRA wraps nn.Linear, Conv1D, k-bit Linear; not {type(base_layer).__name__}"
            )
        in_features, out_features = layer_dims(base_layer)
        if r > min(in_features, out_features):
            raise ValueError(
                f"LoRA rank r={r} exceeds min(in, out) = {min(in_features, out_features)} here"
            )
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_name = adapter_name
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
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under bf16 autocast
            x_a = self.lora_dropout(x.to(self.lora_A.weight.dtype))  # (..., in), fp32
            delta = self.lora_B(self.lora_A(x_a) * self.scaling)  # (..., r) -> (..., out)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), fp32: the dense update the adapter adds to W."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"{self.adapter_name!r}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
            f"disabled={self.disabled}"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The language model inside a wrapper (`.pretrained_model`, as trl's value-head models), or `model`."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    if isinstance(getattr(model, "pretrained_model", None), nn.Module):
        return model.pretrained_model
    children = [m for m in model.children() if isinstance(m, PreTrainedModel)]
    return children[0] if len(children) == 1 else model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(path, layer) of every LoRA layer of every adapter (an inner adapter's path ends in `.base_layer`)."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer))


# -- named adapters ----------------------------------------------------------------------------
def module_path(name: str) -> str:
    """The path of the layer an adapter wraps: a LoRA layer's path less its outer adapters' `.base_layer`."""
    return re.sub(r"(\.base_layer)+$", "", name)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, each once, in module order."""
    return list(dict.fromkeys(layer.adapter_name for _, layer in lora_layers(model)))


def check_adapter(model: nn.Module, adapter_name: str) -> None:
    """ValueError naming the adapters that exist, unless the model has one called `adapter_name`."""
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; its adapters: {names}")


def adapter_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, LoRALayer]]:
    """(path of the wrapped layer, LoRA layer) of one adapter; ValueError for an unknown name."""
    check_adapter(model, adapter_name)
    layers = lora_layers(model)
    return [(module_path(n), m) for n, m in layers if m.adapter_name == adapter_name]


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The A and B matrices of one adapter: what an optimiser trains for it."""
    layers = adapter_layers(model, adapter_name)
    return [p for _, m in layers for p in (m.lora_A.weight, m.lora_B.weight)]


def base_of(layer: nn.Module) -> nn.Module:
    """The frozen layer under a LoRA layer and under any adapters inside it (the layer itself if none)."""
    while isinstance(layer, LoRALayer):
        layer = layer.base_layer
    return layer


# -- adding adapters ---------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (elements; an int8 weight counts as many as a float one)."""
    params = list(model.parameters())  # each shared parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(_unwrap(model), "config", None), "model_type", None)


def _linear_like_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the Linear-like modules of `model` and of its outermost LoRA layers (which a new
    adapter may target too), never the modules inside a LoRA layer."""
    inside = {
        f"{n}.{sub}" for n, _ in lora_layers(model) for sub in ("base_layer", "lora_A", "lora_B")
    }
    return [
        (n, m)
        for n, m in model.named_modules()
        if (is_linear_like(m) or isinstance(m, LoRALayer)) and n and n not in inside
    ]


def resolve_target_modules(model: nn.Module, config: LoRAConfig):
    """The config's targets, or the architecture's default (names list / regex / 'all-linear')."""
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
        found = [
            (n, m) for n, m in candidates if m is not head and n.rsplit(".", 1)[-1] != "lm_head"
        ]
    elif isinstance(targets, str):
        found = [(n, m) for n, m in candidates if re.fullmatch(targets, n)]
    else:
        found = [
            (n, m) for n, m in candidates if any(n == t or n.endswith("." + t) for t in targets)
        ]
    if not found:
        raise ValueError(
            f"LoRA target_modules {targets!r} matched no Linear-like module. Names that exist: "
            f"{_suffixes(model)} (e.g. {[n for n, _ in candidates[:4]]})"
        )
    return found


def add_lora(
    model: nn.Module, config: LoRAConfig | None = None, adapter_name: str = "default"
) -> nn.Module:
    """Wrap the target layers of `model` in `LoRALayer`s of adapter `adapter_name`, in place.

    The first adapter of a model is active.  Another name adds a second adapter, with its own targets,
    rank and alpha, that starts inactive (the active one stays, as in peft; `use_adapter` runs it): a layer
    that has an adapter gets the new one as its innermost `base_layer`.  Freezes every parameter but the
    adapters' (a wrapper's value head too: unfreeze it afterwards; earlier adapters keep their flags); the
    base layers keep the function they compute.  Keeps the resolved config in
    `model.lora_configs[adapter_name]` for `save_adapter`.  Returns `model`."""
    config = config or LoRAConfig()
    names = adapter_names(model)
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[\w-]+", adapter_name):
        raise ValueError(f"adapter_name must be letters, digits, _ or -, got {adapter_name!r}")
    if adapter_name in names:
        raise ValueError(
            f"the model already has LoRA adapter {adapter_name!r} (its adapters: {names}): give a new "
            "adapter another adapter_name, or merge_lora to stack"
        )
    found = find_targets(model, config)
    if too_small := [(n, layer_dims(m)) for n, m in found if config.r > min(layer_dims(m))]:
        name, (i, o) = too_small[0]
        raise ValueError(
            f"LoRA rank r={config.r} exceeds min(in, out) of {len(too_small)} target layer(s), e.g. "
            f"{name} with (in, out) = ({i}, {o}); choose r <= {min(min(d) for _, d in too_small)}"
        )
    adapters = {id(p) for other in names for p in adapter_parameters(model, other)}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, module in found:
        args = (config.r, config.alpha, config.dropout, config.use_rslora, config.init)
        layer = LoRALayer(base_of(module), *args, adapter_name=adapter_name).train(module.training)
        layer.disabled = bool(names)  # a second adapter starts inactive
        if isinstance(module, LoRALayer):  # inside the adapters the layer has
            inner = module
            while isinstance(inner.base_layer, LoRALayer):
                inner = inner.base_layer
            inner.base_layer = layer
        else:
            model.set_submodule(name, layer)
    if repacked := compat.keep_4bit_layers_unpacked(model):
        logger.warning(
            "add_lora: %d Linear4bit layer(s) (e.g. %s) were repacked by bitsandbytes' AVX512-BF16 CPU "
            "kernel, which passes no gradient to its input: adapters below them will not learn. Load "
            "with minippo.load_model, or call minippo.compat.keep_4bit_layers_unpacked(model) before "
            "the first forward",
            len(repacked),
            repacked[0],
        )
    resolved = resolve_target_modules(model, config)
    if resolved == "all-linear":  # saved as the names it expanded to, as peft does
        resolved = sorted({n.rsplit(".", 1)[-1] for n, _ in found})
    configs = getattr(model, "lora_configs", {})
    resolved_config = dataclasses.replace(config, target_modules=resolved)
    model.lora_configs = {**configs, adapter_name: resolved_config}
    trainable, total = count_parameters(model)
    msg = "add_lora %r: %d layers, r=%d; trainable params %d / %d (%.3f%%)"
    share = 100.0 * trainable / max(total, 1)
    logger.info(msg, adapter_name, len(found), config.r, trainable, total, share)
    return model


@contextlib.contextmanager
def _adapter_flags(model: nn.Module, off):
    """Set each LoRA layer's `disabled` to `off(layer)` for a block, then restore every flag (also on an
    exception), so the context managers built on it nest; train/eval mode is untouched."""
    previous = {layer: layer.disabled for _, layer in lora_layers(model)}
    for layer in previous:
        layer.disabled = off(layer)
    try:
        yield model
    finally:
        for layer, flag in previous.items():
            layer.disabled = flag


def disable_adapters(model: nn.Module):
    """Context manager under which every LoRA layer of `model`, of every adapter, is its base layer
    exactly.  Restores each layer's flag on exit (also on an exception), so it nests."""
    return _adapter_flags(model, lambda layer: True)


def use_adapter(model: nn.Module, adapter_name: str):
    """Context manager under which only adapter `adapter_name` is active (every other adapter's layers are
    their base).  Restores each layer's flag on exit (also on an exception), so it nests with itself and
    with `disable_adapters`.  ValueError, naming the adapters that exist, for an unknown name."""
    check_adapter(model, adapter_name)
    return _adapter_flags(model, lambda layer: layer.adapter_name != adapter_name)


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A.weight": A (r, in), "<path>.lora_B.weight": B (out, r)}, detached: of every LoRA
    layer (their paths in the model), or of adapter `adapter_name`, keyed by the paths of the layers it
    wraps (its adapter file's keys; the same for a model's only adapter)."""
    if adapter_name is None:
        layers = list(lora_layers(model))
    else:
        layers = adapter_layers(model, adapter_name)
    out = {}
    for name, layer in layers:
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


# -- merging -----------------------------------------------------------------------------------
def _float_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as fp32 (out, in): dequantised for int8 and 4-bit, transposed for Conv1D."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return dequantize_8bit(layer)
    if isinstance(layer, bnb.nn.Linear4bit):
        return dequantize_4bit(layer)
    weight = layer.weight.detach().float()
    return weight.t() if isinstance(layer, Conv1D) else weight


def _plain_layer(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """An nn.Linear (or a Conv1D where the original layer was one) holding weight (out, in)."""
    out_features, in_features = weight.shape
    if from_conv1d(layer):
        new, weight = (
            Conv1D(out_features, in_features),
            weight.t(),
        )  # Conv1D: weight (in, out), a bias
    else:
        new = nn.Linear(in_features, out_features, bias=layer.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous().to(dtype), requires_grad=False)
    if new.bias is not None:
        bias = torch.zeros(out_features) if layer.bias is None else layer.bias.detach().clone()
        new.bias = nn.Parameter(bias.to(weight.device, dtype), requires_grad=False)
    return new.train(layer.training)


def _strip_markers(model: nn.Module) -> None:
    """Remove transformers' k-bit markers and our `lora_configs`: `save_pretrained` writes a float model."""
    for target in {id(m): m for m in (model, _unwrap(model))}.values():
        markers = "quantization_method is_loaded_in_8bit is_loaded_in_4bit _weight_conversions lora_configs"
        for attr in markers.split():
            vars(target).pop(attr, None)
        if getattr(target, "hf_quantizer", None) is not None:
            target.hf_quantizer = None
        if hasattr(getattr(target, "config", None), "quantization_config"):
            delattr(target.config, "quantization_config")


def _merged_chain(chain: nn.Module, adapter_name: str | None, dtype: torch.dtype) -> nn.Module:
    """An outermost LoRA layer and the adapters inside it, with `adapter_name`'s (every one's: None) update
    folded into the base weight: a plain layer, or the adapters kept, over one."""
    layers = []  # outer to inner
    while isinstance(chain, LoRALayer):
        layers.append(chain)
        chain = chain.base_layer
    base = chain
    folded = [m for m in layers if adapter_name in (None, m.adapter_name)]
    weight = _float_weight(base)  # (out, in)
    for m in folded:
        weight = weight + m.delta_weight().to(weight.device)
    merged = _plain_layer(base, weight, dtype)
    for m in reversed([m for m in layers if m not in folded]):  # the kept adapters, inner to outer
        m.base_layer = merged
        merged = m
    return merged


def merge_lora(
    model: nn.Module, dtype: torch.dtype | str = torch.float32, adapter_name: str | None = None
) -> nn.Module:
    """Fold every adapter (or only `adapter_name`) into its base weight, W' = W + scaling * B @ A, in place;
    returns the model.

    Each LoRALayer becomes an nn.Linear (Conv1D where the base came from one) holding W' in `dtype`, and
    other k-bit layers are dequantised too; k-bit markers go, so `save_pretrained` writes a float model.
    Adapters other than `adapter_name` stay, over the merged weights, in float32.  The base's quantisation
    error is kept (8-bit: without activation quantisation).  Only explicit."""
    dtype = resolve_dtype(dtype)
    if adapter_name is not None:
        check_adapter(model, adapter_name)
    with torch.no_grad():
        for name, layer in list(lora_layers(model)):
            if module_path(name) == name:  # an outermost LoRA layer
                model.set_submodule(name, _merged_chain(layer, adapter_name, dtype))
        for name, module in list(model.named_modules()):
            if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
                model.set_submodule(name, _plain_layer(module, _float_weight(module), dtype))
    configs = getattr(model, "lora_configs", {})
    kept = {name: c for name, c in configs.items() if adapter_name not in (None, name)}
    _strip_markers(model)
    if kept:
        model.lora_configs = kept
    adapters = {id(p) for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in adapters:
            p.data = p.data.to(dtype)
    lm = _unwrap(model)
    if hasattr(lm, "tie_weights"):
        lm.tie_weights()
    config = getattr(lm, "config", None)
    if config is not None:
        compat.set_config_dtype(config, dtype)
    return model
