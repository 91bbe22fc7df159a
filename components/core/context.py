"""The step context: what a step process needs, built once per process, and the `python -m` plumbing.

    with step_context("tokenize", store_uri=store, run_id=run_id, config=asdict(cfg)) as ctx:
        ...  # ctx.store, ctx.settings (S3, read from the environment here and nowhere else),
             # ctx.record (runs/<run_id>/), ctx.scratch (a private temp folder), ctx.outputs
        ctx.outputs["cache"] = "hit"

On exit the step record runs/<run_id>/steps/<step>.json holds its status, seconds and outputs (or
its error, with kind and exit code), and the scratch folder is removed, on success and on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kubetune.errors import ConfigError, KubetuneError
from kubetune.storage.records import RunRecord
from kubetune.storage.store import S3Settings, Store, open_store

DEFAULT_STORE = "./kubetune-store"  # the local commands' store (kubetune run, serve, infer, deploy, ...)
STORE_HELP = "local folder or s3://bucket/prefix"


@dataclass
class StepContext:
    step: str
    settings: S3Settings
    store: Store | None
    record: RunRecord | None
    scratch: Path
    outputs: dict = field(default_factory=dict)
    _n: int = 0

    def tmp(self, name: str) -> Path:
        """A new, empty folder under the step's scratch folder."""
        self._n += 1
        path = self.scratch / f"{self._n:02d}-{name}"
        path.mkdir(parents=True)
        return path


@contextlib.contextmanager
def step_context(step: str, *, store_uri: str = "", run_id: str = "", config: dict | None = None,
                 record: bool = True) -> Iterator[StepContext]:
    """A StepContext; with `record` (and a store and run id), the body is recorded as the step
    `step` of the run. `record=False`: no step record (e.g. the non-main ranks of a DDP job)."""
    if run_id and not store_uri:
        raise ConfigError(f"run id {run_id!r} given without a store")
    settings = S3Settings.from_env()
    store = open_store(store_uri, settings) if store_uri else None
    run = RunRecord(store, run_id) if store is not None and run_id else None
    scratch = Path(tempfile.mkdtemp(prefix=f"kubetune-{step}-"))
    ctx = StepContext(step, settings, store, run, scratch)
    try:
        if run is not None and record:
            with run.step(step, config) as entry:
                entry["outputs"] = ctx.outputs  # the same dict: what the body adds is recorded, on failure too
                yield ctx
        else:
            yield ctx
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def step_parser(module: str, doc: str, *, run: bool = True) -> argparse.ArgumentParser:
    """`python -m <module>` parser; with `run`, the arguments every pipeline step takes: where the
    store is and which run the records belong to."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().split("\n\n")[0])
    if run:
        add_store_arg(p, required=True)  # the pipeline always passes it
        p.add_argument("--run-id", required=True, help="records go to <store>/runs/<run-id>/")
    return p


def add_store_arg(parser, *, required: bool = False, default: str = DEFAULT_STORE, help: str = "") -> None:
    """The --store flag of every command (declared here only): `required`, or `default` (DEFAULT_STORE
    unless a command means another store, e.g. the compiled pipeline's default); `help` adds what the
    command keeps there."""
    text = STORE_HELP + (f" ({help})" if help else "")
    parser.add_argument("--store", **({"required": True} if required else {"default": default}), help=text)


def run_main(fn: Callable[[], Any]) -> int:
    """Run an entry point's body: a KubetuneError becomes its exit code (errors.py) and one line on stderr."""
    try:
        fn()
    except KubetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
