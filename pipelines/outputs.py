"""Step results -> KFP output artifacts the Kubeflow UI draws (Metrics tables, confusion matrix)."""

from __future__ import annotations


def log_training(result: dict, metrics) -> None:
    metrics.log_metric("best_epoch", result["best_epoch"])
    metrics.log_metric("train_samples_per_s", result["train_samples_per_s"])
    key = f"eval_{result['selection_metric']}"
    for row in result["history"]:
        metrics.log_metric(f"epoch{row['epoch']}_{key}", round(row[key], 6))


def log_evaluation(result: dict, metrics, confusion) -> bool:
    """Logs the test metrics and confusion matrix (token classification: of word tags); returns
    the gate decision for dsl.If."""
    m, gate = result["metrics"], result["gate"]
    if result.get("task") == "token-classification":
        for key in ("entity_micro_f1", "entity_macro_f1", "entity_micro_precision", "entity_micro_recall", "token_accuracy"):
            metrics.log_metric(key, round(m[key], 6))
        for kind, scores in m["per_type"].items():
            metrics.log_metric(f"f1_{kind}", round(scores["f1"], 6))
    else:
        for key in ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall"):
            metrics.log_metric(key, round(m[key], 6))
        for label, scores in m["per_class"].items():
            metrics.log_metric(f"f1_{label}", round(scores["f1"], 6))
    metrics.log_metric("gate_passed", float(gate["passed"]))
    cm = m["confusion_matrix"]
    confusion.log_confusion_matrix(cm["labels"], cm["matrix"])
    return bool(gate["passed"])
