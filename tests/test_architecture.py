"""ARCHITECTURE.md stays true: its "how to add a step" example runs as written, and the
layout rules it states hold."""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_dataset, read_rejects
from typer.testing import CliRunner

import mmtools.cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"


def blocks() -> dict[str, str]:
    """The doc's Python blocks, by the path their first line names."""
    found = re.findall(r"```python\n# (\S+)\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(found)


@pytest.fixture
def example(monkeypatch):
    """The example step and command, loaded as the modules they would be."""
    code = blocks()
    loaded = {}
    for path, name in (
        ("mmtools/steps/min_words/step.py", "mmtools.steps.min_words.step"),
        ("mmtools/cli/min_words.py", "mmtools.cli.min_words"),
    ):
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(code[path], path, "exec"), module.__dict__)
        loaded[name] = module
    return loaded


def test_the_example_step_is_short_and_its_test_passes(example, tmp_path):
    code = blocks()
    assert len(code["mmtools/steps/min_words/step.py"].splitlines()) < 40
    namespace: dict = {}
    exec(compile(code["tests/test_min_words.py"], "test_min_words.py", "exec"), namespace)
    namespace["test_min_words_keeps_long_captions_and_accounts_for_every_row"](tmp_path)


def test_the_example_command_runs_with_the_shared_options(example, tmp_path, monkeypatch):
    monkeypatch.setattr(mmtools.cli, "COMMANDS", (*mmtools.cli.COMMANDS, "min-words"))
    app = mmtools.cli.app
    texts = ["one two three four", "short", None]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), tmp_path / "in.parquet")
    args = ["min-words", str(tmp_path / "in.parquet"), "--words", "4", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--shard-rows", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert read_dataset(tmp_path / "o")["id"].to_pylist() == ["a"]
    assert read_rejects(tmp_path / "o")["reason"].to_pylist() == ["no_text"]
    help_text = CliRunner().invoke(app, ["min-words", "--help"]).output
    assert "Example: mmtools min-words" in help_text and "--engine" in help_text


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_steps_never_import_an_engine_or_ray():
    for path in (ROOT / "mmtools" / "steps").rglob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] == "ray" or "engines" in n}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_each_step_package_keeps_its_class_in_step_py_and_only_reexports_in_init():
    for package in sorted(p for p in (ROOT / "mmtools" / "steps").iterdir() if p.is_dir()):
        if package.name == "__pycache__":
            continue
        assert (package / "step.py").exists(), f"{package.name} has no step.py"
        tree = ast.parse((package / "__init__.py").read_text())
        for node in tree.body:
            assert isinstance(node, ast.Import | ast.ImportFrom | ast.Assign | ast.Expr), (
                f"steps/{package.name}/__init__.py defines {type(node).__name__}: move it out"
            )


def test_no_function_outside_tests_is_over_60_lines():
    long = []
    for path in (ROOT / "mmtools").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, long
