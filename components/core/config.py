"""Typed configuration: frozen dataclasses whose fields become command-line flags, and the
declaration of pipeline parameters on those fields.

A field that is also a pipeline parameter is declared with `param(default, help, ...)`: that one
declaration (name, type, default, one-line help) is the parameter table entry that
kubetune.pipelines.parameters collects, and from which the `kubetune run` flags, the pipeline
signature and docstring, and the values each KFP wrapper passes on are derived. A field fed by a
parameter declared on another config (e.g. the validate step's `seed`) uses `shared("seed", 0)`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Param:
    help: str  # one line, shown by --help, in the pipeline's docstring and the Kubeflow run form
    name: str = ""  # pipeline parameter name; empty: the field's name
    flag: str = ""  # `kubetune run` flag; empty: --<name with dashes>; "-": no flag (cluster-only)
    choices: tuple | Callable[[], tuple] = ()  # allowed values, or a function giving them (computed when a parser is built)
    invert: bool = False  # a bool whose flag switches it off (--no-header for header=True)
    declared: bool = True  # False: fed by a parameter declared on another config (shared)


def param(default: Any, help: str, *, name: str = "", flag: str = "", choices: tuple | Callable[[], tuple] = (), invert: bool = False):
    """A config field that is a pipeline parameter (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"param": Param(help, name, flag, choices, invert)})


def shared(name: str, default: Any):
    """A config field that takes the value of the pipeline parameter `name`, declared on another config."""
    return dataclasses.field(default=default, metadata={"param": Param("", name, declared=False)})


def params_of(cls) -> list[tuple[dataclasses.Field, Param]]:
    """(field, Param) of every field of `cls` fed by a pipeline parameter, with the Param's name filled in."""
    out = []
    for f in dataclasses.fields(cls):
        p = f.metadata.get("param")
        if p is not None:
            out.append((f, dataclasses.replace(p, name=p.name or f.name)))
    return out


def from_params(cls, values: Mapping[str, Any], **overrides):
    """`cls` with every parameter-fed field taken from `values` (pipeline parameter name -> value)
    where present; the other fields keep their defaults unless given in `overrides`."""
    kwargs = {f.name: values[p.name] for f, p in params_of(cls) if p.name in values}
    return cls(**{**kwargs, **overrides})


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def flag_type(default: Any):
    return parse_bool if isinstance(default, bool) else type(default)


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field, typed and defaulted from the field (help from its Param)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = flag_type(f.default)
        p = f.metadata.get("param")
        choices = {"choices": choices_of(p)} if p and p.choices else {}
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, metavar=kind.__name__.upper(),
                            help=p.help.replace("%", "%%") if p and p.declared else None, **choices)  # argparse formats help with %


def choices_of(p: Param) -> tuple:
    return tuple(p.choices() if callable(p.choices) else p.choices)


def config_from_args(cls, ns: argparse.Namespace, **overrides):
    return cls(**{**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}, **overrides})
