"""Our metrics against scikit-learn's on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from kubetune.tasks.metrics import classification_metrics


@pytest.mark.parametrize("n_classes,seed", [(2, 0), (3, 1), (5, 2)])
def test_matches_sklearn(n_classes, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, n_classes, 500))
    labels = [f"c{i}" for i in range(n_classes)]
    m = classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(n_classes)), zero_division=0)
    for i, label in enumerate(labels):
        assert m["per_class"][label]["precision"] == pytest.approx(p[i])
        assert m["per_class"][label]["recall"] == pytest.approx(r[i])
        assert m["per_class"][label]["f1"] == pytest.approx(f[i])
        assert m["per_class"][label]["support"] == s[i]
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(y_true, y_pred).tolist()


def test_a_class_never_predicted():
    y_true, y_pred = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 1, 1])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
