"""The `minippo` command line: one subcommand per config dataclass, parsed by tyro.

Each field of a command's `@dataclass` is a `--flag` whose help text is the docstring written
under the field and whose default is the field's default, so `minippo ppo --help` always lists
exactly what `PPORunConfig` accepts. A nested config is a group of flags: `--lora.r`,
`--lora.alpha`, ... (`--lora-r` is accepted too); `PPORunConfig.ppo` keeps trl's bare names
(`--learning-rate`, `--batch-size`). `Optional` settings take `None` (or `none`, `null`).
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec

from minippo import distributed
from minippo.app.model_folders import fast_is_on

_REGISTRY = ConstructorRegistry()


@_REGISTRY.primitive_rule
def _none_in_any_case(info) -> PrimitiveConstructorSpec | None:
    """`none` and `null` mean None too (tyro itself takes only `None`)."""
    if info.type is not type(None):
        return None
    return PrimitiveConstructorSpec(
        nargs=1,
        metavar="{None}",
        choices=("None", "none", "null"),
        instance_from_str=lambda _: None,
        is_instance=lambda x: x is None,
        str_from_instance=lambda _: ["None"],
    )


@_REGISTRY.primitive_rule
def _names_or_pattern(info) -> PrimitiveConstructorSpec | None:
    """`list[str] | str | None` (LoRAConfig.target_modules): one word stays a string ("q_proj,v_proj",
    a regex, "all-linear"), several are a list, none/null is None."""
    if typing.get_origin(info.type) not in (typing.Union, types.UnionType):
        return None
    if set(typing.get_args(info.type)) - {type(None)} != {str, list[str]}:
        return None
    nones = ("None", "none", "null")
    return PrimitiveConstructorSpec(
        nargs="+",
        metavar="NAME [NAME ...]",
        instance_from_str=lambda a: (
            None if a[0] in nones and len(a) == 1 else a[0] if len(a) == 1 else list(a)
        ),
        is_instance=lambda x: x is None or isinstance(x, (str, list)),
        str_from_instance=lambda x: (
            ["None"] if x is None else [x] if isinstance(x, str) else list(x)
        ),
    )


# Hyphenated spellings of the nested LoRA flags (--lora-r, --no-lora-use-rslora), read as --lora.r.
_OLD_LORA_FLAG = re.compile(r"^--(no-)?lora-")


def parse_config(
    cls: type, argv: Sequence[str], prog: str | None = None, description: str | None = None
):
    """Command-line arguments -> a `cls` instance (its `__post_init__` validates). `--help` prints
    every field with its docstring and default and exits."""
    argv = [_OLD_LORA_FLAG.sub(lambda m: "--lora." + (m[1] or ""), a) for a in argv]
    return tyro.cli(cls, args=argv, prog=prog, description=description, registry=_REGISTRY)


def _commands() -> dict[str, tuple[type, Callable, str]]:
    """name -> (config dataclass, run function, one-line help). Imported lazily: fast --help."""
    from minippo.app import demo, pipeline, sft
    from minippo.app.memory_plan import PlanConfig, run_plan

    return {
        "sft": (
            sft.SFTConfig,
            sft.run_sft,
            "step 1: LoRA fine-tune an 8-bit base model on IMDB review text",
        ),
        "merge": (
            pipeline.MergeConfig,
            pipeline.run_merge,
            "step 2: merge an adapter into the base weights and save a plain model",
        ),
        "reward": (
            pipeline.RewardConfig,
            pipeline.run_reward,
            "train (or check) the sentiment reward model",
        ),
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


def usage(commands: dict[str, Any]) -> str:
    lines = [
        "usage: minippo COMMAND [--help | FLAGS]",
        "",
        "PPO on LoRA adapters over 8-bit causal language models.",
    ]
    lines += ["", "commands:"] + [
        f"  {name:<9} {help_text}" for name, (_, _, help_text) in commands.items()
    ]
    return "\n".join(lines + ["", "`minippo COMMAND --help` lists the command's settings."])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] not in commands:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(usage(commands), file=sys.stdout if asked else sys.stderr)
        if not asked:
            print(
                f"minippo: error: choose a command{f', not {argv[0]!r}' if argv else ''}",
                file=sys.stderr,
            )
        raise SystemExit(0 if asked else 2)
    name, flags = argv[0], argv[1:]
    cls, run, help_text = commands[name]
    config = parse_config(
        cls, flags, prog=f"minippo {name}", description=(cls.__doc__ or help_text).strip()
    )
    try:
        if fast_is_on(getattr(config, "fast", "off"), getattr(config, "device", None) or "cpu"):
            from minippo.fast.allocator import retain_freed_memory

            retain_freed_memory()  # glibc: reuse freed blocks instead of page-faulting them each step
        run(config)
        distributed.shutdown()  # under torchrun: leave the process group before exiting
    except KeyboardInterrupt:
        print(
            "\nminippo: interrupted; the last saved adapter/checkpoint is intact.", file=sys.stderr
        )
        return 130
    except (ValueError, OSError) as err:  # bad input, missing files, offline hub: a message
        print(f"minippo {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
