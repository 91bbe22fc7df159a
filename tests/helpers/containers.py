"""The project's images, built and run with podman on this machine (tests/images/test_containers.py).

Where things come from (all prepared by `.ci/containers`, which `.ci/run` calls):
- `$KUBETUNE_CI_CACHE` (default /var/cache/kubetune-ci), a folder outside the clone that the machine
  keeps between runs: `containers.conf` (runc, ulimits: what podman needs on this machine), `wheels/`
  (every wheel of the lock the images install, the torch CPU wheel included, so a build needs no index);
- the base image `$KUBETUNE_TEST_BASE_IMAGE` (default localhost/debian-local:bookworm, made with
  debootstrap), since no image can be pulled here.

Without podman or those, the tests skip with the reason; with KUBETUNE_REQUIRE_CONTAINERS=1 (set by
.ci/run) the same condition fails them instead, so CI never skips them silently.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KUBETUNE_CI_CACHE", "/var/cache/kubetune-ci"))
BASE_IMAGE = os.environ.get("KUBETUNE_TEST_BASE_IMAGE", "localhost/debian-local:bookworm")
REQUIRE = os.environ.get("KUBETUNE_REQUIRE_CONTAINERS") == "1"
TAG_PREFIX = "localhost/kubetune-test"
IMAGES = ("runtime", "trainer", "serving")
SAFE = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9._/:@+-]*$")  # image names, tags, paths we pass to podman


def unavailable_or_fail(reason: str):
    """Skip with `reason` on a developer machine; fail in CI (KUBETUNE_REQUIRE_CONTAINERS=1)."""
    if REQUIRE:
        pytest.fail(f"container tests cannot run: {reason} (KUBETUNE_REQUIRE_CONTAINERS=1: CI must not skip them)")
    pytest.skip(f"container tests skipped: {reason}; run .ci/containers to set them up")


def checked(*values: str) -> None:
    for v in values:
        if not SAFE.match(str(v)):
            raise ValueError(f"refusing to pass {v!r} to podman")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["CONTAINERS_CONF"] = str(CACHE / "containers.conf")
    return e


def podman(*args: str, timeout: float = 600, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=env(), capture_output=capture, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{(proc.stderr or '')[-6000:]}")
    return proc


def preflight() -> None:
    """Skip (or fail in CI) unless podman, its config, the base image and the wheels are here."""
    if shutil.which("podman") is None:
        unavailable_or_fail("podman is not installed")
    if not (CACHE / "containers.conf").is_file():
        unavailable_or_fail(f"{CACHE / 'containers.conf'} is missing")
    wheels = CACHE / "wheels"
    if not wheels.is_dir() or not any(wheels.glob("torch-*.whl")):
        unavailable_or_fail(f"no wheelhouse with torch in {wheels}")
    if podman("image", "exists", BASE_IMAGE, check=False, timeout=60).returncode != 0:
        unavailable_or_fail(f"base image {BASE_IMAGE} does not exist")


def build(image: str, tag: str) -> dict:
    """Build images/<image>/Dockerfile from the repository root on the local base image, with pip
    reading only the wheelhouse (mounted read-only). Returns build seconds and image size."""
    checked(image, tag, BASE_IMAGE, str(CACHE))
    t0 = time.perf_counter()
    proc = podman("build", "--pull=never", "--network=host", f"--volume={CACHE / 'wheels'}:/wheels:ro",
                  f"--build-arg=BASE_IMAGE={BASE_IMAGE}", "--build-arg=WHEELS=/wheels",
                  f"--file={ROOT / 'images' / image / 'Dockerfile'}", f"--tag={tag}", str(ROOT), timeout=1800, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AssertionError(f"building images/{image}/Dockerfile failed:\n{(proc.stdout or '')[-4000:]}\n{(proc.stderr or '')[-4000:]}")
    size = int(podman("image", "inspect", "--format={{.Size}}", tag).stdout.strip())
    return {"seconds": round(seconds, 1), "size_bytes": size}


def prune_replaced_builds() -> None:
    """Remove the untagged images that earlier builds of the project's images left (a rebuild moves
    the tag; the old image stays dangling). Only dangling images with the project's label: the layer
    cache of the tagged images and anything else on the machine stay."""
    for title in ("kubetune", "kubetune-cuda", "kubetune-serving"):  # images/*/Dockerfile's LABEL
        podman("image", "prune", "--force", "--filter", f"label=org.opencontainers.image.title={title}", check=False, timeout=300)


@contextlib.contextmanager
def docker_socket():
    """`podman system service` on a private socket, for the docker SDK that kfp.local.DockerRunner
    uses (DOCKER_HOST). Stopped by its PID afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="kt-test-podman-"))
    sock = folder / "podman.sock"
    log = open(folder / "service.log", "wb")
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env(), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"podman system service did not start:\n{(folder / 'service.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def running(tag: str, args: list[str], *, name: str, options: list[str]):
    """`podman run -d` a container, yield its name, and remove it afterwards (logs kept in the error)."""
    checked(tag, name)
    podman("run", "--detach", f"--name={name}", *options, tag, *args, timeout=120)
    try:
        yield name
    finally:
        podman("rm", "--force", "--time=5", name, check=False, timeout=120)


def logs(name: str) -> str:
    proc = podman("logs", name, check=False, timeout=60)
    return (proc.stdout or "") + (proc.stderr or "")


def world_readable_copy(src: Path, dest: Path) -> Path:
    """A copy of `src` that the image's non-root user can read (pytest's temp folders are 0700 root),
    the way KServe's storage initializer leaves /mnt/models readable to the predictor."""
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest
