"""`kubetune gc` (issue 12): stale leftovers of killed writers go (local .tmp- folders and files;
S3 unsealed version objects, .tmp- objects, unfinished multipart uploads), anything inside the
grace period and every sealed version stay, old versions are only listed and never the aliased
ones. gc looks only inside the store it is given (tmp_path stores here, never $TMPDIR)."""

from __future__ import annotations

import os
import time

import pytest

from kubetune.pipelines.cli import main
from kubetune.release import gc, registry
from kubetune.storage.store import S3Settings, open_store

NAME = "sms-spam"
HOUR = 3600


def publish(store, tmp_path, run: str) -> str:
    version = registry.new_version(run)
    folder = tmp_path / f"stage-{run}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx" * 100)
    assert store.publish_dir(folder, registry.version_prefix(NAME, version))
    return version


def age(path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_local_gc_removes_only_stale_leftovers_and_lists_unaliased_old_versions(tmp_path, capsys):
    store = open_store(str(tmp_path / "store"))
    versions = [publish(store, tmp_path, f"r{i}-aaaa{i}") for i in range(4)]
    time.sleep(0)  # versions are per-second: distinct run tails keep them unique
    for v in versions:
        registry.set_alias(store, NAME, registry.PRODUCTION, v, "r")
    registry.set_alias(store, NAME, registry.PRODUCTION, versions[0], "r")  # production: the oldest, previous: the newest
    models = store.root / "models" / NAME
    killed = models / ".v20260101-000000-dead.tmp-0badf00d"  # a publish killed midway
    (killed / "sub").mkdir(parents=True)
    (killed / "sub" / "model.onnx").write_bytes(b"x" * 1000)
    age(killed, 48 * HOUR)
    running = models / ".v20260101-000001-live.tmp-00c0ffee"  # a publish running right now
    running.mkdir()
    (running / "model.onnx").write_bytes(b"y")
    half_write = models / "aliases" / ".production.json.tmp-1234abcd"
    half_write.write_text("{")
    age(half_write, 30 * HOUR)
    outside = tmp_path / ".outside.tmp-99999999"  # not in the store: never looked at
    outside.mkdir()
    age(outside, 100 * HOUR)

    assert main(["gc", "--store", str(store.root), "--keep-versions", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and killed.exists() and half_write.exists()
    assert main(["gc", "--store", str(store.root), "--keep-versions", "1"]) == 0
    out = capsys.readouterr().out
    assert not killed.exists() and not half_write.exists()
    assert running.exists() and outside.exists()
    assert "inside the grace period" in out and running.name in out
    assert registry.versions(store, NAME) == versions  # sealed versions untouched
    alias = registry.read_alias(store, NAME)
    assert alias["version"] == versions[0] and alias["previous"] == versions[3]
    # keep 1 (the newest, also `previous`), protect production and previous: the middle two are listed
    assert f"{NAME}: 2 old version(s)" in out and f"{versions[1]} {versions[2]}" in out
    assert gc.old_versions(store, NAME, keep=0) == versions[1:3]


def test_gc_refuses_a_missing_store_and_bad_values(tmp_path, capsys):
    assert main(["gc", "--store", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "nope").exists()
    with pytest.raises(Exception, match=">= 0"):
        gc.collect(open_store(str(tmp_path / "s")), grace_s=-1, keep_versions=1)


def test_s3_gc_removes_unsealed_objects_and_aborts_stale_uploads(s3_bucket, tmp_path):
    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}/kt", settings)
    sealed = publish(store, tmp_path, "r1-aaaa")
    registry.set_alias(store, NAME, registry.PRODUCTION, sealed, "r")
    unsealed = registry.version_prefix(NAME, "v20260101-000000-dead")
    store.write_bytes(f"{unsealed}/model.onnx", b"half a model")  # kill -9 before the seal
    store.write_bytes("runs/r1/.summary.json.tmp-abcdef12", b"{")
    client = settings.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key=f"kt/{unsealed}/model.onnx.part")["UploadId"]
    client.upload_part(Bucket=s3_bucket, Key=f"kt/{unsealed}/model.onnx.part", UploadId=upload, PartNumber=1, Body=b"p" * 1024)

    fresh = gc.collect(store, grace_s=HOUR, keep_versions=5)  # everything was just written: nothing goes
    assert fresh.removed == [] and fresh.aborted == [] and len(fresh.too_recent) == 3
    later = gc.collect(store, grace_s=HOUR, keep_versions=5, now=time.time() + 2 * HOUR)
    assert sorted(later.removed) == sorted([f"{unsealed}/model.onnx", "runs/r1/.summary.json.tmp-abcdef12"])
    assert len(later.aborted) == 1 and upload in later.aborted[0]
    assert store.list(unsealed) == [] and not store.exists("runs/r1/.summary.json.tmp-abcdef12")
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert registry.versions(store, NAME) == [sealed] and registry.read_alias(store, NAME)["version"] == sealed


PUBLISH = """
import sys
from pathlib import Path
from kubetune.storage.store import S3Settings, open_store
store = open_store(sys.argv[1], S3Settings.from_env())
store.publish_dir(Path(sys.argv[2]), sys.argv[3])
"""


def big_folder(tmp_path, files: int, size: int):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(files):
        (folder / f"part{i:03d}.bin").write_bytes(os.urandom(size))
    return folder


def kill_when(proc, seen, timeout=60.0) -> bool:
    """SIGKILL `proc` as soon as `seen()` is true; False if it finished first."""
    import signal

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if seen():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=30)
    return False


def test_kill_9_mid_publish_then_gc_leaves_a_consistent_store(tmp_path):
    import subprocess
    import sys

    store = open_store(str(tmp_path / "store"))
    sealed = publish(store, tmp_path, "r1-aaaa")
    registry.set_alias(store, NAME, registry.PRODUCTION, sealed, "r")
    prefix = registry.version_prefix(NAME, "v20260101-000000-kill")
    parent = store.root / "models" / NAME
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH, str(store.root), str(big_folder(tmp_path, 200, 256 << 10)), prefix])
    assert kill_when(proc, lambda: any(".tmp-" in p.name for p in parent.iterdir())), "the publish finished before the kill"
    assert not store.is_published(prefix) and registry.versions(store, NAME) == [sealed]
    report = gc.collect(store, grace_s=HOUR, keep_versions=5, now=time.time() + 2 * HOUR)
    assert len(report.removed) == 1 and ".tmp-" in report.removed[0]
    assert sorted(p.name for p in parent.iterdir()) == sorted(["aliases", sealed])
    assert registry.read_alias(store, NAME)["version"] == sealed


def test_kill_9_mid_multipart_upload_then_gc_aborts_it(s3_bucket, tmp_path):
    import subprocess
    import sys

    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}/kt", settings)
    prefix = registry.version_prefix(NAME, "v20260101-000000-kill")
    client = settings.client()
    folder = big_folder(tmp_path, 1, 64 << 20)  # over boto3's 8 MB multipart threshold
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH, store.uri, str(folder), prefix], env=os.environ.copy())
    assert kill_when(proc, lambda: bool(client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"))), "no multipart upload seen"
    assert not store.is_published(prefix)
    report = gc.collect(store, grace_s=HOUR, keep_versions=5, now=time.time() + 2 * HOUR)
    assert len(report.aborted) >= 1
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert store.list(prefix) == []
