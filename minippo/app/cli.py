"""The `minippo` command line, generated from the config dataclasses.

Every subcommand's settings are one `@dataclass`; each field becomes a `--flag` whose help text is
the one-line docstring written under the field, and whose default is the field's default. So
`minippo ppo --help` always lists exactly what `PPORunConfig` accepts.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

# ----------------------------------------------------------------------------- dataclass -> argparse


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`Optional[X]` / `X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _default(f: dataclasses.Field, instance: Any = None) -> Any:
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", dest_prefix: str = "", defaults: Any = None
) -> None:
    """Add one `--field-name` option per dataclass field (defaults shown in --help).

    A field whose type is itself a dataclass (e.g. `lora: LoRAConfig`) adds that dataclass's
    fields as `--lora-r`, `--lora-alpha`, ...; with `metadata={"cli_prefix": ""}` they keep their
    own names (`ppo: PPOConfig` gives `--learning-rate`, `--batch-size`, ... as trl spells them).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = _default(f, defaults)
        if dataclasses.is_dataclass(tp):
            sub_prefix = f.metadata.get("cli_prefix", f.name.replace("_", "-") + "-")
            add_dataclass_arguments(parser, tp, prefix + sub_prefix, f"{dest_prefix}{f.name}.", default)
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        kwargs: dict[str, Any] = dict(dest=dest_prefix + f.name, default=default, help=docs.get(f.name, ""))
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            (item,) = typing.get_args(tp)[:1] or (str,)
            kwargs.update(nargs="*", type=item if item in (int, float, str) else str)
        elif origin is typing.Literal:
            kwargs.update(choices=list(typing.get_args(tp)), type=type(typing.get_args(tp)[0]))
        elif tp in (int, float, str):
            kwargs["type"] = _none_or(tp) if optional else tp
        else:
            kwargs["type"] = str
        if kwargs.get("help") is not None and "action" not in kwargs:
            kwargs["help"] += " (default: %(default)s)"
        elif kwargs.get("action"):
            kwargs["help"] += f" (default: {default})"
        kwargs["metavar"] = None if "choices" in kwargs or "action" in kwargs else f.name.upper()
        if kwargs["metavar"] is None:
            kwargs.pop("metavar")
        parser.add_argument(flag, **kwargs)


def config_from_namespace(cls: type, ns: argparse.Namespace, dest_prefix: str = ""):
    """Build the dataclass (and nested ones) from parsed arguments (`__post_init__` validates)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            values[f.name] = config_from_namespace(tp, ns, f"{dest_prefix}{f.name}.")
        elif hasattr(ns, dest_prefix + f.name):
            value = getattr(ns, dest_prefix + f.name)
            values[f.name] = (
                tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
            )
    return cls(**values)


# ----------------------------------------------------------------------------- the commands


def _commands() -> dict[str, tuple[type, Callable, str]]:
    """name -> (config dataclass, run function, one-line help). Imported lazily: fast --help."""
    from minippo.app import demo, pipeline, sft
    from minippo.app.memory_plan import PlanConfig, run_plan

    return {
        "sft": (sft.SFTConfig, sft.run_sft, "step 1: LoRA fine-tune an 8-bit base model on IMDB review text"),
        "merge": (
            pipeline.MergeConfig,
            pipeline.run_merge,
            "step 2: merge an adapter into the base weights and save a plain model",
        ),
        "reward": (pipeline.RewardConfig, pipeline.run_reward, "train (or check) the sentiment reward model"),
        "ppo": (
            pipeline.PPORunConfig,
            pipeline.run_ppo,
            "step 3: PPO-train a new adapter so the model writes positive reviews",
        ),
        "generate": (
            pipeline.GenerateConfig,
            pipeline.run_generate,
            "sample reviews with and without an adapter, side by side",
        ),
        "demo": (
            demo.DemoConfig,
            demo.run_demo,
            "the whole pipeline on the embedded defaults, with plots and a report",
        ),
        "plan": (PlanConfig, run_plan, "predict training memory and whether it fits a GPU"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minippo",
        description="PPO on LoRA adapters over 8-bit causal language models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (cls, _, help_text) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        add_dataclass_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cls, run, _ = _commands()[args.command]
    try:
        config = config_from_namespace(cls, args)
    except (ValueError, TypeError) as err:  # validation in __post_init__
        parser.error(f"{args.command}: {err}")
    try:
        run(config)
    except KeyboardInterrupt:
        print("\nminippo: interrupted; the last saved adapter/checkpoint is intact.", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # bad input, missing files, offline hub: a message
        print(f"minippo {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
