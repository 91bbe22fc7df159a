"""Evaluate (metrics and gate), export (ONNX parity) and deploy (registry, alias, manifest) on the
tiny model fine-tuned on real rows (tests/conftest.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
import yaml

from kubetune.errors import ConfigError, InputError
from kubetune.onnx.model import OnnxClassifier
from kubetune.release import registry
from kubetune.release.manifests import ServingConfig
from kubetune.steps.deploy import deploy
from kubetune.steps.evaluate import GateConfig, decide, evaluate
from kubetune.steps.export import ExportConfig, ParityError, check_parity
from kubetune.storage.contracts import TokensMeta
from kubetune.storage.records import RunRecord
from kubetune.storage.shards import load_split
from kubetune.storage.store import StoreError, open_store

# ---- gate decisions -----------------------------------------------------------------------------


def test_gate_decisions():
    cfg = GateConfig(metric="macro_f1", threshold=0.8, tolerance=0.01)
    assert decide(0.85, None, cfg)["passed"] and "no production model yet" in decide(0.85, None, cfg)["reason"]
    low = decide(0.79, None, cfg)
    assert not low["passed"] and low["reason"] == "macro_f1 0.7900 is below the threshold 0.8"
    champ = {"version": "v1", "value": 0.90, "source": "re-scored"}
    worse = decide(0.88, champ, cfg)
    assert not worse["passed"] and "worse than production v1 (0.9000) by more than the tolerance 0.01" in worse["reason"]
    within = decide(0.895, champ, cfg)
    assert within["passed"] and within["champion_value"] == 0.90 and within["champion_version"] == "v1"
    with pytest.raises(ConfigError, match="gate metric 'f1'"):
        GateConfig(metric="f1").check()


# ---- evaluate -----------------------------------------------------------------------------------


def test_evaluate_scores_the_test_split(tmp_path, trained_model, small_tokens, small_dataset):
    store = open_store(str(tmp_path / "store"))
    result = evaluate(trained_model, small_tokens, small_dataset, store, "sms-spam", GateConfig(threshold=0.5), tmp_path / "work")
    test = pd.read_parquet(small_dataset / "test.parquet")
    m = result["metrics"]
    assert result["test_rows"] == m["rows"] == len(test)
    assert sum(v["support"] for v in m["per_class"].values()) == len(test)
    assert m["per_class"]["spam"]["support"] == int((test["label"] == "spam").sum())
    assert np.array(m["confusion_matrix"]["matrix"]).sum() == len(test)
    assert result["gate"]["champion_value"] is None and result["gate"]["passed"] == (m["macro_f1"] >= 0.5)


# ---- export -------------------------------------------------------------------------------------


def test_export_folder_and_dynamic_axes(exported_model):
    names = {p.name for p in exported_model.iterdir()}
    assert {"model.onnx", "tokenizer.json", "labels.json", "kubetune.json", "parity.json", "config.json"} <= names
    graph = onnx.load(str(exported_model / "model.onnx"), load_external_data=False).graph
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param != "" for d in dims] == [True, True], inp.name  # batch and sequence are symbolic
    parity = json.loads((exported_model / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] < 1e-3 and parity["argmax_agreement"] == 1.0
    assert json.loads((exported_model / "labels.json").read_text()) == {"labels": ["ham", "spam"]}


def test_onnx_matches_torch_on_raw_texts(exported_model, trained_model, sms_rows):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [t for _, t in sms_rows[1000:1003]] + ["ok", "URGENT! You have won a 1 week FREE membership " * 3]
    clf = OnnxClassifier(exported_model, variant="fp32")
    got = clf.logits(clf.encode(texts).split, batch_size=2)
    model = AutoModelForSequenceClassification.from_pretrained(trained_model).eval()
    tok = AutoTokenizer.from_pretrained(trained_model)
    with torch.no_grad():
        want = model(**tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits.numpy()
    assert np.abs(got - want).max() < 1e-3


def test_parity_check_catches_a_wrong_graph(exported_model, trained_model, small_tokens):
    from transformers import AutoModelForSequenceClassification

    from kubetune.training.modeling import TorchBackend

    model = AutoModelForSequenceClassification.from_pretrained(trained_model).eval()
    inputs = TokensMeta.read(small_tokens).inputs
    split = load_split(small_tokens, "test")
    clf = OnnxClassifier(exported_model, variant="fp32")
    ok, logits = check_parity(TorchBackend(model, inputs, torch.device("cpu")).logits(split, 32), clf, split, ExportConfig(parity_rows=5))
    assert ok["passed"] and ok["batch_1"] == {"rows": 5, "max_abs_diff": ok["batch_1"]["max_abs_diff"], "argmax_agreement": 1.0}
    assert ok["batch_32"]["rows"] == len(split) == len(logits) and np.abs(logits - clf.logits(split, 32)).max() == 0
    with torch.no_grad():
        model.classifier.bias += torch.tensor([5.0, -5.0])  # the torch side now disagrees with the graph
    bad, _ = check_parity(TorchBackend(model, inputs, torch.device("cpu")).logits(split, 32), clf, split, ExportConfig())
    assert not bad["passed"] and bad["max_abs_diff"] > 1.0


@pytest.mark.slow
def test_export_fails_loudly_on_parity(tmp_path, trained_model, small_tokens, monkeypatch):
    import kubetune.steps.export as ex

    monkeypatch.setattr(ex, "check_parity", lambda *a, **k: ({"rows": 3, "max_abs_diff": 0.5, "argmax_agreement": 0.9, "passed": False},
                                                              None))
    with pytest.raises(ParityError, match=r"ONNX parity failed: max \|logit diff\| 5.000e-01 .* argmax agreement 0.9000"):
        ex.export(trained_model, small_tokens, tmp_path / "onnx", ExportConfig(parity_rows=8), tmp_path / "work")


@pytest.mark.slow
def test_export_falls_back_to_torch_export(tmp_path, trained_model, small_tokens, monkeypatch):
    """A torch without a working TorchScript exporter: the graph comes from torch.export, is checked the
    same way, the variants are built from it, and the record says which exporter ran."""
    import kubetune.steps.export as ex

    def gone(*a, **k):
        raise RuntimeError("the TorchScript exporter was removed")

    monkeypatch.setattr(ex, "torchscript_export", gone)
    out = tmp_path / "onnx"
    result = ex.export(trained_model, small_tokens, out, ExportConfig(parity_rows=8, variants="fp32,optimized"), tmp_path / "work")
    assert result["exporter"] == "torch.export" and result["passed"]
    assert result["variants"]["optimized"]["source"] == "torch.export" and set(result["variants"]) == {"fp32", "optimized"}
    assert {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node} != set()


def test_cuda_provider_is_never_a_silent_fallback(exported_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="CUDA was requested but ONNX Runtime runs \\['CPUExecutionProvider'\\]"):
        OnnxClassifier(exported_model, device="cuda")


# ---- deploy, registry and the champion -----------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained_model, small_tokens, small_dataset):
    """Evaluate runs once for the deploy tests."""
    tmp = tmp_path_factory.mktemp("evaluation")
    return evaluate(trained_model, small_tokens, small_dataset, open_store(str(tmp / "scratch")), "sms-spam",
                    GateConfig(threshold=0.5), tmp / "evaluate-work")


@pytest.fixture
def evaluation(evaluated):
    return copy.deepcopy(evaluated)  # deploy takes the profile out of the evaluation it is given


def test_deploy_publishes_then_moves_the_alias(tmp_path, exported_model, evaluation, trained_model, small_tokens, small_dataset):
    store = open_store(str(tmp_path / "store"))
    first = deploy(RunRecord(store, "20261123-000000-aaaaaa"), "sms-spam", exported_model, evaluation, ServingConfig(namespace="ml"),
                   tmp_path / "d1")
    prefix = registry.version_prefix("sms-spam", first["version"])
    files = set(store.manifest(prefix)["files"])
    assert {"model.onnx", "tokenizer.json", "labels.json", "metrics.json", "MODEL_CARD.md", "inferenceservice.yaml", "profile.json",
            "report.html"} <= files
    # the reference profile of the test split travels with the version; metrics.json stays small
    reference = store.read_json(f"{prefix}/profile.json")
    test = pd.read_parquet(small_dataset / "test.parquet")
    assert reference["rows"] == len(test) and reference["gold"]["label"] == test["label"].value_counts().to_dict()
    assert sum(reference["distributions"]["predicted_label"].values()) == len(test)
    assert len(reference["embedding"]["sample"]) == len(test)
    assert "profile" not in store.read_json(f"{prefix}/metrics.json")
    alias = registry.read_alias(store, "sms-spam")
    assert alias["version"] == first["version"] and alias["previous"] is None
    isvc = yaml.safe_load(store.read_bytes(f"{prefix}/inferenceservice.yaml"))
    container = isvc["spec"]["predictor"]["containers"][0]
    assert isvc["kind"] == "InferenceService" and isvc["metadata"] == {**isvc["metadata"], "name": "sms-spam", "namespace": "ml"}
    assert {"name": "STORAGE_URI", "value": store.url(prefix)} in container["env"]
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    card = store.read_bytes(f"{prefix}/MODEL_CARD.md").decode()
    assert f"macro-F1 {evaluation['metrics']['macro_f1']:.4f}" in card

    # the next model is gated against this one, re-scored on the same test rows: same model, same score
    again = evaluate(trained_model, small_tokens, small_dataset, store, "sms-spam", GateConfig(threshold=0.5), tmp_path / "work2")
    assert again["gate"]["champion_version"] == first["version"]
    assert again["gate"]["champion_value"] == pytest.approx(again["gate"]["value"], abs=1e-9)
    assert again["gate"]["passed"]

    second = deploy(RunRecord(store, "20261123-000100-bbbbbb"), "sms-spam", exported_model, again, ServingConfig(), tmp_path / "d2")
    alias = registry.read_alias(store, "sms-spam")
    assert alias["version"] == second["version"] and alias["previous"] == first["version"]
    assert registry.versions(store, "sms-spam") == sorted([first["version"], second["version"]])
    assert registry.resolve(store, "models/sms-spam/production") == ("sms-spam", second["version"])
    assert registry.resolve(store, f"sms-spam/{first['version']}") == ("sms-spam", first["version"])
    with pytest.raises(InputError, match="has no version or alias 'staging'"):
        registry.resolve(store, "models/sms-spam/staging")


def test_failed_publish_keeps_production(tmp_path, exported_model, evaluation, monkeypatch):
    store = open_store(str(tmp_path / "store"))
    first = deploy(RunRecord(store, "r1"), "sms-spam", exported_model, evaluation, ServingConfig(), tmp_path / "d1")

    def broken(*a, **k):
        raise StoreError("endpoint went away")

    monkeypatch.setattr(store, "publish_dir", broken)
    with pytest.raises(StoreError):
        deploy(RunRecord(store, "r2"), "sms-spam", exported_model, evaluation, ServingConfig(), tmp_path / "d2")
    assert registry.read_alias(store, "sms-spam")["version"] == first["version"]


def test_deploy_refuses_a_rejected_model_and_bad_names(tmp_path, exported_model, evaluation):
    store = open_store(str(tmp_path / "store"))
    rejected = {**evaluation, "gate": {**evaluation["gate"], "passed": False, "reason": "below threshold"}}
    with pytest.raises(ConfigError, match="the gate rejected it"):
        deploy(RunRecord(store, "r1"), "sms-spam", exported_model, rejected, ServingConfig(), tmp_path / "d3")
    assert store.list("models") == []
    for bad in ("SMS", "1spam", "a_b", "x" * 41, ""):
        with pytest.raises(InputError, match="lowercase letters"):
            registry.check_name(bad)
    assert registry.name_from_uri("s3://b/x/Reviews_2024.csv") == "reviews-2024"
    assert registry.name_from_uri("builtin:sms-spam") == "sms-spam"
    assert registry.name_from_uri("/data/2024.jsonl") == "m-2024"
