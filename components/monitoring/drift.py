"""A drift report: a profile of new data (kubetune.monitoring.profile) against a version's
reference profile.

Signals and what their thresholds mean (Thresholds below; `kubetune drift --help` shows them):
- every histogram (token_length, confidence, task ones such as entities_per_sentence) and every
  distribution (script, predicted_label / predicted_entity_type): the Jensen-Shannon distance
  (base 2: 0 = same, 1 = disjoint) between reference and current shares. A signal drifts when the
  distance exceeds `drift_js` (0.1, Evidently's default for this distance) AND a chi-squared test of the
  two count tables gives p < `drift_p_value` (0.01): small samples have large chance distances (a few
  hundred rows in ten bins give ~0.1 from sampling alone), so the test keeps noise from drifting.
  PSI (population stability index) is reported with each histogram for those used to it
  (> 0.2 is the usual "significant shift"); the verdict uses the distance and the test.
- shares (truncated rows, unknown tokens): drift when the share moves by more than `drift_share` (0.05,
  five points) either way.
- embedding: a logistic regression (scikit-learn, 5-fold cross-validated) learns to tell reference
  rows from current rows on the hashed bag-of-tokens embedding (features.embed); its ROC AUC is
  ~0.5 when it cannot (same population) and near 1 when the texts differ. Drift when AUC > `drift_auc`
  (0.7). Needs at least 20 rows on each side; otherwise the signal is reported as skipped.
The verdict `drifted` is true when any signal drifts; `predicted_label_shift` lists how each label's
share of predictions moved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kubetune.core.config import param
from kubetune.errors import ConfigError

MIN_ROWS = 20  # per side, for the domain classifier


@dataclass(frozen=True)
class Thresholds:
    drift_js: float = param(0.1, "Drift when a histogram's Jensen-Shannon distance to the reference exceeds this (and the "
                      "chi-squared test is significant).")
    drift_p_value: float = param(0.01, "Significance level of the chi-squared test that must back a distance.")
    drift_share: float = param(0.05, "Drift when the truncated or unknown-token share moves by more than this.")
    drift_auc: float = param(0.7, "Drift when the domain classifier's ROC AUC (reference vs new texts) exceeds this.")

    def check(self) -> None:
        if not (0 < self.drift_js < 1 and 0 < self.drift_p_value < 1 and 0 < self.drift_share < 1 and 0.5 <= self.drift_auc < 1):
            raise ConfigError(f"drift thresholds {asdict(self)}: drift_js, drift_p_value and drift_share must be in (0, 1), "
                              "drift_auc in [0.5, 1)")


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.spatial.distance import jensenshannon

    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def psi(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of shares q against p (empty bins get `eps` so the log is finite)."""
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    a, b = np.maximum(p / p.sum(), eps), np.maximum(q / q.sum(), eps)
    return float(np.sum((b - a) * np.log(b / a)))


