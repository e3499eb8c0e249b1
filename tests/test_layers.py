"""The layers of README's "Project layout": nothing imports upward, data/ and dataloaders/ do not
import each other, and no project import hides inside a function (where it would hide a cycle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGES = ("data", "dataloaders", "models", "evaluation", "configs", "launch", "scripts", "training", "validation")


def layer(module: str) -> tuple[int, str]:
    """(layer, group) of a module path like 'models.engine.trainer'."""
    parts = module.split(".")
    if parts[:2] == ["data", "core"]:
        return 0, "core"
    if parts[0] in ("data", "dataloaders"):
        return 1, parts[0]
    if parts[:2] == ["models", "engine"]:
        return 3, "engine"
    if parts[0] in ("models", "evaluation"):
        return 2, parts[0]
    if parts[0] == "configs":
        return 4, "configs"
    if parts[0] == "launch":
        return 5, "launch"
    return 6, "commands"                      # training.py, validation.py, scripts/


def project_sources() -> list[Path]:
    return sorted(p for p in PROJECT_ROOT.rglob("*.py")
                  if p.relative_to(PROJECT_ROOT).parts[0] in PACKAGES or p.parent == PROJECT_ROOT
                  if ".venv" not in p.parts)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)


def project_imports(path: Path):
    """(imported module, line, inside a function?) for every import of a project module."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name, node.lineno, id(node) not in top


def test_configs_hold_no_process_code():
    """configs/ is declarative (YAML and the experiment's assembly): launching lives in launch/."""
    for path in sorted((PROJECT_ROOT / "configs").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"subprocess", "threading", "submitit", "multiprocessing"}, path


def test_the_sources_are_found():
    names = {module_name(p) for p in project_sources()}
    assert {"data.core.io", "models.engine.trainer", "configs.experiment", "evaluation.protocol",
            "launch.sweep", "training"} <= names


@pytest.mark.parametrize("path", project_sources(), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_imports_follow_the_layers(path):
    source = module_name(path)
    source_layer, source_group = layer(source)
    problems = []
    for target, line, nested in project_imports(path):
        target_layer, target_group = layer(target)
        if nested:
            problems.append(f"line {line}: {target} imported inside a function")
        if target_layer > source_layer:
            problems.append(f"line {line}: {target} (layer {target_layer}) imported from layer {source_layer}")
        if source_layer == target_layer and source_layer in (1, 2) and source_group != target_group:
            problems.append(f"line {line}: {target} imported from {source_group}/ ({target_group}/ and "
                            f"{source_group}/ stay apart)")
    assert not problems, f"{source}: " + "; ".join(problems)
