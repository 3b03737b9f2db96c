"""The two tiers: the core never imports the application, and each core module imports only the
core modules before it in the reading order of docs/design.md."""

import ast
from pathlib import Path

import minippo

CORE = Path(minippo.__file__).parent
READING_ORDER = [
    "fileio",
    "checks",
    "core",
    "distributed",
    "quant",
    "lora",
    "adapter_files",
    "policy",
    "rollout",
]
READING_ORDER += ["tracking", "ppo"]
READING_ORDER += ["rewards"]


def minippo_imports(path: Path) -> set[str]:
    """The minippo modules a file imports, as dotted names below `minippo` ("lora", "app.data")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ("minippo." if node.level else "") + (node.module or "")
            if node.level or base.startswith("minippo"):
                names = [base] if node.module else [f"minippo.{a.name}" for a in node.names]
                found |= {n.removeprefix("minippo").lstrip(".") for n in names}
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("minippo.") for a in node.names if a.name.startswith("minippo.")
            }
    return found


def test_every_core_module_is_in_the_reading_order():
    modules = {p.stem for p in CORE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(READING_ORDER)


def test_the_core_never_imports_the_app():
    for path in CORE.glob("*.py"):
        if path.stem == "__main__":  # `python -m minippo` is the command line: it starts the app
            continue
        app = [m for m in minippo_imports(path) if m == "app" or m.startswith("app.")]
        assert not app, f"{path.name} imports {app}"


def test_core_modules_import_only_earlier_ones():
    for i, name in enumerate(READING_ORDER):
        later = set(READING_ORDER[i:])
        imported = {m.split(".")[0] for m in minippo_imports(CORE / f"{name}.py")}
        assert not imported & later, f"{name}.py imports {sorted(imported & later)}"
