"""What the experiment scripts share (`rloo_baseline.py`, `distribution_matching.py`, `state_kl.py`):
their own flags come before `--`, `minippo ppo`'s after it."""

from __future__ import annotations

import argparse
import sys


def parse_flags(doc: str, argv, *flags: tuple[str, dict]) -> tuple[argparse.Namespace, list[str]]:
    """The script's own ``flags`` ((name, add_argument keywords) pairs), parsed from the arguments
    before `--` (``argv``, or sys.argv when None), and the `minippo ppo` flags after `--`. The help
    text's description is the first line of ``doc``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    for name, keywords in flags:
        parser.add_argument(name, **keywords)
    return parser.parse_args(argv[:split]), argv[split + 1 :]
