"""Imports run one way: launch.py / scripts -> coordinator -> drawing -> actors. Code that
runs in a node's process (actors/) never imports the coordinator or the drawing code, and
the drawing code (presentation) never imports the coordinator."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_no_module_in_actors_imports_the_coordinator():
    files = sorted((ROOT / "actors").glob("*.py"))
    assert len(files) > 10
    upward = [(f.name, m) for f in files for m in imported_modules(f) if m.split(".")[0] == "coordinator"]
    assert not upward, upward


def test_the_drawing_code_imports_neither_the_coordinator_nor_the_launcher():
    files = sorted((ROOT / "drawing").glob("*.py"))
    assert len(files) >= 2
    upward = [(f.name, m) for f in files for m in imported_modules(f) if m.split(".")[0] in ("coordinator", "launch")]
    assert not upward, upward


def test_actors_import_no_drawing():
    upward = [(f.name, m) for f in sorted((ROOT / "actors").glob("*.py")) for m in imported_modules(f)
              if m.split(".")[0] in ("drawing", "launch")]
    assert not upward, upward


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from coordinator.run import run_node\n    import actors.errors\n")
    assert list(imported_modules(probe)) == ["coordinator.run", "actors.errors"]
