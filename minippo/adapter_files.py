"""Adapter files in peft's layout: `save_adapter` and `load_adapter`.

A folder holds `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` (keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`): peft loads ours, and we load peft's."""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .fileio import atomic_write, write_json
from .lora import (
    LoRAConfig,
    _model_type,
    _unwrap,
    add_lora,
    find_targets,
    from_conv1d,
    layer_dims,
    lora_layers,
    lora_state_dict,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _base_name(lm: nn.Module) -> str | None:
    name = getattr(lm, "name_or_path", None) or getattr(
        getattr(lm, "config", None), "_name_or_path", None
    )
    return name or None


def adapter_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` fields (peft's LoraConfig) describing `model`'s adapters."""
    lm = _unwrap(model)
    layers = [layer for _, layer in lora_layers(lm)]
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora (or load_adapter) first")
    first = layers[0]
    config = getattr(lm, "lora_config", None) or getattr(
        model, "lora_config", None
    )  # None: layers by hand
    targets = (
        config.target_modules
        if config
        else sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(lm)})
    )
    dropout = config.dropout if config else getattr(first.lora_dropout, "p", 0.0)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or _base_name(lm),
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "fan_in_fan_out": _model_type(lm) == "gpt2"
        or any(from_conv1d(layer.base_layer) for layer in layers),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": "gaussian" if config and config.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
):
    """Write the two adapter files (keys relative to the LM in a wrapper) atomically; returns `directory`."""
    lm, config = _unwrap(model), adapter_config_dict(model, base_model_name_or_path)
    tensors = {
        PEFT_PREFIX + key: value.to("cpu").contiguous()
        for key, value in lora_state_dict(lm).items()
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(os.path.join(directory, ADAPTER_CONFIG), config, sort_keys=True)
    return directory


def _config_from_peft(cfg: dict, where: str) -> LoRAConfig:
    """A LoRAConfig from an adapter_config.json dict; ValueError for features we do not support."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    bad = [
        k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if cfg.get(k)
    ]
    bad += [
        k for k, off in (("bias", "none"), ("layers_to_transform", None)) if cfg.get(k, off) != off
    ]
    if bad:
        raise ValueError(f"{where}: adapter uses {bad}, which minippo's LoRA does not support")
    r, alpha, dropout = int(cfg["r"]), cfg.get("lora_alpha", 8), float(cfg.get("lora_dropout", 0.0))
    targets, rslora = cfg.get("target_modules"), bool(cfg.get("use_rslora", False))
    init = "gaussian" if cfg.get("init_lora_weights") == "gaussian" else "default"
    return LoRAConfig(
        r=r, alpha=alpha, dropout=dropout, target_modules=targets, use_rslora=rslora, init=init
    )


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, check_base: bool = True
) -> nn.Module:
    """Load a LoRA adapter saved by `save_adapter` or by peft into `model`, in place; returns it.

    A model without LoRA layers gets them (`add_lora` with the file's config); one with must match its
    rank and scaling.  A different base name (unless `check_base=False`), keys or shapes raise a
    ValueError naming what differs, and change nothing."""
    config, tensors = check_adapter(model, directory, check_base)
    if not dict(lora_layers(_unwrap(model))):  # 4. load
        add_lora(_unwrap(model), config)
    copy_adapter(model, tensors)
    return model


def check_adapter(
    model: nn.Module, directory: str | os.PathLike, check_base: bool = True
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read the adapter in `directory` and check that it fits `model` (steps 1-3 of `load_adapter`); its
    config and tensors, for `copy_adapter`. Changes nothing: a mismatch raises the ValueError naming it."""
    directory, lm = os.fspath(directory), _unwrap(model)
    cfg, config, tensors = read_adapter(directory)
    saved, ours = cfg.get("base_model_name_or_path"), _base_name(lm)
    if check_base:  # 1. same base?
        _check_base(saved, ours, directory)
    expected = _expected_shapes(lm, config, directory)  # 2. the shapes this model needs
    _check_tensors(tensors, expected, directory, saved, ours)  # 3. the file fits them
    return config, tensors


def copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors checked by `check_adapter` into the model's LoRA layers, in place."""
    layers = dict(lora_layers(_unwrap(model)))
    with torch.no_grad():
        for key, value in tensors.items():
            path, which, _ = key.rsplit(".", 2)
            param = getattr(layers[path], which).weight
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def read_adapter(directory: str) -> tuple[dict, LoRAConfig, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, its LoRAConfig, tensors keyed `<module path>.lora_A.weight`)."""
    config_path, weights_path = (
        os.path.join(directory, name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    )
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {os.path.basename(path)} in {directory}: not a saved adapter"
            )
    try:
        with open(config_path) as f:
            cfg = json.load(f)
        raw = load_file(weights_path)
    except Exception as err:  # JSON, unicode, OS errors, and safetensors' own for damaged headers
        raise ValueError(
            f"adapter in {directory} is corrupt or truncated ({err}); save it again"
        ) from None
    config = _config_from_peft(cfg, config_path)
    tensors = {}
    for (
        key,
        value,
    ) in raw.items():  # peft's in-memory names carry the adapter name: "lora_A.default"
        tensors[re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key.removeprefix(PEFT_PREFIX))] = value
    return cfg, config, tensors


def _check_base(saved: str | None, ours: str | None, directory: str) -> None:
    """A hub id and a local folder of the same model match by their last path component."""
    if (
        saved
        and ours
        and os.path.basename(saved.rstrip("/\\")) != os.path.basename(ours.rstrip("/\\"))
    ):
        raise ValueError(
            f"adapter in {directory} was trained on base model {saved!r}, but this model is "
            f"{ours!r}; pass check_base=False to load it anyway"
        )


def _expected_shapes(
    lm: nn.Module, config: LoRAConfig, directory: str
) -> dict[str, tuple[int, int]]:
    """Key -> shape, from the model's LoRA layers, else from the layers add_lora would wrap."""
    existing = dict(lora_layers(lm))
    for name, layer in existing.items():
        if layer.r != config.r or not math.isclose(layer.scaling, config.scaling):
            raise ValueError(
                f"adapter in {directory} has r={config.r}, scaling={config.scaling:g}, but the model's "
                f"LoRA layer {name} has r={layer.r}, scaling={layer.scaling:g}"
            )
    dims = {name: (layer.in_features, layer.out_features) for name, layer in existing.items()}
    dims = dims or {name: layer_dims(m) for name, m in find_targets(lm, config)}
    expected = {f"{name}.lora_A.weight": (config.r, i) for name, (i, _) in dims.items()}
    return expected | {f"{name}.lora_B.weight": (o, config.r) for name, (_, o) in dims.items()}


def _check_tensors(tensors: dict, expected: dict, directory: str, saved_base, ours) -> None:
    """ValueError listing missing and unexpected keys, shape and dtype mismatches."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = {
        "missing key(s)": sorted(set(expected) - set(tensors)),
        "unexpected key(s)": sorted(set(tensors) - set(expected)),
        "shape mismatch(es) (key, file, model)": [
            (k, shapes[k], want)
            for k, want in expected.items()
            if k in shapes and shapes[k] != want
        ],
        "tensor(s) not floating point": sorted(
            k for k, v in tensors.items() if not v.is_floating_point()
        ),
    }
    if lines := [
        f"  {len(found)} {what}, e.g. {found[:3]}" for what, found in problems.items() if found
    ]:
        head = f"adapter in {directory} does not fit this model (base {saved_base!r} vs {ours!r}):"
        raise ValueError("\n".join([head, *lines]))
