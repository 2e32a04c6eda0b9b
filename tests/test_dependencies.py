"""A fresh ``pip install`` brings everything the package code imports.

CI once passed while ``tempflow/shapes/detector.py`` imported scipy, which pyproject.toml did not declare:
scipy happened to be installed by hand. Two checks guard against that:

* every module of ``tempflow``, ``tempflow.rewards`` and ``tempflow.attention`` imports (optional extras
  such as flash_attn, easyocr, triton or deepspeed are imported lazily, inside functions);
* every third-party import in their source is declared: an import that runs when the module is imported
  (module level, also under a module-level ``try``/``if``, or in a class body) must come from
  ``[project.dependencies]`` or what those require, transitively; an import inside a function may also
  come from an optional extra (or what it requires). Modules map to distributions through
  ``importlib.metadata.packages_distributions()``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import pkgutil
import re
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tempflow", "tempflow.rewards", "tempflow.attention")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def with_requirements(names: set[str]) -> set[str]:
    """``names`` and every installed distribution they require, transitively (``extra ==`` markers aside)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [requirement_name(r) for r in requirements if not re.search(r"\bextra\s*==", r)]
    return seen


def imports(tree: ast.AST, lazy: bool = False):
    """Yield ``(top-level module, line, lazy)`` for each absolute import; ``lazy``: inside a function
    (or under ``if TYPE_CHECKING``), so it does not run when the module is imported."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name.partition(".")[0], node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.partition(".")[0], node.lineno, lazy
        inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        )
        yield from imports(node, lazy or inner)


def undeclared_imports(pyproject: dict, root: Path, package_dirs) -> list[str]:
    """Every import in the ``.py`` files under ``package_dirs`` that ``pyproject`` does not declare, as
    ``file:line imports 'mod' (distribution 'x'), which pyproject.toml does not declare``."""
    project = pyproject["project"]
    core = {requirement_name(r) for r in project.get("dependencies", [])}
    extras = {requirement_name(r) for rs in project.get("optional-dependencies", {}).values() for r in rs}
    allowed = {False: with_requirements(core), True: with_requirements(core | extras)}  # keyed by lazy
    packages = pyproject.get("tool", {}).get("setuptools", {}).get("packages", [])
    own = {project["name"].replace("-", "_"), *(p.partition(".")[0] for p in packages)}
    provided_by = metadata.packages_distributions()
    violations = []
    for path in sorted(f for d in package_dirs for f in Path(d).rglob("*.py")):
        for module, line, lazy in imports(ast.parse(path.read_text(), str(path))):
            if module in sys.stdlib_module_names or module in own:
                continue
            # a module no installed distribution provides (an extra not installed here): match by name
            dists = provided_by.get(module, [module])
            if any(canonical(d) in allowed[lazy] for d in dists):
                continue
            source = f"distribution '{dists[0]}'" if module in provided_by else "no installed distribution"
            needs = "" if lazy else " in [project.dependencies] (imported when the module is)"
            where = path.relative_to(root) if path.is_relative_to(root) else path  # a non-editable install
            violations.append(
                f"{where}:{line} imports '{module}' ({source}), which pyproject.toml does not declare{needs}"
            )
    return violations


def package_dirs() -> list[Path]:
    return [Path(p) for name in PACKAGES for p in importlib.import_module(name).__path__]


def test_every_module_imports():
    failures, imported = {}, set()
    for package in PACKAGES:
        names = [package]
        try:
            path = importlib.import_module(package).__path__
            names += [m.name for m in pkgutil.walk_packages(path, package + ".", onerror=lambda name: None)]
        except Exception as exc:
            failures[package] = exc
        for name in names:
            try:
                imported.add(Path(importlib.import_module(name).__file__).resolve())
            except Exception as exc:
                failures[name] = exc
    if failures:
        lines = (f"  {name}: {type(exc).__name__}: {exc}" for name, exc in failures.items())
        pytest.fail("modules that fail to import:\n" + "\n".join(lines), pytrace=False)
    # the walk saw every source file the import check below parses
    assert {f.resolve() for d in package_dirs() for f in d.rglob("*.py")} <= imported


def test_every_third_party_import_is_declared():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    violations = undeclared_imports(pyproject, ROOT, package_dirs())
    if violations:
        pytest.fail("\n".join(violations), pytrace=False)


def test_checker_reports_undeclared_imports(tmp_path):
    pyproject = tomllib.loads(
        textwrap.dedent("""
            [project]
            name = "fakepkg"
            dependencies = ["pytest>=8"]
            [project.optional-dependencies]
            sci = ["scipy"]
        """)
    )
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        textwrap.dedent("""\
            import os
            import pytest, pluggy
            from . import sibling
            from fakepkg import other
            import scipy
            try:
                import scipy.ndimage
            except ImportError:
                pass

            def fine():
                from scipy import ndimage

            def broken():
                import torch
                import surely_no_such_module
        """)
    )
    assert undeclared_imports(pyproject, tmp_path, [package]) == [
        "fakepkg/mod.py:5 imports 'scipy' (distribution 'scipy'), which pyproject.toml does not declare"
        " in [project.dependencies] (imported when the module is)",
        "fakepkg/mod.py:7 imports 'scipy' (distribution 'scipy'), which pyproject.toml does not declare"
        " in [project.dependencies] (imported when the module is)",
        "fakepkg/mod.py:15 imports 'torch' (distribution 'torch'), which pyproject.toml does not declare",
        "fakepkg/mod.py:16 imports 'surely_no_such_module' (no installed distribution), which pyproject.toml"
        " does not declare",
    ]
