"""Finding and stopping this process's descendants (the `kubetune run` SIGTERM path, issue 25)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from kubetune.core.processes import alive, descendants, stop_descendants

# a child that ignores SIGTERM and has a child of its own
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)")


def test_stop_descendants_kills_what_ignores_sigterm():
    # stop the processes below a shell, not below this test process (a session fixture's server lives there)
    shell = subprocess.Popen(["sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(STUBBORN)}; true"], stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout.readline() == "up\n"
        family = descendants(shell.pid)
        assert len(family) == 2  # the stubborn child, then its own child
        t0 = time.monotonic()
        killed = stop_descendants(shell.pid, grace=0.5)
        assert 0.5 <= time.monotonic() - t0 < 10
        assert killed == family  # both ignore SIGTERM (an ignored signal stays ignored across exec): SIGKILL after the grace
        shell.wait(5)
        assert not any(alive(p) for p in family) and not alive(shell.pid)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
