"""Adapter files in peft's layout: `save_adapter` and `load_adapter`.

A folder holds `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` (keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`): peft loads ours, and we load peft's.
As peft's `save_pretrained`, a named adapter other than "default" goes into a subfolder of that name (the
same two files, the name in no key): `load_adapter(model, folder, adapter_name="reward")` reads
`folder/reward`, or `folder` itself when it holds an adapter saved alone."""

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
    adapter_layers,
    adapter_names,
    add_lora,
    base_of,
    find_targets,
    from_conv1d,
    layer_dims,
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


def adapter_config_dict(
    model: nn.Module, base_model_name_or_path: str | None = None, adapter_name: str = "default"
) -> dict:
    """The `adapter_config.json` fields (peft's LoraConfig) describing adapter `adapter_name` of `model`."""
    lm = _unwrap(model)
    if not adapter_names(lm):
        raise ValueError("the model has no LoRA layers: call add_lora (or load_adapter) first")
    named = adapter_layers(lm, adapter_name)
    layers = [layer for _, layer in named]
    first = layers[0]
    configs = getattr(lm, "lora_configs", None) or getattr(model, "lora_configs", None) or {}
    config = configs.get(adapter_name)  # None: layers by hand
    targets = config.target_modules if config else sorted({n.rsplit(".", 1)[-1] for n, _ in named})
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
        or any(from_conv1d(base_of(layer)) for layer in layers),
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


def adapter_folder(directory: str | os.PathLike, adapter_name: str = "default") -> str:
    """Where an adapter's files go in peft's layout: `directory` for "default", else its subfolder."""
    directory = os.fspath(directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    adapter_name: str = "default",
) -> str:
    """Write the two files of adapter `adapter_name` (keys relative to the LM in a wrapper) atomically, into
    `adapter_folder(directory, adapter_name)`; returns that folder."""
    lm = _unwrap(model)
    config = adapter_config_dict(model, base_model_name_or_path, adapter_name)
    tensors = {
        PEFT_PREFIX + key: value.to("cpu").contiguous()
        for key, value in lora_state_dict(lm, adapter_name).items()
    }
    directory = adapter_folder(directory, adapter_name)
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
    return LoRAConfig(
        r=int(cfg["r"]),
        alpha=cfg.get("lora_alpha", 8),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=cfg.get("target_modules"),
        use_rslora=bool(cfg.get("use_rslora", False)),
        init="gaussian" if cfg.get("init_lora_weights") == "gaussian" else "default",
    )


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    check_base: bool = True,
    adapter_name: str = "default",
) -> nn.Module:
    """Load a LoRA adapter saved by `save_adapter` or by peft into `model` as adapter `adapter_name`, in
    place; returns it.  Reads `adapter_folder(directory, adapter_name)` when that holds an adapter, else
    `directory` (an adapter saved alone, loaded under another name).

    A model without that adapter gets it (`add_lora` with the file's config: a second adapter starts
    inactive); one with must match its rank and scaling.  A different base name (unless
    `check_base=False`), keys or shapes raise a ValueError naming what differs, and change nothing."""
    config, tensors = read_checked_adapter(model, directory, check_base, adapter_name)
    if adapter_name not in adapter_names(_unwrap(model)):  # 4. load
        add_lora(_unwrap(model), config, adapter_name)
    copy_adapter(model, tensors, adapter_name)
    return model


def read_checked_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    check_base: bool = True,
    adapter_name: str = "default",
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read the adapter that `load_adapter` would and check that it fits `model` (its steps 1-3): its
    config and tensors, for `copy_adapter`. Changes nothing: a mismatch raises the ValueError naming it."""
    directory = os.fspath(directory)
    lm = _unwrap(model)
    named = adapter_folder(directory, adapter_name)
    if os.path.isfile(os.path.join(named, ADAPTER_CONFIG)):
        directory = named
    cfg, config, tensors = read_adapter(directory)
    saved = cfg.get("base_model_name_or_path")
    ours = _base_name(lm)
    if check_base:  # 1. same base?
        _check_base(saved, ours, directory)
    expected = _expected_shapes(lm, config, directory, adapter_name)  # 2. the shapes it needs
    _check_tensors(tensors, expected, directory, saved, ours)  # 3. the file fits them
    return config, tensors


def copy_adapter(
    model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Copy tensors checked by `read_checked_adapter` into the model's adapter `adapter_name`, in place."""
    layers = dict(adapter_layers(_unwrap(model), adapter_name))
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
        key = key.removeprefix(PEFT_PREFIX)
        tensors[re.sub(r"\.(lora_[AB])\.[\w-]+\.weight$", r".\1.weight", key)] = value
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
    lm: nn.Module, config: LoRAConfig, directory: str, adapter_name: str = "default"
) -> dict[str, tuple[int, int]]:
    """Key -> shape, from the adapter's LoRA layers, else from the layers add_lora would wrap."""
    existing = {}
    if adapter_name in adapter_names(lm):
        existing = dict(adapter_layers(lm, adapter_name))
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
