"""Typed configuration: frozen dataclasses whose fields become command-line flags, and the
declaration of pipeline parameters on those fields.

A field that is also a pipeline parameter is declared with `param(default, help, ...)`: that one
declaration (name, type, default, one-line help) is the parameter table entry that
kubetune.pipelines.parameters collects, and from which the `kubetune run` flags, the pipeline
signature and docstring, and the values each KFP wrapper passes on are derived. A field fed by a
parameter declared on another config (e.g. the validate step's `seed`) uses `shared("seed", 0, help)`.
Every other field is declared with `opt(default, help)`: a command-line flag only, with its help (and
choices), never a pipeline parameter. `add_config_args` renders all three kinds as flags, so every
entry point's --help documents every field.
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


def shared(name: str, default: Any, help: str):
    """A config field that takes the value of the pipeline parameter `name`, declared on another config;
    `help` is its --help text as a flag of this config's entry point (the table keeps the declared one)."""
    return dataclasses.field(default=default, metadata={"param": Param(help, name, declared=False)})


@dataclass(frozen=True)
class Opt:
    help: str  # shown by --help
    choices: tuple = ()  # allowed values (argparse rejects others); empty: any value of the field's type


def opt(default: Any, help: str, *, choices: tuple = ()):
    """A config field that is a command-line flag only, not a pipeline parameter (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"opt": Opt(help, tuple(choices))})


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
    """One --flag per dataclass field, typed and defaulted from the field, help and choices from its
    Param or Opt. The one renderer of config flags: every entry point's config flags come from here."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = flag_type(f.default)
        info = f.metadata.get("param") or f.metadata.get("opt")
        if info is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare the field with param(), shared() or opt() (it needs a help text)")
        choices = {"choices": choices_of(info)} if info.choices else {}
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=info.help.replace("%", "%%"),
                            metavar=None if choices else "BOOL" if kind is parse_bool else kind.__name__.upper(),
                            **choices)  # argparse formats help with %; a field with choices shows them: {a,b}


def choices_of(p: Param | Opt) -> tuple:
    return tuple(p.choices() if callable(p.choices) else p.choices)


def config_from_args(cls, ns: argparse.Namespace, **overrides):
    return cls(**{**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}, **overrides})
