"""A `kubetune serve` process on a free local port, for tests and benchmarks/serve_batching.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.exit_code: int | None = None  # after the context: how the process ended on SIGTERM

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {server.proc.returncode}:\n{server.output()[-4000:]}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(server.url + "/v2/health/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout:.0f}s:\n{server.output()[-4000:]}")


@contextlib.contextmanager
def running_server(args: list[str], env: dict | None = None, timeout: float = 180) -> Iterator[Server]:
    """`kubetune serve ARGS --port <free>` as a real process; stopped with SIGTERM on exit (and its
    exit code checked: a clean shutdown is part of what a pod needs)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="kubetune-serve-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.pipelines.cli", "serve", *args, "--port", str(port)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.exit_code = proc.returncode
        log.unlink(missing_ok=True)


def assert_same_predictions(served: list[dict], expected: list[dict]) -> None:
    """Labels equal; probabilities equal up to float noise (a micro-batch pads texts to a different
    length than a standalone call, which changes the last bits of the logits)."""
    assert len(served) == len(expected)
    for s, e in zip(served, expected):
        assert s["label"] == e["label"] and list(s["probabilities"]) == list(e["probabilities"])
        assert s["score"] == pytest.approx(e["score"], abs=1e-5)
        assert list(s["probabilities"].values()) == pytest.approx(list(e["probabilities"].values()), abs=1e-5)
