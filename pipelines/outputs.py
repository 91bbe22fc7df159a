"""Step results -> KFP output artifacts the Kubeflow UI draws (Metrics tables, confusion matrix)."""

from __future__ import annotations

from kubetune import tasks


def log_training(result: dict, metrics) -> None:
    metrics.log_metric("best_epoch", result["best_epoch"])
    metrics.log_metric("train_samples_per_s", result["train_samples_per_s"])
    if result.get("epochs"):  # the epochs trained for (chosen from the data size when epochs=0)
        metrics.log_metric("epochs", result["epochs"])
    key = f"eval_{result['selection_metric']}"
    for row in result["history"]:
        metrics.log_metric(f"epoch{row['epoch']}_{key}", round(row[key], 6))


def log_export(result: dict, metrics) -> None:
    """Per variant: accepted (1/0), agreement on decided rows, accuracy drop; rejected ones included."""
    metrics.log_metric("parity_max_abs_diff", result["max_abs_diff"])
    for accepted, group in ((1.0, result["variants"]), (0.0, result.get("rejected_variants") or {})):
        for name, v in group.items():
            metrics.log_metric(f"{name}_accepted", accepted)
            metrics.log_metric(f"{name}_agreement", round(v["decided_agreement"], 6))
            metrics.log_metric(f"{name}_accuracy_drop", round(v["accuracy_drop"], 6))


def log_evaluation(result: dict, metrics, confusion) -> bool:
    """Logs the task's test metrics and the confusion matrix (token classification: of word tags);
    returns the gate decision for dsl.If."""
    m, gate = result["metrics"], result["gate"]
    for key, value in tasks.get(result["task"]).kfp_metrics(m).items():
        metrics.log_metric(key, round(value, 6))
    metrics.log_metric("gate_passed", float(gate["passed"]))
    cm = m["confusion_matrix"]
    confusion.log_confusion_matrix(cm["labels"], cm["matrix"])
    return bool(gate["passed"])
