"""The S3 store against the real server of the test session (SeaweedFS): credentials are enforced,
and compare-and-swap holds where SeaweedFS answers differently from AWS (If-Match on a key that is
gone: 412 there, 404 on AWS) and under concurrent writers."""

from __future__ import annotations

import os
import threading

import pytest
from botocore.exceptions import ClientError

from kubetune.storage.store import Conflict, S3Settings, StoreError, open_store


def test_wrong_credentials_are_refused(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(f"s3://{s3_bucket}", S3Settings.from_env(os.environ))
    with pytest.raises(StoreError, match="SignatureDoesNotMatch|AccessDenied"):
        store.write_text("a.txt", "x")


def test_if_match_on_a_deleted_key_is_a_lost_swap(s3_bucket):
    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}/p", settings)
    store.write_if("alias.json", b"1", None)
    _, token = store.read_versioned("alias.json")
    client = settings.client()
    client.delete_object(Bucket=s3_bucket, Key="p/alias.json")
    # what the server itself answers: SeaweedFS 412 (AWS and moto: 404); the store must treat both as Conflict
    with pytest.raises(ClientError) as raw:
        client.put_object(Bucket=s3_bucket, Key="p/alias.json", Body=b"2", IfMatch=token)
    assert raw.value.response["ResponseMetadata"]["HTTPStatusCode"] in (404, 412)
    with pytest.raises(Conflict):
        store.write_if("alias.json", b"2", token)
    assert store.read_versioned("alias.json") == (None, None)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["missing", "existing"])
def test_concurrent_writers_exactly_one_wins(s3_bucket, start):
    store = open_store(f"s3://{s3_bucket}", S3Settings.from_env(os.environ))
    token = None
    if start == "existing":
        store.write_if("alias.json", b"0", None)
        _, token = store.read_versioned("alias.json")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def writer(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            store.write_if("alias.json", f"w{i}".encode(), token)
            outcomes.append(f"w{i}")
        except Conflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [o for o in outcomes if o != "lost"]
    assert len(outcomes) == 8 and len(winners) == 1, outcomes
    assert store.read_versioned("alias.json")[0] == winners[0].encode()


# ---- issue 12: cut response bodies, through a fault-injecting proxy in front of the real server ----------


def publish_model(store, tmp_path, name="sms-spam", version="v20261123-000000-test"):
    from kubetune.release import registry

    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx" * 1000)
    (folder / "metrics.json").write_text('{"version": "%s"}' % version)
    store.publish_dir(folder, registry.version_prefix(name, version))
    registry.set_alias(store, name, registry.PRODUCTION, version, "r")
    return version


@pytest.mark.slow
def test_cut_bodies_are_read_again_and_then_a_one_line_error(s3_bucket, s3_server, tmp_path, monkeypatch, capsys):
    """A GET whose body is cut mid-transfer (botocore retries only up to the headers) is fetched
    again; when every read is cut the user gets one line naming the key, never a traceback."""
    from kubetune.pipelines.cli import main
    from kubetune.release import registry
    from tests.helpers.faultproxy import FaultProxy

    direct = open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))
    version = publish_model(direct, tmp_path)
    alias_get = lambda method, path: method == "GET" and path.split("?")[0].endswith("/aliases/production.json")  # noqa: E731
    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        via = open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))
        proxy.cut_bodies(alias_get, times=2)
        assert registry.read_alias(via, "sms-spam")["version"] == version
        assert len(proxy.cut) == 2  # both cuts happened, and the third read succeeded
        proxy.cut_bodies(alias_get, times=2)
        assert main(["models", "sms-spam", "--store", f"s3://{s3_bucket}/kt"]) == 0
        assert f"{version}  production" in capsys.readouterr().out
        proxy.cut_bodies(alias_get, times=-1)
        assert main(["models", "sms-spam", "--store", f"s3://{s3_bucket}/kt"]) == 1
        err = capsys.readouterr().err
        assert "aliases/production.json" in err and "cut off" in err and "Traceback" not in err
        assert err.strip().count("\n") == 0, err
        proxy.cut_bodies(lambda method, path: method == "GET" and "_MANIFEST.json" in path, times=-1)
        with pytest.raises(StoreError, match="cut off"):  # the seal read during a download, cut every time
            via.download_dir(registry.version_prefix("sms-spam", version), tmp_path / "dl")