def chi2_p(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.stats import chi2_contingency

    keep = (p + q) > 0
    if keep.sum() < 2 or p.sum() == 0 or q.sum() == 0:
        return 1.0
    return float(chi2_contingency(np.vstack([p[keep], q[keep]]))[1])


def compare_counts(name: str, kind: str, ref: np.ndarray, cur: np.ndarray, bins: list, t: Thresholds) -> dict:
    distance, p = js_distance(ref, cur), chi2_p(ref, cur)
    return {"name": name, "kind": kind, "bins": bins, "reference": ref.astype(int).tolist(), "current": cur.astype(int).tolist(),
            "js_distance": round(distance, 4), "psi": round(psi(ref, cur), 4), "p_value": float(f"{p:.3g}"),
            "threshold": t.drift_js, "drifted": bool(distance > t.drift_js and p < t.drift_p_value)}


def histogram_signals(reference: dict, current: dict, t: Thresholds) -> list[dict]:
    out = []
    for name, ref in reference["histograms"].items():
        cur = current["histograms"].get(name)
        if cur is None or cur["edges"] != ref["edges"]:
            continue  # a profile of another max_length or format: not comparable bin by bin
        edges = ref["edges"]
        # the last bin of width 1 holds the values clipped into it (token lengths at max_length: truncated)
        bins = [f"{a:g}+" if i == len(edges) - 2 and b - a == 1 else f"{a:g}-{b:g}" for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
        out.append(compare_counts(name, "histogram", np.array(ref["counts"], float), np.array(cur["counts"], float), bins, t))
    for name, ref in reference["distributions"].items():
        cur = current["distributions"].get(name)
        if cur is None:
            continue
        keys = list(dict.fromkeys([*ref, *cur]))
        out.append(compare_counts(name, "distribution", np.array([ref.get(k, 0) for k in keys], float),
                                  np.array([cur.get(k, 0) for k in keys], float), keys, t))
    return out


def share_signals(reference: dict, current: dict, t: Thresholds) -> list[dict]:
    out = []
    for name, ref in reference["shares"].items():
        cur = current["shares"].get(name, 0.0)
        out.append({"name": f"{name}_share", "kind": "share", "reference": ref, "current": cur, "change": round(cur - ref, 4),
                    "threshold": t.drift_share, "drifted": bool(abs(cur - ref) > t.drift_share)})
    return out


def domain_classifier(reference: dict, current: dict, t: Thresholds, seed: int = 0) -> dict:
    """Cross-validated ROC AUC of a classifier telling reference embeddings from current ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    ref, cur = np.array(reference["embedding"]["sample"]), np.array(current["embedding"]["sample"])
    base = {"name": "embedding_domain_auc", "kind": "classifier", "reference_rows": len(ref), "current_rows": len(cur),
            "threshold": t.drift_auc}
    if min(len(ref), len(cur)) < MIN_ROWS or ref.shape[1:] != cur.shape[1:]:
        return {**base, "auc": None, "drifted": False, "skipped": f"needs {MIN_ROWS}+ rows of the same embedding on each side"}
    x = np.vstack([ref, cur])
    y = np.r_[np.zeros(len(ref)), np.ones(len(cur))]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), x, y, cv=folds, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(y, scores))
    return {**base, "auc": round(auc, 4), "drifted": bool(auc > t.drift_auc)}


def label_shift(reference: dict, current: dict) -> dict:
    """How each predicted label's (or entity type's) share moved, in points of share."""
    name = next((k for k in reference["distributions"] if k.startswith("predicted_")), None)
    if name is None or name not in current["distributions"]:
        return {}
    ref, cur = reference["distributions"][name], current["distributions"][name]
    rt, ct = sum(ref.values()) or 1, sum(cur.values()) or 1
    return {k: {"reference": round(ref.get(k, 0) / rt, 4), "current": round(cur.get(k, 0) / ct, 4),
                "change": round(cur.get(k, 0) / ct - ref.get(k, 0) / rt, 4)} for k in dict.fromkeys([*ref, *cur])}


def report(reference: dict, current: dict, t: Thresholds | None = None, about: dict | None = None) -> dict:
    """The drift report of `current` against `reference` (both profiles); `about`: where they came from."""
    t = t or Thresholds()
    t.check()
    signals = histogram_signals(reference, current, t) + share_signals(reference, current, t)
    signals.append(domain_classifier(reference, current, t))
    drifted = [s["name"] for s in signals if s["drifted"]]
    return {"drifted": bool(drifted), "drifted_signals": drifted, "rows": current["rows"], "reference_rows": reference["rows"],
            "task": reference["task"], "thresholds": asdict(t), "signals": signals,
            "predicted_label_shift": label_shift(reference, current), **(about or {})}


def kfp_metrics(rep: dict) -> dict[str, float]:
    """Scalars for the Kubeflow UI's Metrics table."""
    out = {"drifted": float(rep["drifted"]), "drifted_signals": float(len(rep["drifted_signals"])), "rows": float(rep["rows"])}
    for s in rep["signals"]:
        if s["kind"] in ("histogram", "distribution"):
            out[f"js_{s['name']}"] = s["js_distance"]
        elif s["kind"] == "share":
            out[s["name"]] = s["current"]
        elif s.get("auc") is not None:
            out["domain_auc"] = s["auc"]
    return out
