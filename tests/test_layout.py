"""The house: three layers (served core ← trainer ← serving tools), no import cycles, files a reader can hold.

The served core's own rule (it imports nothing outside itself, and the worker only the core) is checked
where the archive is built: tests/test_archive.py::test_the_packed_files_import_only_packed_files.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("training", "serving", "bench")
MAX_LINES = 350  # a file past this is asking to be split (../shared/STYLE.md says ~300)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts).removesuffix(".__init__")] = path
    return found


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports when it is imported (not those imported inside functions)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:  # `from training import loop` names a module; `from x import f` a name
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in known}


def test_no_module_imports_itself_back():
    known = modules()
    graph = {name: top_level_imports(path, set(known)) for name, path in known.items()}
    cycles, done, path_stack = [], set(), []

    def visit(node: str) -> None:
        if node in path_stack:
            cycles.append([*path_stack[path_stack.index(node):], node])
            return
        if node in done:
            return
        path_stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path_stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_trainer_never_imports_serving_and_the_core_never_the_trainer():
    known = modules()
    for name, path in known.items():
        imported = top_level_imports(path, set(known))
        if name.startswith("training"):
            assert not {m for m in imported if m.startswith(("serving", "bench"))}, name
        if name.startswith("training.core"):
            assert all(m.startswith("training.core") for m in imported), name


def test_the_predictor_imports_the_served_core_only_from_the_archive():
    """serving/predictor/ serves the code packed in the .mar (serving/predictor/archive.py imports it from
    there): this repository's training.core or serving.worker imported first would be served instead."""
    known = modules()
    for name, path in known.items():
        if name.startswith("serving.predictor"):
            imported = top_level_imports(path, set(known))
            assert imported <= {*(m for m in known if m.startswith("serving.predictor")), "serving.signing",
                                "serving.errors", "serving"}, (name, imported)
    probe = ("import sys, serving.predictor.__main__; "
             "print(sorted(m for m in sys.modules if m.startswith(('training.core', 'serving.worker'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_make_archive_does_not_import_torchserve():
    probe = "import sys, serving.archive; print(sorted(m for m in sys.modules if m == 'ts' or m.startswith('ts.')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", [*PACKAGES, "edge"])
def test_no_product_file_is_too_long_to_read(package):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / package).rglob("*.py")
            if "build" not in p.relative_to(ROOT).parts and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