def test_download_refuses_escaping_names_and_checks_sha256(tmp_path, s3_bucket):
    """The manifest (the seal) names the files; a name with '..' or an absolute one must not be
    written outside the download folder, and a file whose content changed after sealing is refused."""
    import json

    from kubetune.storage.store import MANIFEST

    for store in (open_store(str(tmp_path / "local")), open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))):
        folder = tmp_path / f"stage-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"A" * 100)
        store.publish_dir(folder, "models/m/v1")
        manifest = store.read_json(f"models/m/v1/{MANIFEST}")
        dest = tmp_path / f"dl-{len(list(tmp_path.iterdir()))}"
        assert (store.download_dir("models/m/v1", dest) / "model.onnx").read_bytes() == b"A" * 100
        store.write_bytes("models/m/v1/model.onnx", b"B" * 100)  # same size, other content
        with pytest.raises(StoreError, match="sha256 differs"):
            store.download_dir("models/m/v1", tmp_path / f"dl-{len(list(tmp_path.iterdir()))}")
        for evil in ("../escaped.txt", "/tmp/kt-test-escaped-abs.txt", "a/../../escaped.txt"):
            bad = {**manifest, "files": {evil: manifest["files"]["model.onnx"]}}
            store.write_bytes(f"models/m/v1/{MANIFEST}", json.dumps(bad).encode())
            target = tmp_path / f"dl-{len(list(tmp_path.iterdir()))}"
            with pytest.raises(StoreError, match="outside the download folder"):
                store.download_dir("models/m/v1", target)
            assert not (target.parent / "escaped.txt").exists() and not os.path.exists("/tmp/kt-test-escaped-abs.txt")


def test_safe_relative_names():
    from kubetune.storage.store import safe_relative

    assert safe_relative("a/b.txt", "x") == "a/b.txt"
    for evil in ("", "a//b", "./a", "a\\..\\b"):
        with pytest.raises(StoreError):
            safe_relative(evil, "x")


# ---- issue 25: the transfer manager (download_file / upload_file) ends in the same one-line error ------------


@pytest.mark.slow
def test_transfer_manager_cut_bodies_end_in_one_line(s3_bucket, s3_server, tmp_path, monkeypatch, capsys):
    """download_file retries a cut body itself, then raises boto3's RetriesExceededError (no key in
    it); the store turns it into its own one-line error naming the key, and the CLI prints only that."""
    from kubetune.errors import EXIT_FAILED
    from kubetune.pipelines.cli import main
    from kubetune.release import registry
    from tests.conftest import write_csv
    from tests.helpers.faultproxy import FaultProxy

    direct = open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))
    version = publish_model(direct, tmp_path)
    onnx_key = f"{registry.version_prefix('sms-spam', version)}/model.onnx"
    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        via = open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))
        proxy.cut_bodies(lambda method, path: method == "GET" and path.split("?")[0].endswith("/model.onnx"), times=-1)
        with pytest.raises(StoreError, match="cut off") as failed:
            via.download(onnx_key, tmp_path / "model.onnx")
        assert f"s3://{s3_bucket}/kt/{onnx_key}" in str(failed.value) and failed.value.exit_code == EXIT_FAILED
        assert len(proxy.cut) > 1 and not list(tmp_path.glob(".model.onnx.tmp-*"))  # retried, and no temp file left
        capsys.readouterr()
        data = write_csv(tmp_path / "in.csv", [("free prize now", "spam"), ("see you at noon", "ham")])
        code = main(["infer", "--store", f"s3://{s3_bucket}/kt", "--model", "sms-spam", "--input", str(data),
                     "--output", str(tmp_path / "scored")])
        err = capsys.readouterr().err
        assert code == EXIT_FAILED, err
        assert "model.onnx" in err and "cut off" in err and "Traceback" not in err and "RetriesExceeded" not in err
        assert err.strip().count("\n") == 0, err


def test_upload_errors_are_one_line(s3_bucket, tmp_path, monkeypatch):
    """upload_file wraps a refused PUT in boto3's S3UploadFailedError; the store names the key instead."""
    src = tmp_path / "model.onnx"
    src.write_bytes(b"onnx")
    missing = open_store(f"s3://{s3_bucket}-gone/kt", S3Settings.from_env(os.environ))
    with pytest.raises(StoreError, match="does not exist"):
        missing.upload(src, "models/m/model.onnx")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    denied = open_store(f"s3://{s3_bucket}/kt", S3Settings.from_env(os.environ))
    with pytest.raises(StoreError, match=f"s3://{s3_bucket}/kt/models/m/model.onnx.*(SignatureDoesNotMatch|AccessDenied)"):
        denied.upload(src, "models/m/model.onnx")
