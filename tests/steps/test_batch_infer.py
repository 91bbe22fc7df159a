"""Batch inference on real SMS texts with the exported tiny model (tests/conftest.py): formats, bad rows, the shared
prediction contract, resume after SIGKILL (a real subprocess), and the batch-inference pipeline
under kfp.local against S3 (a real SeaweedFS server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune.errors import ConfigError, InputError
from kubetune.onnx.model import OnnxClassifier
from kubetune.pipelines.cli import main
from kubetune.release import registry
from kubetune.steps.batch_infer import BatchConfig, run_batch
from kubetune.storage.store import S3Settings, open_store
from tests.conftest import write_csv, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def publish(store, model_dir: Path, version: str = "v20261123-000000-test") -> str:
    """The exported model as the registry's production version (what deploy does, minus the card)."""
    store.publish_dir(model_dir, registry.version_prefix("sms-spam", version))
    registry.set_alias(store, "sms-spam", registry.PRODUCTION, version, "test")
    return version


def all_rows(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    preds = [pd.read_parquet(p) for p in sorted(out.glob("shards/*/predictions.parquet"))]
    rejects = [pd.read_parquet(p) for p in sorted(out.glob("shards/*/rejects.parquet"))]
    none = pd.DataFrame(columns=["id", "source_file", "source_row"])
    return pd.concat(preds, ignore_index=True), (pd.concat(rejects, ignore_index=True) if rejects else none)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, exported_model) -> Path:
    root = tmp_path_factory.mktemp("registry")
    publish(open_store(str(root)), exported_model)
    return root


def test_formats_bad_rows_and_the_shared_contract(tmp_path, store_dir, sms_rows, exported_model):
    inp = tmp_path / "in"
    inp.mkdir()
    texts = [t for _, t in sms_rows[:260]]
    write_csv(inp / "a.csv", [(t, l) for l, t in sms_rows[:120]])
    long_text = "Free entry to win a prize! " * 50  # 1,350 characters, ~350 tokens: truncated to max_length, not rejected
    write_jsonl(inp / "b.jsonl", [(t, f"m{i}") for i, t in enumerate(texts[120:200])] + [(long_text, "long")], keys=("text", "msg_id"))
    with open(inp / "b.jsonl", "ab") as f:
        f.write(b'{"text": null, "msg_id": "null"}\n{"text": 42, "msg_id": "num"}\n{"text": "  ", "msg_id": "blank"}\n'
                b'not json at all\n{"text": "caf\xe9 au lait", "msg_id": "latin1"}\n')
        f.write(json.dumps({"text": "x" * 5000, "msg_id": "huge"}).encode() + b"\n")
    pq.write_table(pa.table({"msg_id": [f"p{i}" for i in range(60)], "text": texts[200:259] + [None]}), inp / "c.parquet")
    (inp / "notes.txt").write_text("not data: ignored")

    out = tmp_path / "out"
    # JSONL and Parquet carry msg_id; the CSV has no such column, which is an error for the whole file
    with pytest.raises(InputError, match="a.csv: column 'msg_id' not found; columns are: text, label"):
        run_batch(str(store_dir), "sms-spam", str(inp), str(out), BatchConfig(id_column="msg_id"))
    (inp / "a.csv").unlink()
    manifest = run_batch(str(store_dir), "models/sms-spam/production", str(inp), str(out),
                         BatchConfig(id_column="msg_id", shard_rows=50, max_chars=2000))

    total = 80 + 1 + 6 + 60
    clf = OnnxClassifier(exported_model)
    over = sum(len(ids) > clf.max_length for ids in clf.tokenizer(texts[120:200] + texts[200:259] + [long_text])["input_ids"])
    assert manifest["totals"] == {"rows": total, "predicted": 80 + 1 + 59, "rejected": 7, "truncated": over}
    assert len(manifest["shards"]) == 2 + 2 and manifest["variant"] == "optimized" and manifest["kernels"].startswith("fp32 ")
    preds, rejects = all_rows(out)
    assert len(preds) + len(rejects) == total and not set(preds["id"]) & set(rejects["id"])
    reasons = dict(zip(rejects["id"], rejects["reason"]))
    assert reasons["null"] == "null text" and reasons["num"] == "not text: int" and reasons["blank"] == "empty text"
    assert reasons["latin1"].startswith("not valid UTF-8 (byte 0xe9")
    assert reasons["huge"] == "over-long: 5000 characters > max_chars 2000"
    assert reasons["p59"] == "null text"
    assert any(r.startswith("malformed row: invalid JSON") for r in reasons.values())
    assert rejects.set_index("id").loc["latin1", "text_head"] == "caf\\xe9 au lait"
    assert preds.set_index("id").loc["long", "truncated"] and preds["truncated"].sum() == over
    assert list(preds.columns) == ["id", "source_file", "source_row", "label", "score", "prob_ham", "prob_spam", "truncated"]

    # the same answers as OnnxClassifier.predict, the contract the online server uses (float noise:
    # the batches pad to other lengths)
    p = preds[preds["source_file"].str.endswith("c.parquet")].sort_values("source_row")
    want = clf.predict(texts[200:259])
    assert list(p["label"]) == [w["label"] for w in want]
    assert max(abs(a - w["score"]) for a, w in zip(p["score"], want)) < 1e-5
    assert max(abs(a - w["probabilities"]["spam"]) for a, w in zip(p["prob_spam"], want)) < 1e-5
    # int8 on request: the same labels; scores differ a little (activations are quantized per batch)
    int8 = run_batch(str(store_dir), "sms-spam", str(inp / "c.parquet"), str(tmp_path / "int8"),
                     BatchConfig(variant="int8", id_column="msg_id"))
    assert int8["variant"] == "int8" and int8["kernels"].startswith("int8 ")
    p8 = pd.read_parquet(tmp_path / "int8/shards/00000/predictions.parquet").sort_values("source_row")
    assert (p8["prob_ham"] + p8["prob_spam"] - 1).abs().max() < 1e-9
    # labels may only flip near the decision boundary (the export gate allows 0.5% disagreement)
    clear = [abs(w["probabilities"]["spam"] - 0.5) > 0.2 for w in want]
    assert sum(clear) > 40
    assert [a for a, c in zip(p8["label"], clear) if c] == [w["label"] for w, c in zip(want, clear) if c]
    assert (abs(p8["prob_spam"].to_numpy() - np.array([w["probabilities"]["spam"] for w in want])) < 0.3).all()

    # a finished batch re-runs as a no-op; another input under the same output is refused
    again = run_batch(str(store_dir), "models/sms-spam/production", str(inp), str(out),
                      BatchConfig(id_column="msg_id", shard_rows=50, max_chars=2000))
    assert again["totals"] == manifest["totals"]
    with pytest.raises(InputError, match="belongs to another batch"):
        run_batch(str(store_dir), "sms-spam", str(inp / "c.parquet"), str(out), BatchConfig())


