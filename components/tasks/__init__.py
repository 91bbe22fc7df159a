"""The task families kubetune trains, by name. Each lives in one module that defines everything
particular to it (kubetune.tasks.base describes the interface); adding a family is a new module and
one line here. Modules are imported on first use: no cycle with the libraries they use, and no
heavy import before a task is needed.

    python -c "from kubetune import tasks; print(tasks.names())"
"""

from __future__ import annotations

import importlib

from kubetune.errors import ConfigError

REGISTRY = {
    "sequence-classification": "kubetune.tasks.sequence",
    "token-classification": "kubetune.tasks.token",
    "pair-classification": "kubetune.tasks.pair",
    "multiple-choice": "kubetune.tasks.choice",
}
DEFAULT = "sequence-classification"


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str):
    """The Task of `name` (kubetune.tasks.base.Task), or a ConfigError listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"task {name!r}: use {' or '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).TASK


def _usable(task, gate: bool) -> tuple[str, ...]:
    return task.metrics + (task.gate_only_metrics if gate else ())


def all_metrics(gate: bool = False) -> list[str]:
    """Every metric any task can select on (`gate`: or gate on), in registry order."""
    return list(dict.fromkeys(m for name in REGISTRY for m in _usable(get(name), gate)))


def resolve_metric(task_name: str, metric: str, what: str, gate: bool = False) -> str:
    """`metric`, or the task's default when empty; a ConfigError when the task cannot score it (on
    the eval split; `gate`: on the test split, where ranking metrics see whole candidate lists)."""
    task = get(task_name)
    metric = metric or task.default_metric
    usable = _usable(task, gate)
    if metric not in usable:
        other = next((n for n in REGISTRY if metric in _usable(get(n), gate)), None)
        why = (f"it is a {other} metric" if other else
               "it is a test-split metric only the gate can use" if metric in task.gate_only_metrics else "it is not a known metric")
        raise ConfigError(f"{what}={metric!r} cannot score a {task.name} model: {why}; use one of {', '.join(usable)} "
                          f"(empty: {task.default_metric})")
    return metric
