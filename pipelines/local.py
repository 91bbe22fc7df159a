"""Run a pipeline on this machine with kfp.local's SubprocessRunner (every task a local Python
subprocess; the same compiled pipeline a cluster runs).

kfp.local echoes every line each task prints, including the executor's JSON dumps. The full stream
goes to a log file; the terminal gets the "[kubetune <step>]" lines (progress, timings, warnings,
errors) unless `verbose` is set.

SIGTERM or SIGINT to the run (a supervisor, `timeout`, CI, a pod stopping) stops its step processes
too - SIGTERM, STOP_GRACE_S seconds, then SIGKILL - and raises Cancelled (exit 143 / 130): a step is
never left running alone, writing into the store.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, TextIO

from kubetune.core.processes import stop_descendants
from kubetune.core.progress import MARK
from kubetune.errors import Cancelled

STOP_GRACE_S = 10.0  # how long the step processes get to exit after SIGTERM before SIGKILL


class _Filter(io.TextIOBase):
    def __init__(self, log: TextIO, terminal: TextIO, verbose: bool):
        self.log, self.terminal, self.verbose, self.pending = log, terminal, verbose, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if self.verbose or line.lstrip().startswith(MARK):
                self.terminal.write(line.strip() + "\n" if not self.verbose else line + "\n")
        self.terminal.flush()
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


def run_locally(pipeline: Callable, arguments: dict, *, pipeline_root: Path, log_path: Path, verbose: bool = False) -> None:
    """Run `pipeline(**arguments)` under kfp.local. Task failures do not raise: the outcome is read
    from the run records afterwards (the exit handler always writes the summary)."""
    from kfp import local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=False)
    terminal = sys.stdout
    with open(log_path, "a", encoding="utf-8") as log:
        stream = _Filter(log, terminal, verbose)
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            pipeline(**arguments)
        stream.flush()


@contextlib.contextmanager
def stop_steps_on_signal(grace: float = STOP_GRACE_S) -> Iterator[None]:
    """While inside: SIGTERM/SIGINT stop every descendant process (SIGTERM, `grace` seconds, SIGKILL),
    then raise Cancelled in the main thread. The previous handlers are restored on the way out."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    stopping = False

    def handler(signum: int, frame) -> None:
        nonlocal stopping
        if stopping:  # a second signal while the steps are being stopped: already on it
            return
        stopping = True
        print(f"\nkubetune run: {signal.Signals(signum).name}: stopping the step processes", file=sys.__stderr__, flush=True)
        stop_descendants(grace=grace)
        raise Cancelled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
