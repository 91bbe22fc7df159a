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
