"""The HTML reports people look at, rendered in headless Chromium: the training report published
with a registry version and a drift report. Each must render with no console error and request
nothing outside the file (the Kubeflow UI may have no egress)."""

from __future__ import annotations

import json
from html import escape

import pytest

from kubetune.monitoring import drift, profile
from kubetune.monitoring.report import drift_html
from kubetune.release import registry
from kubetune.release.manifests import ServingConfig
from kubetune.steps.deploy import REPORT_FILE, deploy
from kubetune.steps.evaluate import GateConfig, evaluate
from kubetune.storage.records import RunRecord
from kubetune.storage.store import open_store
from tests.helpers.browser import render
from tests.helpers.corpora import newsgroups_posts

SCREENSHOTS = "kt-test-report-screenshots"  # under the pytest tmp folder; kept for a person to look at


@pytest.fixture(scope="module")
def training_report(tmp_path_factory, trained_model, exported_model, small_tokens, small_dataset):
    """The training report of a real deploy, as published in the version folder."""
    tmp = tmp_path_factory.mktemp("deployed")
    store = open_store(str(tmp / "store"))
    record = RunRecord(store, "20261202-000000-aaaaaa")
    record.write_json("steps/finetune.json", {"config": {"model": "builtin:all-minilm-l6-v2"},
                                              "outputs": json.loads((trained_model / "training.json").read_text())})
    evaluation = evaluate(trained_model, small_tokens, small_dataset, store, "sms-spam", GateConfig(threshold=0.5), tmp / "work")
    published = deploy(record, "sms-spam", exported_model, evaluation, ServingConfig(), tmp / "d")
    path = tmp / REPORT_FILE
    path.write_bytes(store.read_bytes(f"{registry.version_prefix('sms-spam', published['version'])}/{REPORT_FILE}"))
    return path, evaluation


@pytest.fixture(scope="module")
def drift_report(tmp_path_factory, clf, reference):
    """SMS (the session's 600-SMS reference profile) against 200 newsgroup posts."""
    rep = drift.report(reference, profile.build(clf, newsgroups_posts(200)), about={"model": "sms-spam/test"})
    path = tmp_path_factory.mktemp("drift") / "drift.html"
    path.write_text(drift_html(rep))
    return path, rep


def check_rendered(html, tmp_path_factory):
    shown = render(html, tmp_path_factory.getbasetemp() / SCREENSHOTS)
    assert shown.console == [], f"console messages (errors) while rendering {html.name}: {shown.console}"
    assert shown.external == [], f"{html.name} requested external resources: {shown.external}"
    assert shown.png.stat().st_size > 20_000, "the screenshot is (nearly) blank"
    return shown


def test_training_report_renders_offline(training_report, tmp_path_factory):
    path, evaluation = training_report
    html = path.read_text()
    assert html.count("<svg") >= 3  # learning curve(s), confusion heatmap, per-class bars
    assert ("PASSED" if evaluation["gate"]["passed"] else "REJECTED") in html and escape(evaluation["gate"]["reason"]) in html
    cm = evaluation["metrics"]["confusion_matrix"]["matrix"]
    assert all(f">{v}</text>" in html for row in cm for v in row)  # every confusion count is drawn
    assert "ONNX variants" in html
    check_rendered(path, tmp_path_factory)


def test_drift_report_renders_offline(drift_report, tmp_path_factory):
    path, rep = drift_report
    html = path.read_text()
    assert rep["drifted"] and "DRIFTED" in html
    assert all(s["name"] in html for s in rep["signals"])
    assert html.count("<svg") == sum(1 for s in rep["signals"] if "bins" in s)
    check_rendered(path, tmp_path_factory)


def test_the_render_check_catches_an_external_resource_and_a_script_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/logo.png"><script>nope()</script></body></html>')
    shown = render(bad, tmp_path / "shots")
    assert shown.external == ["http://example.invalid/logo.png"]
    assert any("nope is not defined" in m for m in shown.console)