def test_bad_settings_and_references(tmp_path, store_dir, capsys):
    with pytest.raises(ConfigError, match="variant 'fp8'"):
        BatchConfig(variant="fp8").check()
    code = main(["infer", "--store", str(store_dir), "--model", "models/nope/production", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2 and "nope has no version or alias 'production'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a bad --model is refused before --output is created
    code = main(["infer", "--store", str(tmp_path / "no-store"), "--model", "sms-spam", "--input", str(tmp_path), "--output",
                 str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "no-store").exists()
    code = main(["infer", "--store", str(store_dir), "--model", "sms-spam", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2 and "no CSV, TSV, JSONL or Parquet files there" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_scores_every_row_exactly_once(tmp_path, store_dir, sms_rows):
    inp = tmp_path / "in"
    inp.mkdir()
    rows = [(t, l) for l, t in sms_rows[:1600]]
    for k in range(4):  # 4 files x 400 rows, shards of 200: 8 shards
        write_csv(inp / f"part-{k}.csv", rows[k * 400:(k + 1) * 400])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kubetune.steps.batch_infer", "--store", str(store_dir), "--model", "sms-spam",
           "--input", str(inp), "--output", str(out), "--shard-rows", "200", "--variant", "fp32"]
    (tmp_path / "tmp").mkdir()  # the killed process's TMPDIR: its scratch stays in the test's folder
    first = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)

    def sealed() -> list[Path]:
        """Committed shards: pathlib's glob also matches the hidden .<id>.tmp-* folder of a publish in
        flight, whose seal is written just before its rename; that one is not committed yet."""
        return [m for m in out.glob("shards/*/_MANIFEST.json") if not m.parent.name.startswith(".")]

    deadline = time.time() + 600
    while not sealed() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # mid-run: at least one shard committed, the next one in flight
    first.wait()
    committed = len(sealed())
    assert first.returncode == -signal.SIGKILL and 1 <= committed < 8, first.stdout.read()
    assert not (out / "manifest.json").exists()

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{committed} of 8 shards already committed: skipped" in second.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == 1600 and len(manifest["shards"]) == 8
    preds, rejects = all_rows(out)
    keys = list(zip(preds["source_file"], preds["source_row"])) + list(zip(rejects["source_file"], rejects["source_row"]))
    assert len(keys) == len(set(keys)) == 1600  # none lost, none duplicated
    assert set(keys) == {(str(inp / f"part-{k}.csv"), r) for k in range(4) for r in range(1, 401)}
    # the killed shard left nothing half-written where readers look (a copy cut short stays hidden under a temp name)
    assert all((d / "_MANIFEST.json").is_file() for d in (out / "shards").iterdir() if not d.name.startswith("."))


@pytest.mark.slow
def test_batch_pipeline_under_kfp_local_against_s3(tmp_path, s3_bucket, exported_model, sms_rows):
    from kubetune.pipelines.batch import build_batch_pipeline
    from kubetune.pipelines.config import ClusterConfig
    from kubetune.pipelines.local import run_locally

    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}/kubetune", settings)
    version = publish(store, exported_model)
    data = open_store(f"s3://{s3_bucket}/incoming", settings)
    local = tmp_path / "files"
    local.mkdir()
    write_csv(local / "a.csv", [(t, l) for l, t in sms_rows[3000:3150]])
    pq.write_table(pa.table({"text": [t for _, t in sms_rows[3150:3250]] + [""]}), local / "b.parquet")
    data.upload(local / "a.csv", "2026/11/a.csv")
    data.upload(local / "b.parquet", "2026/11/b.parquet")

    output = f"s3://{s3_bucket}/scored/run1"
    run_locally(build_batch_pipeline(ClusterConfig(retries=0)),
                {"input_uri": f"s3://{s3_bucket}/incoming/2026/", "output_uri": output, "store": store.uri, "shard_rows": 80},
                pipeline_root=tmp_path / "kfp", log_path=tmp_path / "kfp.log")
    out = open_store(output, settings)
    manifest = out.read_json("manifest.json")
    assert manifest["model"]["version"] == version and manifest["model"]["uri"] == store.url(f"models/sms-spam/{version}")
    assert {k: manifest["totals"][k] for k in ("rows", "predicted", "rejected")} == {"rows": 251, "predicted": 250, "rejected": 1}
    assert [s["file"].rsplit("/", 1)[-1] for s in manifest["shards"]] == ["a.csv", "a.csv", "b.parquet", "b.parquet"]
    keys = set(out.list("shards"))
    for s in manifest["shards"]:
        assert f"shards/{s['id']}/_MANIFEST.json" in keys and f"shards/{s['id']}/predictions.parquet" in keys
    out.download(f"shards/{manifest['shards'][0]['id']}/predictions.parquet", tmp_path / "p0.parquet")
    first = pd.read_parquet(tmp_path / "p0.parquet")
    assert len(first) == 80 and set(first["label"]) <= {"ham", "spam"} and first["source_row"].tolist() == list(range(1, 81))


# ---- drift: every batch is compared with the version's reference profile ---------------------------


@pytest.fixture(scope="module")
def profiled_store(published_store) -> Path:
    """The exported model published with a reference profile of 600 real SMS (the session's, tests/conftest.py)."""
    return published_store.root


@pytest.mark.slow
def test_each_batch_writes_a_drift_report(tmp_path, profiled_store, sms_rows):
    from tests.helpers.corpora import newsgroups_posts

    same = write_csv(tmp_path / "sms.csv", [(t, "") for _, t in sms_rows[3000:3400]])
    manifest = run_batch(str(profiled_store), "sms-spam", str(same), str(tmp_path / "a"), BatchConfig(shard_rows=150))
    assert len(manifest["shards"]) == 3 and manifest["drifted"] is False, manifest["drift"]
    report = json.loads((tmp_path / "a" / "drift.json").read_text())
    assert report["rows"] == 400 and report["drifted"] is False  # the three shards' profiles, merged
    assert "<svg" in (tmp_path / "a" / "drift.html").read_text()

    other = write_csv(tmp_path / "news.csv", [(t, "") for t in newsgroups_posts(300)])
    manifest = run_batch(str(profiled_store), "sms-spam", str(other), str(tmp_path / "b"), BatchConfig(shard_rows=150))
    assert manifest["drifted"] is True and "embedding_domain_auc" in manifest["drift"]["drifted_signals"]
    assert json.loads((tmp_path / "b" / "drift.json").read_text())["drifted"] is True


def test_a_version_without_a_profile_skips_drift(tmp_path, store_dir, sms_rows):
    inp = write_csv(tmp_path / "sms.csv", [(t, "") for _, t in sms_rows[:40]])
    manifest = run_batch(str(store_dir), "sms-spam", str(inp), str(tmp_path / "o"), BatchConfig())
    assert manifest["drifted"] is None and "no reference profile" in manifest["drift"]["skipped"]
    assert not (tmp_path / "o" / "drift.json").exists()


@pytest.mark.slow
def test_a_drifted_batch_submits_the_training_pipeline(tmp_path, profiled_store, sms_rows, monkeypatch, capsys):
    """`kubetune infer --retrain-on-drift` against a KFP API server over HTTP (tests/helpers/fake_kfp.py):
    the same submission as `kubetune submit`, for the same store and model name; none without drift."""
    from tests.helpers.corpora import newsgroups_posts
    from tests.helpers.fake_kfp import FakeKfp

    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    same = write_csv(tmp_path / "sms.csv", [(t, "") for _, t in sms_rows[3000:3300]])
    news = write_csv(tmp_path / "news.csv", [(t, "") for t in newsgroups_posts(300)])
    with FakeKfp() as kfp:
        common = ["--store", str(profiled_store), "--model", "sms-spam", "--retrain-on-drift", "--host", kfp.url,
                  "--image", "reg.example/kubetune:1.0", "--experiment", "retrain", "--param", "train_uri=s3://ml/data/fresh.csv"]
        assert main(["infer", *common, "--input", str(same), "--output", str(tmp_path / "a")]) == 0
        assert kfp.runs == [] and "drift: none" in capsys.readouterr().out
        assert main(["infer", *common, "--input", str(news), "--output", str(tmp_path / "b"), "--summary", str(tmp_path / "s.json")]) == 0
        (run,) = kfp.runs
    assert run["runtime_config"]["parameters"] == {"train_uri": "s3://ml/data/fresh.csv", "model_name": "sms-spam"}
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["root"]["inputDefinitions"]["parameters"]["store"]["defaultValue"] == str(profiled_store)  # the same store
    assert json.loads((tmp_path / "s.json").read_text())["retraining_run"] == run["run_id"]
    assert "DRIFTED" in capsys.readouterr().out


@pytest.mark.slow
def test_batch_pipeline_under_kfp_local_retrains_when_drifted(tmp_path, profiled_store, monkeypatch):
    """The batch-inference pipeline under kfp.local: drift.json written, and with retrain_on_drift its
    batch-retrain task submits the training pipeline to the KFP API (tests/helpers/fake_kfp.py)."""
    from kubetune.pipelines.batch import build_batch_pipeline
    from kubetune.pipelines.config import ClusterConfig
    from kubetune.pipelines.local import run_locally
    from tests.helpers.corpora import newsgroups_posts
    from tests.helpers.fake_kfp import FakeKfp

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    news = write_csv(tmp_path / "news.csv", [(t, "") for t in newsgroups_posts(200)])
    with FakeKfp() as kfp:
        run_locally(build_batch_pipeline(ClusterConfig(retries=0, image="reg.example/kubetune:1.0")),
                    {"input_uri": str(news), "output_uri": str(tmp_path / "out"), "store": str(profiled_store), "model": "sms-spam",
                     "retrain_on_drift": True, "retrain_train_uri": "s3://ml/data/fresh.csv", "kfp_host": kfp.url},
                    pipeline_root=tmp_path / "kfp", log_path=tmp_path / "kfp.log")
        runs = list(kfp.runs)
    report = json.loads((tmp_path / "out" / "drift.json").read_text())
    assert report["drifted"] is True and json.loads((tmp_path / "out" / "manifest.json").read_text())["drifted"] is True
    assert len(runs) == 1, (tmp_path / "kfp.log").read_text()[-3000:]
    assert runs[0]["runtime_config"]["parameters"] == {"model_name": "sms-spam", "train_uri": "s3://ml/data/fresh.csv"}
    images = {e["container"]["image"] for e in runs[0]["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"].values()}
    assert "reg.example/kubetune:1.0" in images
