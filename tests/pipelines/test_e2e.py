"""End to end: `kubetune run` runs the whole KFP pipeline under kfp.local (every step a subprocess)
on 300 rows of the real SMS data with the tiny model (tests/helpers/tiny.py: what is checked here is the
wiring, not the model), against a local store and against S3 (a real SeaweedFS server over HTTP), then
`kubetune serve` on the published model; then the gate rejection path and one bad input through the
whole pipeline (the messages of every other bad input are asserted by the validate and reader tests:
tests/steps/test_validate.py, tests/storage/test_formats.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.onnx.model import OnnxClassifier
from kubetune.pipelines.cli import main
from kubetune.storage.store import S3Settings, open_store
from tests.conftest import TINY, cli_args, write_csv
from tests.helpers.serve import assert_same_predictions, running_server

pytestmark = pytest.mark.slow

SAMPLE_ARGS = ["--limit", "300", "--max-length", "64", *cli_args(TINY)]
STEPS = ["validate", "tokenize", "finetune", "evaluate", "export", "deploy"]
RUN_RECORDS = ["run.json", "validation/report.md", "validation/expectations.json", "evaluation.json", "export.json",
               "deployment.json", "summary.json", "kfp-local.log"] + [f"steps/{s}.json" for s in STEPS]
VERSION_FILES = ["model.onnx", "tokenizer.json", "tokenizer_config.json", "labels.json", "kubetune.json", "config.json",
                 "metrics.json", "MODEL_CARD.md", "inferenceservice.yaml", "parity.json", "profile.json", "report.html", "_MANIFEST.json"]


def run(args: list[str], summary: Path) -> tuple[int, dict]:
    code = main(["run", *args, "--summary", str(summary)])
    return code, json.loads(summary.read_text())


def check_deployed(summary: dict) -> None:
    assert summary["outcome"] == "deployed" and summary["exit_code"] == 0 and summary["error"] is None
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "succeeded" and s["seconds"] > 0 for s in summary["steps"])
    m = summary["metrics"]
    assert set(m["per_class"]) == {"ham", "spam"} and 0.8 <= m["accuracy"] <= 1 and m["macro_f1"] >= 0.5
    g = summary["gate"]
    assert g["passed"] and g["metric"] == "macro_f1" and g["value"] == m["macro_f1"] and g["threshold"] == 0.5
    assert summary["onnx"]["max_abs_diff"] < 1e-3 and summary["onnx"]["argmax_agreement"] == 1.0
    assert summary["deployment"]["model_uri"].endswith(f"models/sms-spam/{summary['deployment']['version']}")
    assert summary["deployment"]["manifest_uri"].endswith("/inferenceservice.yaml")


def test_local_store_deploys_then_gate_rejects(tmp_path, capsys, sms_rows, tiny_model_dir):
    store = tmp_path / "store"
    base = [*SAMPLE_ARGS, "--model", str(tiny_model_dir)]
    code, summary = run([*base, "--store", str(store), "--run-id", "first", "--gate-threshold", "0.5", "--keep-kfp-runs", "1"],
                        tmp_path / "first.json")
    assert code == 0
    check_deployed(summary)
    assert summary["gate"]["champion_value"] is None
    out = capsys.readouterr().out
    for step in STEPS:  # a line per step with its time, and a progress bar while training
        assert f"[kubetune {step}] done in " in out
    assert f"[kubetune finetune] epoch 1/{TINY['epochs']} [########################] 100%" in out
    assert "[KFP Executor" not in out  # kfp.local's chatter goes to the log file only

    # every artifact: run records, the cache entry, the registry version and alias
    for rel in RUN_RECORDS:
        assert (store / "runs/first" / rel).is_file(), rel
    version = summary["deployment"]["version"]
    for name in VERSION_FILES:
        assert (store / "models/sms-spam" / version / name).is_file(), name
    alias = json.loads((store / "models/sms-spam/aliases/production.json").read_text())
    assert alias["version"] == version and alias["run_id"] == "first"
    (cache_entry,) = (store / "cache/tokenize").iterdir()
    assert (cache_entry / "_MANIFEST.json").is_file()
    # KFP's own outputs: the Metrics and ClassificationMetrics the Kubeflow UI draws
    (evaluate_out,) = (store / "kfp-local").glob("*/evaluate/executor_output.json")
    artifacts = json.loads(evaluate_out.read_text())["artifacts"]
    assert artifacts["metrics"]["artifacts"][0]["metadata"]["macro_f1"] == pytest.approx(summary["metrics"]["macro_f1"], abs=1e-6)
    cm = artifacts["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == ["ham", "spam"]
    assert json.loads(evaluate_out.read_text())["parameterValues"]["Output"] is True
    (training_report,) = (store / "kfp-local").glob("*/deploy/training_report")  # the KFP HTML artifact: the version's report.html
    assert training_report.read_text() == (store / "models/sms-spam" / version / "report.html").read_text()
    (report,) = (store / "kfp-local").glob("*/validate/report")
    assert report.read_text().startswith("# Data validation: PASSED")

    # same data and seed, impossible threshold, forced (the data is unchanged): the gate rejects,
    # nothing is published, the tokenization comes from the cache and the champion is re-scored on the same test rows
    code, rejected = run([*base, "--store", str(store), "--run-id", "second", "--gate-threshold", "1.01", "--force"],
                         tmp_path / "second.json")
    assert code == 3 and rejected["outcome"] == "gate_rejected" and rejected["error"] is None
    assert [s["status"] for s in rejected["steps"]] == ["succeeded"] * 4 + ["skipped", "skipped"]
    assert rejected["onnx"] is None and rejected["deployment"] is None
    assert "below the threshold 1.01" in rejected["gate"]["reason"]
    assert rejected["gate"]["champion_version"] == version
    assert rejected["gate"]["champion_value"] == pytest.approx(rejected["gate"]["value"], abs=1e-9)  # same seed, same model
    tokenize_record = json.loads((store / "runs/second/steps/tokenize.json").read_text())
    assert tokenize_record["outputs"]["cache"] == "hit"
    assert sorted(p.name for p in (store / "models/sms-spam").iterdir()) == sorted(["aliases", version])
    # nothing left behind (issue 12): no checkpoints after a successful fine-tune, the second run's
    # kfp.local copies pruned (the first run's kept: --keep-kfp-runs 1), nothing else at the top
    assert not (store / "runs/first/checkpoints").exists() and not (store / "runs/second/checkpoints").exists()
    assert len(list((store / "kfp-local").iterdir())) == 1
    assert sorted(p.name for p in store.iterdir()) == ["cache", "kfp-local", "models", "runs"]
    assert json.loads((store / "models/sms-spam/aliases/production.json").read_text())["version"] == version

    # the same data again, not forced: a scheduled run that finds nothing new skips training, exit 0
    code, skipped = run([*base, "--store", str(store), "--run-id", "third"], tmp_path / "third.json")
    assert code == 0 and skipped["outcome"] == "skipped" and skipped["error"] is None
    assert skipped["skip"]["production_version"] == version and "unchanged since production" in skipped["skip"]["reason"]
    assert [s["status"] for s in skipped["steps"]] == ["succeeded"] + ["skipped"] * 5
    assert "skipped: the data is unchanged since production" in capsys.readouterr().out
    assert not (store / "runs/third/steps/finetune.json").exists()

    # `kubetune serve` on the published model answers real HTTP requests as batch inference does
    texts = [t for _, t in sms_rows[:24]]
    with running_server(["--model", "sms-spam", "--store", str(store)]) as server:
        r = server.post("/v1/models/sms-spam:predict", json={"instances": texts})
        assert r.status_code == 200, r.text
        assert_same_predictions(r.json()["predictions"], OnnxClassifier(store / "models/sms-spam" / version).predict(texts))
        assert server.post("/v1/models/sms-spam:predict", json={"instances": [1]}).status_code == 400
        assert server.get("/v2/health/ready").json() == {"ready": True}
    assert server.exit_code == 0


def test_s3_store_end_to_end(s3_run, s3_env):
    """Data, base model and store on S3 (the session's run, tests/conftest.py: s3_run)."""
    settings = S3Settings.from_env(os.environ)
    code, summary = s3_run.code, s3_run.summary
    assert code == 0
    check_deployed(summary)
    store = open_store(s3_run.store_uri, settings)
    assert summary["store"] == store.uri
    keys = set(store.list(""))
    for rel in RUN_RECORDS:
        assert f"runs/s3run/{rel}" in keys, rel
    version = summary["deployment"]["version"]
    for name in VERSION_FILES:
        assert f"models/sms-spam/{version}/{name}" in keys, name
    assert summary["deployment"]["model_uri"] == f"s3://{s3_run.bucket}/kubetune/models/sms-spam/{version}"
    assert store.read_json("models/sms-spam/aliases/production.json")["version"] == version
    assert any(k.startswith("cache/tokenize/") and k.endswith("/_MANIFEST.json") for k in keys)
    # --fanout-mb 0.02: each of the 3 input files checked by its own task, merged by validate; --fanout-rows 100:
    # each split tokenized by its own task, merged by tokenize; the pieces removed once merged
    for step, pieces in (("validate", ("train-00000-00001", "train-00001-00001", "train-00002-00001")),
                         ("tokenize", ("train-00000-00001", "eval-00000-00001", "test-00000-00001"))):
        assert store.read_json(f"runs/s3run/steps/{step}.json")["outputs"]["pieces"] == 3
        for piece in pieces:
            assert store.read_json(f"runs/s3run/steps/{step}-{piece}.json")["status"] == "succeeded"
    assert store.read_json("runs/s3run/steps/validate-train-00001-00001.json")["outputs"]["rows"] == 400
    assert not [k for k in keys if k.startswith("runs/s3run/pieces/")]
    isvc = store.read_bytes(f"models/sms-spam/{version}/inferenceservice.yaml").decode()
    assert f"value: s3://{s3_run.bucket}/kubetune/models/sms-spam/{version}" in isvc


# ---- bad input: exit 2, a message naming file/line/column, nothing trained or published ---------


def test_bad_input_is_rejected(tmp_path, sms_rows, capsys):
    """One bad input through the whole pipeline: what every rejection shares (exit 2, the outcome,
    the step statuses, the message on stdout, nothing written). The messages of the other kinds of
    bad input are asserted where they are made: tests/storage/test_formats.py (missing, empty,
    non-UTF-8 and malformed files, wrong columns) and tests/steps/test_validate.py (empty texts,
    unseen eval labels, a single class)."""
    good = [(t, l) for l, t in sms_rows[:200]]
    unseen = [(t, "promo" if i == 3 else l) for i, (t, l) in enumerate(good[:40])]
    args = ["--train", str(write_csv(tmp_path / "train.csv", good)), "--eval", str(write_csv(tmp_path / "ev.csv", unseen))]
    message = "ev.csv: column 'label': 1 of 40 rows have labels that are not in the train labels ['ham', 'spam']; e.g. line 5: 'promo'"
    store = tmp_path / "store"
    code, summary = run([*args, "--store", str(store), "--name", "bad", "--run-id", "bad"], tmp_path / "summary.json")
    assert code == 2 and summary["outcome"] == "input_rejected"
    assert summary["error"]["step"] == "validate" and message in summary["error"]["message"]
    assert message in capsys.readouterr().out  # the user sees it without opening a file
    assert [s["status"] for s in summary["steps"]] == ["failed"] + ["not_run"] * 5
    assert not (store / "models").exists() and not (store / "cache").exists()  # nothing trained or published


def test_real_process_exit_codes(tmp_path):
    """The installed `kubetune` executable: exit 2 and a readable message for a missing file and for
    an option the pipeline cannot run with (rejected before anything starts)."""
    exe = Path(sys.executable).with_name("kubetune")
    missing = subprocess.run([str(exe), "run", "--train", str(tmp_path / "nope.csv"), "--store", str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "nope.csv: no such file" in missing.stdout
    bad_option = subprocess.run([str(exe), "run", "--epochs", "-1", "--store", str(tmp_path / "s")],
                                capture_output=True, text=True, timeout=60)
    assert bad_option.returncode == 2 and "epochs=-1: train at least 1 epoch" in bad_option.stderr
    assert not (tmp_path / "s" / "models").exists()
