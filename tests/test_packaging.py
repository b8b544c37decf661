"""The package metadata promises only what the code keeps."""

from __future__ import annotations

import ast
import tomllib
import warnings
from pathlib import Path

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

REPO = Path(__file__).resolve().parents[1]

# Standard-library names that appeared in Python 3.11 (what the sources may use).
PYTHON_311 = {
    ("asyncio", "Runner"),
    ("asyncio", "TaskGroup"),
    ("asyncio", "timeout"),
    ("datetime", "UTC"),
    ("enum", "StrEnum"),
    ("typing", "Self"),
    ("typing", "assert_never"),
}


def _uses_311(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in PYTHON_311:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} from {node.module} import {a.name}"
                for a in node.names
                if (node.module, a.name) in PYTHON_311 or node.module == "tomllib"
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} tomllib"
                for a in node.names
                if a.name == "tomllib"
            ]
    return found


def test_requires_python_covers_what_the_code_uses() -> None:
    """``requires-python`` says 3.11 when the installed packages use 3.11 APIs (the service's
    event loop runs on ``asyncio.Runner``), so pip refuses a 3.10 interpreter up front instead
    of every service entry point failing at start."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"].startswith(">=")
    major, minor = (int(x) for x in meta["requires-python"][2:].split(".")[:2])
    used = [
        u
        for pkg in ("service", "sketch", "clients")
        for f in sorted((REPO / pkg).rglob("*.py"))
        for u in _uses_311(f)
    ]
    assert used, "the scan finds asyncio.Runner in service/loop.py"
    assert (major, minor) >= (3, 11), used


def test_the_build_reads_the_metadata_without_deprecations() -> None:
    """setuptools reads ``pyproject.toml`` without a deprecation warning: the table form of
    ``project.license`` stops building on 2027-02-18, and the declared licence ships its text."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


def _message_prefix(node: ast.expr) -> str:
    """The literal start of a message: a string, or an f-string's first literal part."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _message_prefix(node.values[0])
    return ""


def test_every_warning_says_it_is_kernelscopes() -> None:
    """Every warning the packages give starts with ``kernelscope:``, so that a trainer's log
    says whose it is and ``warnings.filterwarnings(..., message="kernelscope:")`` reaches all
    of them (docs/trl.md, "Warnings")."""
    calls = []
    for pkg in ("service", "sketch", "clients"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "warn"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "warnings"
                ):
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", node.args[0]))
    assert len(calls) >= 10
    unnamed = [
        where
        for where, message in calls
        if not _message_prefix(message).startswith("kernelscope: ")
    ]
    assert not unnamed, unnamed
