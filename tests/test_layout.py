"""The tiers: the core never imports the application, each core module imports only the core modules
before it in the reading order of docs/design.md, and `minippo.fast` only lazily, where its switch is on;
the core holds none of the fast path's devices, and runs without the fast subpackage."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import minippo

CORE = Path(minippo.__file__).parent
READING_ORDER = [
    "fileio",
    "checks",
    "core",
    "distributed",
    "compat",
    "quant",
    "lora",
    "adapter_files",
    "policy",
    "reward_model",
    "rollout",
]
READING_ORDER += ["tracking", "ppo"]


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


def test_the_core_imports_the_fast_path_only_inside_a_function():
    """Module-level imports of `minippo.fast` would load it on the plain path; a function may (lazily)."""
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = set()
        for node in top:
            module = ast.Module(body=[node], type_ignores=[])
            names |= minippo_imports_of(module)
        assert not {n for n in names if n == "fast" or n.startswith("fast.")}, path.name


def minippo_imports_of(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ("minippo." if node.level else "") + (node.module or "")
            names = [base] if node.module else [f"minippo.{a.name}" for a in node.names]
            found |= {n.removeprefix("minippo").lstrip(".") for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("minippo.") for a in node.names}
    return found


FORBIDDEN = ("__class__ =", "torch.autograd.Function", "_int_mm", "int8_linear_matmul", "mallopt")
MUTATORS = {"append", "add", "update", "extend", "insert", "setdefault", "pop", "clear", "remove"}


def test_the_core_holds_none_of_the_fast_paths_devices():
    """No run-time class swapping, hand-written gradients, int8 kernels or malloc tuning in the core
    (they live in minippo/fast/), and no module-level container that a function fills (a cache)."""
    for path in CORE.glob("*.py"):
        text = path.read_text()
        assert not [f for f in FORBIDDEN if f in text], path.name
        tree = ast.parse(text)
        containers = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            value = getattr(node, "value", None)
            mutable = isinstance(value, (ast.List, ast.Dict, ast.Set)) or (
                isinstance(value, ast.Call)
                and getattr(value.func, "id", "") in ("set", "dict", "list")
            )
            if mutable:
                containers |= {t.id for t in targets if isinstance(t, ast.Name)}
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))]:
            for node in ast.walk(func):
                if isinstance(node, ast.Global):
                    raise AssertionError(f"{path.name}: global {node.names}")
                called = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                if called and node.func.attr in MUTATORS:
                    owner = node.func.value
                    assert not (isinstance(owner, ast.Name) and owner.id in containers), path.name
                if isinstance(node, (ast.Assign, ast.AugAssign)):
                    for target in getattr(node, "targets", [getattr(node, "target", None)]):
                        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                            assert target.value.id not in containers, path.name


BOUNDARY = """
import sys

sys.modules["minippo.fast"] = None  # any import of it raises ImportError
sys.path.insert(0, {tests!r})
import torch
from tiny import tiny_model, tiny_tokenizer

from minippo import LoRAConfig, PPOConfig, PPOTrainer, add_lora, quantize_model
from minippo.quant import prepare_model_for_kbit_training

torch.manual_seed(0)
tokenizer = tiny_tokenizer()
model = quantize_model(tiny_model("llama", len(tokenizer)))
prepare_model_for_kbit_training(model)
add_lora(model, LoRAConfig(target_modules="all-linear"))
config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, min_new_tokens=2, max_new_tokens=3)
trainer = PPOTrainer(config, model, tokenizer)
queries = [torch.tensor(tokenizer("This movie was")["input_ids"])] * 4
responses = trainer.generate(queries)
before = [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]
stats = trainer.step(queries, responses, torch.tensor([1.0, -1.0, 0.5, -0.5]))
after = [p for n, p in model.named_parameters() if "lora_B" in n]
assert all(torch.isfinite(torch.tensor(v)).all() for v in stats.values() if isinstance(v, float))
assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the adapters did not move"
assert "minippo.fast" not in [m for m in sys.modules if sys.modules[m] is not None]
print("plain path ok")
"""


def test_the_plain_path_runs_without_the_fast_subpackage():
    """load (quantise), prepare, add_lora, generate and a PPO step, with `minippo.fast` unimportable."""
    tests = str(Path(__file__).parent)
    code = textwrap.dedent(BOUNDARY.format(tests=tests))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(CORE.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain path ok" in done.stdout
