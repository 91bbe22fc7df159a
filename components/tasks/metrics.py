"""Metrics shared by the task families: classification scores from a confusion matrix, and
entity-level scores of IOB2 tag sequences (no scikit-learn or seqeval needed at run time; the tests
check these numbers against both)."""

from __future__ import annotations

import numpy as np

# classification metrics a gate or early stopping may use, all "higher is better"
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    cm = confusion(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision, recall = _div(tp, predicted), _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    # macro averages run over the classes seen in y_true or y_pred (scikit-learn's default)
    present = (support > 0) | (predicted > 0)
    weights = support / max(support.sum(), 1)
    return {
        "rows": int(cm.sum()),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * weights).sum()),
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": list(labels), "matrix": cm.tolist()},
    }


# ---------------------------------------------------------------------------------------------
# token classification (NER): entity-level scores with seqeval's default (conlleval) semantics

NER_METRICS = ("entity_micro_f1", "entity_macro_f1", "entity_micro_precision", "entity_micro_recall", "token_accuracy")


def _split_tag(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" or "-" not in tag else (tag[0], tag[2:])


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in an IOB2 tag sequence, read the way seqeval
    (default mode) and conlleval read it: a chunk starts at B-X, or at I-X after O or after another
    type; it ends before B, O or a change of type. So a stray I-X still counts as an entity."""
    spans, start, kind = [], None, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, t = _split_tag(tag)
        if start is not None and (prefix in ("B", "O") or t != kind):
            spans.append((kind, start, i - 1))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, t
    return spans


def entity_metrics(y_true: list[list[str]], y_pred: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 per type, micro and macro averages, and word (token)
    accuracy, for gold and predicted IOB2 tag sequences of the same lengths."""
    true_set, pred_set, types = set(), set(), set()
    correct = words = 0
    for n, (t, p) in enumerate(zip(y_true, y_pred)):
        true_set |= {(n, *s) for s in entity_spans(list(t))}
        pred_set |= {(n, *s) for s in entity_spans(list(p))}
        correct += sum(a == b for a, b in zip(t, p))
        words += len(t)
    types = sorted({s[1] for s in true_set | pred_set})

    def prf(tp: int, n_pred: int, n_true: int) -> dict:
        p, r = (tp / n_pred if n_pred else 0.0), (tp / n_true if n_true else 0.0)
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": n_true}

    hits = true_set & pred_set
    per_type = {k: prf(sum(s[1] == k for s in hits), sum(s[1] == k for s in pred_set), sum(s[1] == k for s in true_set))
                for k in types}
    micro = prf(len(hits), len(pred_set), len(true_set))
    mean = (lambda key: float(np.mean([v[key] for v in per_type.values()]))) if per_type else (lambda key: 0.0)
    return {
        "rows": len(y_true),
        "words": words,
        "entities": len(true_set),
        "predicted_entities": len(pred_set),
        "token_accuracy": correct / words if words else 0.0,
        "entity_micro_precision": micro["precision"],
        "entity_micro_recall": micro["recall"],
        "entity_micro_f1": micro["f1"],
        "entity_macro_precision": mean("precision"),
        "entity_macro_recall": mean("recall"),
        "entity_macro_f1": mean("f1"),
        "per_type": per_type,
    }


def per_type_table(m: dict) -> str:
    """The per-type scores as a Markdown table (logs, model card, benchmark notes)."""
    rows = ["| type | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |" for k, v in m["per_type"].items()]
    rows.append(f"| micro | {m['entity_micro_precision']:.4f} | {m['entity_micro_recall']:.4f} | {m['entity_micro_f1']:.4f} | {m['entities']} |")
    rows.append(f"| macro | {m['entity_macro_precision']:.4f} | {m['entity_macro_recall']:.4f} | {m['entity_macro_f1']:.4f} | {m['entities']} |")
    return "\n".join(rows)
