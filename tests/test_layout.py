"""The architecture, checked from the source: one installed package, no kfp in the steps and their
libraries, no import cycle, no private name used across modules, and no task-name branches outside
the tasks package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "components"  # the package `kubetune`
WIRING = ROOT / "pipelines"  # `kubetune.pipelines`
TASK_NAMES = re.compile(r"token-classification|sequence-classification|\bTOKEN\b|\bSEQUENCE\b")


def module_name(path: Path) -> str:
    base, prefix = (WIRING, "kubetune.pipelines") if path.is_relative_to(WIRING) else (LIBRARY, "kubetune")
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join((prefix, *[p for p in parts if p != "__init__"]))


def sources() -> dict[str, Path]:
    return {module_name(p): p for base in (LIBRARY, WIRING) for p in sorted(base.rglob("*.py"))}


def imports(path: Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(module, names) imported by `path`: at module level only, or everywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_the_package_list_is_every_source_folder():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for base in (LIBRARY, WIRING) for p in base.rglob("__init__.py")}
    assert declared == folders


def test_the_source_folders_are_not_importable_under_their_own_names():
    for name in ("components", "pipelines"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode != 0 and "is the source folder of" in proc.stderr, name


def test_steps_and_libraries_never_import_kfp():
    for name, path in sources().items():
        if name.startswith("kubetune.pipelines"):
            continue
        used = [m for m, _ in imports(path, top_level_only=False) if m.split(".")[0] == "kfp"]
        assert not used, f"{path.relative_to(ROOT)} imports {used}"


def test_no_import_cycle_at_module_level():
    graph = {name: {m for m, _ in imports(path, top_level_only=True) if m in sources()} for name, path in sources().items()}
    for name, path in sources().items():  # `from kubetune.x import y` may import the module kubetune.x.y
        graph[name] |= {f"{m}.{n}" for m, names in imports(path, top_level_only=True) for n in names if f"{m}.{n}" in graph}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_private_name_is_imported_across_modules():
    for path in sources().values():
        for module, names in imports(path, top_level_only=False):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not (module.startswith("kubetune") and private), f"{path.relative_to(ROOT)} imports {private} from {module}"


def test_steps_do_not_branch_on_task_names():
    """What differs between task families lives in kubetune.tasks; elsewhere only the parameter
    table and the CLI may name them."""
    allowed = {LIBRARY / "tasks", WIRING / "parameters.py", WIRING / "cli.py"}
    found = []
    for path in sources().values():
        if any(path == a or path.is_relative_to(a) for a in allowed):
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                  if TASK_NAMES.search(line)]
    assert found == []


def string_constants(path: Path) -> list[str]:
    """The string literals of `path`'s code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_artifact_files_are_read_and_written_in_one_module():
    """meta.json, kubetune.json and labels.json are kubetune.storage.contracts' (typed, versioned)."""
    named = {str(p.relative_to(ROOT)) for p in sources().values()
             if {"meta.json", "kubetune.json", "labels.json"} & set(string_constants(p))}
    assert named == {"components/storage/contracts.py"}


def test_the_store_flag_is_declared_once():
    declared = [str(p.relative_to(ROOT)) for p in sources().values() for line in p.read_text().splitlines()
                if "add_argument(" in line and '"--store"' in line]
    assert declared == ["components/core/context.py"]
