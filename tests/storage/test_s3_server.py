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
