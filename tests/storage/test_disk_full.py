"""A full disk is called so (issue 25): one line with exit code 1, kind disk_full, naming the folder,
what was being written and its size, whether the free-space check catches it before the write or
the write itself fails (ENOSPC, or torch.save's stream-writer error on a full TMPDIR)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetune.core.context import run_main, step_context
from kubetune.errors import KubetuneError, exit_code_of
from kubetune.storage.shards import save_split
from kubetune.storage.store import LocalStore
from kubetune.training.checkpoint import Checkpoints

Usage = namedtuple("Usage", "total used free")
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 59562496 vs 59562448"


def assert_disk_full(e: BaseException, folder: Path | str, *words: str) -> str:
    msg = str(e)
    assert isinstance(e, KubetuneError) and e.kind == "disk_full" and exit_code_of(e) == 1, repr(e)
    assert "\n" not in msg and "no space left" in msg.lower(), msg
    assert str(folder) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.fixture
def ckpt(tmp_path) -> Checkpoints:
    return Checkpoints(LocalStore(tmp_path / "store"), "runs/r/checkpoints/finetune")


def state(mib: int) -> dict:
    return {"weights": {"w": torch.zeros(mib * 2**18)}, "progress": {"epoch": 0}}


def test_checkpoint_on_a_full_tmpdir_says_no_space(ckpt, monkeypatch):
    """torch.save fills TMPDIR and fails with its inline_container error: the one line names the folder."""
    full = []

    def save(obj, path):
        Path(path).write_bytes(b"x" * 100)
        full.append(path)
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2**30, 0, 10_000 if full else 2**30))
    with pytest.raises(Exception) as e:
        ckpt.save(state(1))
    msg = assert_disk_full(e.value, Path(full[0]).parent, "checkpoint state.pt", "1.0 MiB", "9.8 KiB free", "TMPDIR")
    assert Path(full[0]).parent.parent == Path(tempfile.gettempdir()).absolute(), msg


def test_checkpoint_is_refused_before_writing_when_it_cannot_fit(ckpt, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda *a: pytest.fail("written although it cannot fit"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2**30, 0, 10_000))
    with pytest.raises(Exception) as e:
        ckpt.save(state(2))
    assert_disk_full(e.value, Path(tempfile.gettempdir()).absolute(), "checkpoint state.pt", "about 2.0 MiB", "9.8 KiB free")


def test_a_torch_write_error_with_space_left_is_not_called_disk_full(ckpt, monkeypatch):
    def save(obj, path):
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ckpt.save(state(1))


def test_enospc_in_a_step_is_one_line_in_the_log_and_the_step_record(tmp_path, monkeypatch, capsys):
    def savez(path, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(np, "savez", savez)
    out = tmp_path / "tokens"

    def body():
        with step_context("tokenize", store_uri=str(tmp_path / "store"), run_id="r1"):
            save_split(out, "train", [[1, 2, 3]] * 1000, np.zeros(1000), 1000)

    assert run_main(body) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: no space left on device in ") and "\n" not in line, line
    assert str(out) in line and "train-00000.npz" in line and "KiB" in line, line
    record = LocalStore(tmp_path / "store").read_json("runs/r1/steps/tokenize.json")
    assert record["error"]["kind"] == "disk_full" and record["error"]["exit_code"] == 1, record
    assert record["error"]["message"] == line.removeprefix("error: ")


# ---- a real small filesystem, where this machine lets us mount one ---------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:  # lazily: a failed writer's file may still be open in a traceback
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_torch_save_on_a_full_tmpfs(small_fs, ckpt, monkeypatch):
    """The issue's case for real: TMPDIR on a small tmpfs and torch.save's own error (the early check is
    turned off so that torch really fills the disk)."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_fs))
    monkeypatch.setattr("kubetune.training.checkpoint.tensor_bytes", lambda s: 0, raising=False)
    with pytest.raises(Exception) as e:
        ckpt.save(state(16))
    assert_disk_full(e.value, small_fs, "checkpoint state.pt", "TMPDIR")


def test_real_shards_on_a_full_tmpfs(small_fs):
    rows = [list(range(1, 513))] * 8000  # 16 MiB of int32 ids
    with pytest.raises(Exception) as e:
        save_split(small_fs / "tokens", "train", rows, np.zeros(8000), 8000)
    assert_disk_full(e.value, small_fs / "tokens", "token shard train-00000.npz", "MiB")
