"""The shape of the code that issue 18 asked for: no import cycles, library code that does not lean on
``tempflow.testing``, and efficient-attention modules that share one MMDiT module instead of importing each other."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"tempflow": ROOT / "tempflow", "tempflow.rewards": ROOT / "rewards", "tempflow.attention": ROOT / "attention"}


def _modules() -> dict[str, Path]:
    """Every library module by its import name (the ShapesWorld package included)."""
    modules = {}
    for package, folder in LIBRARY.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] in ("rewards", "attention") and folder.name == "tempflow":
                continue  # not a package of tempflow/: those are the top-level folders
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported_modules(name: str, path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports anywhere (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_every_module_imports_on_its_own():
    """Each module first in a fresh set of tempflow modules: an import cycle fails whichever entry point it has."""
    script = textwrap.dedent(f"""
        import importlib, sys
        failures = []
        for name in {sorted(_modules())!r}:
            for loaded in [m for m in sys.modules if m == "tempflow" or m.startswith("tempflow.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as err:
                failures.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
        print("\\n".join(failures))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout


def test_no_library_module_imports_the_test_helpers():
    offenders = [name for name, path in _modules().items()
                 if name != "tempflow.testing" and "tempflow.testing" in _imported_modules(name, path)]
    assert offenders == []


def test_pruning_and_block_sparse_share_the_mmdit_module_instead_of_each_other():
    modules = _modules()
    for name, other in (("pruning", "block_sparse"), ("block_sparse", "pruning")):
        imported = _imported_modules(f"tempflow.attention.{name}", modules[f"tempflow.attention.{name}"])
        assert f"tempflow.attention.{other}" not in imported
        assert "tempflow.attention.mmdit" in imported


def test_worlds_plug_in_through_the_registries(tmp_path):
    from tempflow.prompts import load_prompts
    from tempflow.registry import register_pipeline, register_prompt_sets, resolve_pipeline
    from tempflow.shapes import pipeline_path

    @register_prompt_sets("mine")
    def mine(name):
        return [{"prompt": f"{name} {i}"} for i in range(2)]

    @register_pipeline("my-pipeline")
    def my_pipeline():
        return tmp_path

    assert load_prompts("mine:x") == [{"prompt": "x 0"}, {"prompt": "x 1"}]
    assert resolve_pipeline("my-pipeline") == str(tmp_path)
    assert resolve_pipeline("shapes") == str(pipeline_path())  # ShapesWorld registers the same way
    assert load_prompts("shapes:eval")[0]["spec"]
    assert resolve_pipeline("owner/model") == "owner/model"


TRAINING_PATH = ("trainer", "trainer_setup", "trainer_rollout", "trainer_optimize", "trainer_nft", "nft", "trainer_evaluate",
                 "trainer_checkpoints", "rollout", "sampling", "loss", "advantages", "scoring", "evaluation")


def test_the_trainer_is_small_and_its_functions_short():
    assert len((ROOT / "tempflow" / "trainer.py").read_text().splitlines()) <= 350
    long = []
    for name in TRAINING_PATH:
        path = ROOT / "tempflow" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > 50:
                    long.append(f"{name}.{node.name}: {node.end_lineno - first + 1} lines")
    assert long == []


def test_choice_lists_agree_with_the_code_that_serves_them():
    from tempflow.config import SDE_TYPES
    from tempflow.sampling import STOCHASTIC_STEPS

    assert set(SDE_TYPES) == set(STOCHASTIC_STEPS)
