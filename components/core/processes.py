"""This process's descendants (read from /proc, Linux), and stopping them: SIGTERM, a grace period,
then SIGKILL for what is left. Elsewhere (no /proc) there are no descendants to find."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")
KILL_WAIT_S = 5.0  # at most this long for SIGKILLed processes to be gone


def _stat(pid: int, proc: Path = PROC) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it is gone. The name in parentheses may hold spaces."""
    try:
        fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int, proc: Path = PROC) -> list[int]:
    """Every live process below `root` (children, grandchildren, ...), parents before children."""
    parents = {}
    for entry in proc.glob("[0-9]*"):
        if (st := _stat(int(entry.name), proc)) is not None:
            parents[int(entry.name)] = st[1]
    found, frontier = [], {root}
    while frontier:
        kids = sorted(p for p, pp in parents.items() if pp in frontier and p not in found and p != root)
        found += kids
        frontier = set(kids)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, counts as gone)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_descendants(root: int | None = None, grace: float = 10.0, sig: int = signal.SIGTERM) -> list[int]:
    """Send `sig` to every descendant of `root` (this process by default), wait up to `grace`
    seconds for them to exit, then SIGKILL the survivors (and any process they started meanwhile).
    Returns the PIDs that had to be killed."""
    root = os.getpid() if root is None else root
    pids = descendants(root)
    _signal(pids, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    survivors = [p for p in dict.fromkeys(pids + descendants(root)) if alive(p)]
    _signal(survivors, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S  # SIGKILL is not instant on a busy machine: see them gone
    while time.monotonic() < deadline and any(alive(p) for p in survivors):
        time.sleep(0.05)
    return survivors
