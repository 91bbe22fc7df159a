"""Run records: what each step did, kept in the store under runs/<run_id>/.

  runs/<run_id>/run.json              the run's parameters (written by validate)
  runs/<run_id>/steps/<step>.json     status, seconds, outputs or error, one per step
  runs/<run_id>/validation/...        expectation results and the readable report
  runs/<run_id>/evaluation.json       metrics and the gate decision
  runs/<run_id>/export.json           ONNX parity figures
  runs/<run_id>/deployment.json       registry version and manifest
  runs/<run_id>/summary.json          everything above in one document (kubetune.steps.summary)

The records live in the store, not in KFP's artifact store, so they exist the same way for a local
run and a cluster run, also for a step that failed (KFP uploads no outputs of a failed task).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from kubetune.core.progress import log
from kubetune.errors import ConfigError, exit_code_of
from kubetune.storage.store import NotFound, Store, join

STEPS = ("validate", "tokenize", "finetune", "evaluate", "export", "deploy")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunRecord:
    def __init__(self, store: Store, run_id: str):
        if not run_id or "/" in run_id:
            raise ConfigError(f"run id {run_id!r}: must be non-empty and contain no '/'")
        self.store, self.run_id = store, run_id
        self.prefix = join("runs", run_id)

    def key(self, *parts: str) -> str:
        return join(self.prefix, *parts)

    def write_json(self, rel: str, obj: Any) -> str:
        self.store.write_json(self.key(rel), obj)
        return self.store.url(self.key(rel))

    def write_text(self, rel: str, text: str) -> str:
        self.store.write_text(self.key(rel), text)
        return self.store.url(self.key(rel))

    def read_json(self, rel: str, default: Any = None) -> Any:
        try:
            return self.store.read_json(self.key(rel))
        except NotFound:
            return default

    @contextlib.contextmanager
    def step(self, name: str, config: dict | None = None) -> Iterator[dict]:
        """Times the body and writes steps/<name>.json with its outcome. The body may add entries
        to the yielded dict (e.g. "outputs"). Errors are recorded, then re-raised."""
        record: dict[str, Any] = {"name": name, "status": "running", "started_at": utc_now(), "config": config or {}}
        log(name, "started")
        t0 = time.perf_counter()
        try:
            yield record
        except BaseException as e:
            record.update(
                status="failed",
                seconds=round(time.perf_counter() - t0, 3),
                error={
                    "kind": getattr(e, "kind", "error"),
                    "exit_code": exit_code_of(e),
                    "type": type(e).__name__,
                    "message": str(e),
                },
            )
            log(name, f"FAILED after {record['seconds']:.1f}s: {type(e).__name__}: {e}")
            with contextlib.suppress(Exception):  # the store itself may be what failed
                self.write_json(f"steps/{name}.json", record)
            raise
        record.update(status="succeeded", seconds=round(time.perf_counter() - t0, 3))
        self.write_json(f"steps/{name}.json", record)
        log(name, f"done in {record['seconds']:.1f}s")
