"""Drift reports on real data: the real model fine-tuned on SMS and exported to ONNX, a reference
profile of real SMS, then a held-out SMS slice (no drift), 20 Newsgroups posts and Chinese product
reviews (drift), and `kubetune drift` against a published registry version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kubetune.monitoring import drift, features, profile
from tests.helpers.corpora import chinese_reviews, newsgroups_posts


def signal(rep: dict, name: str) -> dict:
    return next(s for s in rep["signals"] if s["name"] == name)


def show(what: str, rep: dict) -> None:
    """The measured figures, for `pytest -s` (the README's table comes from them)."""
    parts = [f"{s['name']} " + (f"JS {s['js_distance']:.3f} p {s['p_value']:.2g}" if "js_distance" in s else
                                f"{s['reference']:.3f}->{s['current']:.3f}" if s["kind"] == "share" else f"AUC {s['auc']}")
             for s in rep["signals"]]
    print(f"\n[drift] {what}: drifted={rep['drifted']} | " + " | ".join(parts))


def test_the_profile_describes_the_texts(clf, reference, sms_rows):
    texts = [t for _, t in sms_rows[1000:1600]]
    assert reference["rows"] == 600 and sum(reference["histograms"]["token_length"]["counts"]) == 600
    assert sum(reference["histograms"]["confidence"]["counts"]) == 600
    predicted = [p["label"] for p in clf.predict(texts)]
    assert reference["distributions"]["predicted_label"] == {k: predicted.count(k) for k in clf.labels}
    lengths = [len(r) for r in clf.tokenizer(texts, truncation=True, max_length=clf.max_length)["input_ids"]]
    assert reference["shares"]["truncated"] == pytest.approx(np.mean([n >= clf.max_length for n in lengths]), abs=0.01)
    assert reference["distributions"]["script"]["latin"] > 0.95 * sum(reference["distributions"]["script"].values())
    sample = np.array(reference["embedding"]["sample"])
    assert sample.shape == (profile.EMBED_SAMPLE, features.EMBED_DIM)
    assert np.allclose(np.linalg.norm(sample, axis=1), 1, atol=1e-3)
    json.dumps(reference)  # it is published as JSON


def test_a_held_out_sms_slice_does_not_drift(clf, reference, sms_rows):
    rep = drift.report(reference, profile.build(clf, [t for _, t in sms_rows[3000:3400]]))
    show("held-out SMS (400)", rep)
    assert rep["drifted"] is False, rep["drifted_signals"]
    assert signal(rep, "embedding_domain_auc")["auc"] < 0.65  # a classifier cannot tell the two SMS samples apart
    assert all(s["js_distance"] < 0.1 or s["p_value"] >= 0.01 for s in rep["signals"] if "js_distance" in s)


def test_newsgroup_posts_drift(clf, reference):
    rep = drift.report(reference, profile.build(clf, newsgroups_posts(400)))
    show("20 Newsgroups (400)", rep)
    assert rep["drifted"] is True
    assert signal(rep, "embedding_domain_auc")["auc"] > 0.9
    assert {"embedding_domain_auc", "token_length"} <= set(rep["drifted_signals"])
    assert signal(rep, "token_length")["p_value"] < 1e-6


def test_chinese_reviews_drift_on_unknown_tokens_and_script(clf, reference):
    rep = drift.report(reference, profile.build(clf, [t for t, _ in chinese_reviews(300)]))
    show("Chinese reviews (300)", rep)
    assert rep["drifted"] is True
    unknown = signal(rep, "unknown_share")
    assert unknown["drifted"] and unknown["current"] > 0.3 and unknown["reference"] < 0.01
    assert signal(rep, "script")["drifted"] and signal(rep, "script")["js_distance"] > 0.9
    assert "embedding_domain_auc" in rep["drifted_signals"]


def test_shuffled_predictions_shift_the_label_distribution(clf, reference, sms_rows):
    """Spam-only SMS: same kind of text, but the predicted-label share moves far."""
    spam = [t for label, t in sms_rows[2000:] if label == "spam"][:200]
    rep = drift.report(reference, profile.build(clf, spam))
    show("spam-only SMS (200)", rep)
    assert signal(rep, "predicted_label")["drifted"]
    shift = rep["predicted_label_shift"]["spam"]
    assert shift["current"] > shift["reference"] + 0.4


def test_thresholds_are_checked():
    with pytest.raises(Exception, match="drift thresholds"):
        drift.Thresholds(drift_auc=0.3).check()


def test_kubetune_drift_against_a_registry_version(tmp_path, exported_model, clf, reference, sms_rows, capsys):
    """`kubetune drift --model NAME[@alias|version] --input URI` on a published version with its profile."""
    import shutil

    from kubetune.errors import InputError
    from kubetune.pipelines.cli import main
    from kubetune.release import registry
    from kubetune.storage.store import open_store
    from tests.conftest import write_csv

    store = open_store(str(tmp_path / "store"))
    V1, V0 = "v20261201-000000-one", "v20261130-000000-old"  # registry version names (issue 12 checks them)
    folder = tmp_path / V1
    shutil.copytree(exported_model, folder)
    (folder / "profile.json").write_text(json.dumps(reference))
    store.publish_dir(folder, registry.version_prefix("sms-spam", V1))
    registry.set_alias(store, "sms-spam", registry.PRODUCTION, V1, "test")
    news = write_csv(tmp_path / "news.csv", [(t, "x") for t in newsgroups_posts(150)])
    sms = write_csv(tmp_path / "sms.csv", [(t, "x") for _, t in sms_rows[4000:4300]])

    assert main(["drift", "--store", str(store.uri), "--model", "sms-spam@production", "--input", str(news), "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "drift.json").read_text())
    assert rep["drifted"] is True and rep["model"] == "sms-spam/" + V1 and rep["rows"] == 150
    assert "DRIFTED" in capsys.readouterr().out and "<svg" in (tmp_path / "a" / "drift.html").read_text()
    assert main(["drift", "--store", str(store.uri), "--model", f"sms-spam@{V1}", "--input", str(sms), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "drift.json").read_text())["drifted"] is False
    assert registry.parse_ref("sms-spam") == registry.ModelRef("sms-spam", "production")
    assert registry.parse_ref("sms-spam@canary") == registry.parse_ref("models/sms-spam/canary") == registry.ModelRef("sms-spam", "canary")

    store.publish_dir(exported_model, registry.version_prefix("sms-spam", V0))  # published before profiles existed
    assert main(["drift", "--store", str(store.uri), "--model", f"sms-spam@{V0}", "--input", str(sms), "--out", str(tmp_path / "c")]) == 2
    assert "has no profile.json" in capsys.readouterr().err
    with pytest.raises(InputError):
        registry.parse_ref("Bad Name@v1")
