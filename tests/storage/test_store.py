"""The store: the same behaviour on a local folder and on S3 (a real SeaweedFS server), atomic publishing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.errors import InputError
from kubetune.storage.store import (
    MANIFEST,
    LocalStore,
    NotFound,
    S3Settings,
    StoreError,
    fetch,
    open_store,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix", S3Settings.from_env(os.environ))


def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub" / "b.bin").write_bytes(os.urandom(3000))
    return root


def test_objects_round_trip(store):
    store.write_json("runs/r1/steps/validate.json", {"status": "succeeded", "seconds": 1.5})
    assert store.read_json("runs/r1/steps/validate.json") == {"status": "succeeded", "seconds": 1.5}
    store.write_text("runs/r1/report.md", "# ok\n")
    assert store.exists("runs/r1/report.md") and not store.exists("runs/r1/nope.md")
    assert store.list("runs/r1") == ["runs/r1/report.md", "runs/r1/steps/validate.json"]
    with pytest.raises(NotFound, match="nope.md"):
        store.read_bytes("runs/r1/nope.md")


def test_publish_dir_is_sealed_and_downloadable(store, tmp_path):
    src = make_folder(tmp_path / "src")
    assert store.publish_dir(src, "models/m/v1") is True
    assert store.is_published("models/m/v1")
    files = store.manifest("models/m/v1")["files"]
    assert set(files) == {"a.json", "sub/b.bin"} and files["sub/b.bin"]["size"] == 3000
    # a second publish of the same prefix changes nothing (a concurrent identical writer)
    assert store.publish_dir(src, "models/m/v1") is False
    out = store.download_dir("models/m/v1", tmp_path / "out")
    assert (out / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert not (out / MANIFEST).exists()


def test_failed_publish_leaves_nothing(store, tmp_path, monkeypatch):
    """The copy/upload breaks after the first file: no partial folder, nothing sealed."""
    src = make_folder(tmp_path / "src")
    if isinstance(store, LocalStore):
        import shutil

        def partial_copytree(source, dest, **kwargs):
            os.makedirs(dest)
            shutil.copyfile(Path(source) / "a.json", Path(dest) / "a.json")
            raise OSError("No space left on device")

        monkeypatch.setattr(shutil, "copytree", partial_copytree)
    else:
        original, calls = store.upload, []

        def upload_then_fail(path, key):
            calls.append(key)
            if len(calls) == 2:
                raise StoreError("connection reset")
            return original(path, key)

        monkeypatch.setattr(store, "upload", upload_then_fail)
    with pytest.raises(StoreError):
        store.publish_dir(src, "models/m/v2")
    assert not store.is_published("models/m/v2")
    assert store.list("models/m/v2") == []  # no partial object left behind
    if isinstance(store, LocalStore):  # nor a temp folder beside it
        assert list((store.root / "models" / "m").iterdir()) == []


def test_fetch_s3_object_and_prefix(s3_bucket, tmp_path):
    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}", settings)
    store.write_text("data/train.csv", "text,label\nhi,ham\n")
    store.write_text("models/base/config.json", "{}")
    store.write_text("models/base/tokenizer.json", "{}")
    got = fetch(f"s3://{s3_bucket}/data/train.csv", settings, tmp_path)
    assert got.read_text() == "text,label\nhi,ham\n"
    folder = fetch(f"s3://{s3_bucket}/models/base", settings, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]
    with pytest.raises(InputError, match="no such object or prefix"):
        fetch(f"s3://{s3_bucket}/missing.csv", settings, tmp_path)


def test_missing_bucket_is_a_clear_error(s3_env):
    store = open_store("s3://no-such-bucket-here/x", S3Settings.from_env(os.environ))
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist at http://127.0.0.1"):
        store.write_text("a.txt", "x")


def test_settings_from_env():
    s = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (s.endpoint_url, s.region, s.addressing_style) == ("http://minio:9000", "eu-west-1", "path")
    s = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_S3": "http://b", "KUBETUNE_S3_VERIFY_SSL": "false"})
    assert s.endpoint_url == "http://b" and s.verify_ssl is False
    assert S3Settings.from_env({}).addressing_style == "auto"  # AWS itself: virtual-hosted when possible
    with pytest.raises(InputError, match="KUBETUNE_S3_ADDRESSING_STYLE"):
        S3Settings.from_env({"KUBETUNE_S3_ADDRESSING_STYLE": "sideways"})


def test_store_uri_validation(tmp_path):
    with pytest.raises(InputError, match="only local folders and s3://"):
        open_store("gs://bucket/x")
    with pytest.raises(InputError, match="needs a bucket"):
        open_store("s3:///x")
    assert open_store(f"file://{tmp_path}/st").uri == str(tmp_path / "st")
