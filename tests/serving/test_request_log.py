"""Sampled request logging (`kubetune serve --request-log`): real `kubetune serve` processes on the
exported model in a registry folder with a reference profile; what they write is read back by
`kubetune drift`. Then the pure parts (profile from logged features, the token bucket, key checks)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from kubetune.errors import ConfigError, KubetuneError
from kubetune.monitoring import profile
from kubetune.pipelines.cli import main as cli_main
from kubetune.release import registry
from kubetune.serving import requestlog
from kubetune.storage.store import LocalStore
from tests.helpers.serve import running_server

NAME, VERSION = "sms-spam", "v20261202-000000-rlog"
BASE = ["--model", NAME, "--threads", "1", "--batch-wait-ms", "0", "--grpc-port", "0"]


def fresh_store(tmp_path, exported_model, reference) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / VERSION
    shutil.copytree(exported_model, folder)
    (folder / "profile.json").write_text(json.dumps(reference))
    store.publish_dir(folder, registry.version_prefix(NAME, VERSION))
    registry.set_alias(store, NAME, registry.PRODUCTION, VERSION, "test")
    return store


def send(server, texts: list[str], per_request: int = 16) -> None:
    for i in range(0, len(texts), per_request):
        r = server.post(f"/v1/models/{NAME}:predict", json={"instances": texts[i:i + per_request]})
        assert r.status_code == 200, r.text


def logged_parts(store: LocalStore) -> list:
    return sorted((store.root / requestlog.prefix(NAME)).rglob("*.jsonl"))


def records(store: LocalStore) -> list[dict]:
    return [json.loads(line) for p in logged_parts(store) for line in p.read_text().splitlines()]


def metric(server, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in server.get("/metrics").text.splitlines() if line.startswith(name))


def keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in keys(v)} | {v for v in obj.values() if isinstance(v, str)}
    return set().union(*(keys(v) for v in obj)) if isinstance(obj, list) else set()


@pytest.mark.slow
def test_off_by_default_writes_nothing(tmp_path, exported_model, reference, sms_rows):
    store = fresh_store(tmp_path, exported_model, reference)
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    with running_server([*BASE, "--store", str(store.root)]) as server:
        send(server, [t for _, t in sms_rows[:32]])
    assert server.exit_code == 0
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before
    assert not (store.root / "monitoring").exists()


@pytest.mark.slow
def test_texts_mode_logs_the_texts_and_drift_reads_them(tmp_path, exported_model, reference, sms_rows):
    store = fresh_store(tmp_path, exported_model, reference)
    texts = [t for _, t in sms_rows[4000:4120]]
    args = [*BASE, "--store", str(store.root), "--request-log", "texts", "--request-log-rate", "1.0",
            "--request-log-flush-s", "0.2"]
    with running_server(args) as server:
        send(server, texts)
        deadline = time.monotonic() + 20
        while len(records(store)) < len(texts) and time.monotonic() < deadline:  # flushed while serving
            time.sleep(0.2)
        assert len(records(store)) == len(texts)
        assert metric(server, "kubetune_serve_request_log_texts_total") == len(texts)
    parts = logged_parts(store)
    assert all(requestlog._DAY.match(p.parent.name) and requestlog._PART.match(p.name) for p in parts)
    got = records(store)
    assert sorted(r["text"] for r in got) == sorted(texts)
    assert all(r["model"] == NAME and r["version"] == VERSION and r["prediction"]["label"] in ("ham", "spam") for r in got)

    out = tmp_path / "drift"
    prefix = str(store.root / requestlog.prefix(NAME))
    assert cli_main(["drift", "--store", str(store.root), "--model", NAME, "--input", prefix, "--out", str(out)]) == 0
    rep = json.loads((out / "drift.json").read_text())
    assert rep["rows"] == len(texts) and rep["drifted"] is False, rep["drifted_signals"]


@pytest.mark.slow
def test_features_mode_never_writes_the_text_and_drift_uses_the_features(tmp_path, exported_model, reference, sms_rows, clf):
    store = fresh_store(tmp_path, exported_model, reference)
    texts = [t for _, t in sms_rows[4200:4320]]
    # flush only at shutdown: a long interval and a large size leave it to the SIGTERM path
    args = [*BASE, "--store", str(store.root), "--request-log", "features", "--request-log-rate", "1.0",
            "--request-log-flush-s", "3600", "--request-log-flush-texts", "100000"]
    with running_server(args) as server:
        send(server, texts)
        time.sleep(0.5)
        assert logged_parts(store) == []
    assert server.exit_code == 0
    got = records(store)
    assert len(got) == len(texts) and all("text" not in r for r in got)
    written = b"".join(p.read_bytes() for p in logged_parts(store))
    structure = {k for r in got for k in keys(r)}  # field names and labels may occur in an SMS ("features")
    for t in texts:  # not the text, nor any word of it long enough to identify it
        assert t.encode() not in written and json.dumps(t)[1:-1].encode() not in written
        for word in (w for w in t.split() if len(w) >= 8 and w.isalpha() and w not in structure):
            assert word.encode() not in written, word

    out = tmp_path / "drift"
    prefix = str(store.root / requestlog.prefix(NAME))
    assert cli_main(["drift", "--store", str(store.root), "--model", NAME, "--input", prefix, "--out", str(out)]) == 0
    rep = json.loads((out / "drift.json").read_text())
    assert rep["rows"] == len(texts) and rep["drifted"] is False, rep["drifted_signals"]
    # the same report as from the texts themselves, with the served predictions
    served = [r["prediction"] for r in got]
    order = sorted(range(len(got)), key=lambda i: got[i]["time"])
    direct = profile.build(clf, texts)
    assert direct["counts"] == profile.from_features(clf.task, clf.labels, clf.max_length, [got[i]["features"] for i in order],
                                                     [served[i] for i in order])["counts"]


@pytest.mark.slow
def test_rate_limit_caps_the_logged_texts(tmp_path, exported_model, reference, sms_rows):
    store = fresh_store(tmp_path, exported_model, reference)
    args = [*BASE, "--store", str(store.root), "--request-log", "texts", "--request-log-rate", "1.0",
            "--request-log-max-per-minute", "5", "--request-log-flush-s", "0.2"]
    with running_server(args) as server:
        started = time.monotonic()
        send(server, [t for _, t in sms_rows[:40]], per_request=8)
        elapsed = time.monotonic() - started
        time.sleep(0.6)
        dropped = metric(server, 'kubetune_serve_request_log_dropped_total{model_name="sms-spam",reason="rate_limit"}')
    n = len(records(store))
    assert 5 <= n <= 5 + int(elapsed * 5 / 60) + 1
    assert dropped == 40 - n


def test_profile_from_logged_features_equals_the_profile_of_the_texts(clf, sms_rows):
    texts = [t for _, t in sms_rows[2000:2100]] + ["中文评论，模型读不懂", "Привет, как дела?"]
    scored = clf.score(texts)
    direct = profile.build(clf, texts, scored=scored, sample=50)
    feats = json.loads(json.dumps(profile.text_features(clf.tokenizer, texts, scored)))
    predictions = [s.prediction for s in scored]
    assert profile.from_features(clf.task, clf.labels, clf.max_length, feats, predictions, sample=50) == direct


def test_token_bucket_and_key_checks():
    now = [0.0]
    bucket = requestlog.TokenBucket(3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 20  # one token per 20 s at 3 a minute
    assert [bucket.take() for _ in range(2)] == [True, False]
    key = requestlog.part_key(NAME, 1764633600.0, "0a1b2c3d")
    assert key == "monitoring/sms-spam/requests/20251202/part-000000-0a1b2c3d.jsonl"
    with pytest.raises(KubetuneError):
        requestlog.part_key("../etc", 0.0, "0a1b2c3d")
    with pytest.raises(ValueError):
        requestlog.part_key(NAME, 0.0, "../x")
    for bad in (("bogus", 0.1, 5, 1, 1), ("off", 0, 5, 1, 1), ("off", 1.5, 5, 1, 1), ("off", 0.1, 0, 1, 1), ("off", 0.1, 5, 0, 1)):
        with pytest.raises(ConfigError, match="--request-log"):
            requestlog.check(*bad)
