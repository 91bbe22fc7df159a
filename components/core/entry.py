"""Shared plumbing for the `python -m components.<step>` entry points: typed config dataclasses
become command-line flags, and a KubetuneError becomes its exit code with a one-line message."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

from kubetune.errors import KubetuneError


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def step_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """`python -m components.<step>` parser with the arguments every step takes: where the store
    is and which run the records belong to."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().split("\n\n")[0])
    p.add_argument("--store", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--run-id", required=True, help="records go to <store>/runs/<run-id>/")
    return p


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field, typed and defaulted from the field."""
    for f in dataclasses.fields(cls):
        kind = _bool if isinstance(f.default, bool) else type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, metavar=kind.__name__.upper())


def config_from_args(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def run_main(fn: Callable[[], object]) -> int:
    try:
        fn()
    except KubetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
