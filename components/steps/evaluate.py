"""Step 4 - evaluate: score the fine-tuned model on the test split and decide the quality gate.

    python -m kubetune.steps.evaluate --model /tmp/kt/model --tokens /tmp/kt/tokens \
        --dataset /tmp/kt/dataset --out /tmp/kt/evaluation.json --name sms-spam \
        --store ./kubetune-store --run-id dev

Metrics: accuracy, macro/weighted F1, macro precision/recall, per-class precision/recall/F1/support
and the confusion matrix (kubetune.tasks.metrics). Token classification: entity-level precision/recall/F1
per type and micro/macro averages (seqeval's default semantics) and word accuracy, against the full
gold sentences (words lost to truncation count as predicted O).

Gate: the model passes when
  1. its `metric` on the test split >= `threshold`, and
  2. it is not worse than the current production model of the same name by more than `tolerance`.
For (2) the production model is re-scored on this run's test split (same rows, same metric) when
its label set is the same; otherwise its recorded metric is used and the record says so. The
decision and its reason go to evaluation.json; the pipeline exports and deploys only on a pass.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from kubetune.release import registry
from kubetune.core.entry import add_config_args, config_from_args, run_main, step_parser
from kubetune.errors import ConfigError, GateRejected
from kubetune.tasks.metrics import (
    SEQUENCE,
    TASK_METRICS,
    TOKEN,
    classification_metrics,
    confusion,
    entity_metrics,
    per_type_table,
    resolve_metric,
)
from kubetune.training.modeling import auto_model_class, pick_device, predict_logits, predict_token_logits, word_level_tags
from kubetune.onnx.model import OnnxClassifier
from kubetune.core.progress import log
from kubetune.storage.records import open_run, scratch
from kubetune.storage.shards import load_split
from kubetune.storage.store import Store

STEP = "evaluate"
HEADLINE = {SEQUENCE: ("accuracy", "macro_f1"), TOKEN: ("entity_micro_f1", "entity_macro_f1", "token_accuracy")}


@dataclass(frozen=True)
class GateConfig:
    metric: str = ""  # empty: the task's default (macro_f1; entity_micro_f1 for token classification)
    threshold: float = 0.8
    tolerance: float = 0.01  # how much worse than production a new model may be
    batch_size: int = 128
    device: str = "auto"

    def check(self) -> None:
        known = [m for names in TASK_METRICS.values() for m in names]
        if self.metric and self.metric not in known:
            raise ConfigError(f"gate metric {self.metric!r}: use one of {', '.join(known)} (empty: the task's default)")
        if self.tolerance < 0:
            raise ConfigError(f"gate tolerance {self.tolerance}: must be >= 0")


def champion_score(store: Store, name: str, labels: list[str], rows: list, y_true, metric: str) -> dict | None:
    """The production model's `metric`, re-scored on these rows (texts, or word lists for token
    classification) when its labels match."""
    alias = registry.read_alias(store, name)
    if alias is None:
        return None
    version = alias["version"]
    local = registry.download(store, name, version, scratch(STEP) / version)
    recorded = json.loads((local / "metrics.json").read_text())
    if metric not in recorded["metrics"]:
        raise ConfigError(f"the production model {name}/{version} is a {recorded.get('task', SEQUENCE)} model: it has no {metric} "
                          "to compare with; give this model another --name (model_name)")
    champion_labels = json.loads((local / "labels.json").read_text())["labels"]
    if champion_labels != labels:
        return {"version": version, "value": recorded["metrics"][metric],
                "source": f"recorded metric (its labels {champion_labels} differ from {labels}, so it cannot be re-scored)"}
    clf = OnnxClassifier(local, device="cpu", variant="fp32")  # fp32: the same numbers as the torch side it is compared with
    if clf.task == TOKEN:
        value = entity_metrics(y_true, clf.tags_for_words(rows))[metric]
    else:
        value = classification_metrics(y_true, clf.logits_for_texts(rows).argmax(-1), labels)[metric]
    return {"version": version, "value": value, "source": "re-scored on this run's test split"}


def decide(value: float, champion: dict | None, cfg: GateConfig) -> dict:
    gate = {"metric": cfg.metric, "value": value, "threshold": cfg.threshold, "tolerance": cfg.tolerance,
            "champion_version": champion and champion["version"], "champion_value": champion and champion["value"],
            "champion_source": champion and champion["source"]}
    if value < cfg.threshold:
        return {**gate, "passed": False, "reason": f"{cfg.metric} {value:.4f} is below the threshold {cfg.threshold}"}
    if champion is not None and value < champion["value"] - cfg.tolerance:
        return {**gate, "passed": False, "reason": (
            f"{cfg.metric} {value:.4f} is worse than production {champion['version']} ({champion['value']:.4f}) "
            f"by more than the tolerance {cfg.tolerance}")}
    versus = (f" and within {cfg.tolerance} of production {champion['version']} ({champion['value']:.4f})"
              if champion else "; no production model yet")
    return {**gate, "passed": True, "reason": f"{cfg.metric} {value:.4f} >= threshold {cfg.threshold}{versus}"}


def token_test_metrics(gold: list[list[str]], kept: list[list[str]], labels: list[str] | None = None) -> dict:
    """Entity metrics against the full gold sentences: words cut off by truncation count as
    predicted O (the model never saw them), so truncation costs recall instead of vanishing. With
    `labels`, also the word-level tag confusion matrix (the Kubeflow UI draws it)."""
    pred = [p + ["O"] * (len(g) - len(p)) for g, p in zip(gold, kept)]
    metrics = entity_metrics(gold, pred)
    metrics["truncated_words"] = sum(len(g) - len(p) for g, p in zip(gold, kept))
    if labels:
        index = {t: i for i, t in enumerate(labels)}
        flat = [(index[a], index[b]) for g, p in zip(gold, pred) for a, b in zip(g, p)]
        cm = confusion(np.array([a for a, _ in flat], dtype=np.int64), np.array([b for _, b in flat], dtype=np.int64), len(labels))
        metrics["confusion_matrix"] = {"labels": list(labels), "matrix": cm.tolist()}
    return metrics


def score_test(model_dir: Path, tokens_dir: Path, dataset_dir: Path, meta: dict, cfg: GateConfig) -> tuple[dict, list, object]:
    """(test metrics, the rows a champion is re-scored on, their gold labels) for the task."""
    import pandas as pd
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    task, labels = meta.get("task", SEQUENCE), meta["labels"]
    test = load_split(tokens_dir, "test")
    device = pick_device(cfg.device)
    model = auto_model_class(task).from_pretrained(model_dir).to(device)
    predict = {"batch_size": cfg.batch_size, "pad_id": meta["pad_token_id"], "input_names": meta["model_input_names"], "device": device}
    frame = pd.read_parquet(dataset_dir / "test.parquet")
    if task == TOKEN:
        rows = predict_token_logits(model, test, **predict)
        gold = [list(t) for t in frame["tags"]]
        metrics = token_test_metrics(gold, word_level_tags(test, [r.argmax(-1) for r in rows], labels)[1], labels)
        log(STEP, f"test ({len(test)} sentences, {metrics['entities']} entities): entity micro-F1 {metrics['entity_micro_f1']:.4f}, "
                  f"macro-F1 {metrics['entity_macro_f1']:.4f}, token accuracy {metrics['token_accuracy']:.4f}\n{per_type_table(metrics)}")
        return metrics, [list(t) for t in frame["tokens"]], gold
    metrics = classification_metrics(test.labels, predict_logits(model, test, **predict).argmax(-1), labels)
    log(STEP, f"test ({len(test)} rows): accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
              + ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in metrics["per_class"].items()))
    return metrics, frame["text"].tolist(), test.labels


def evaluate(model_dir: Path, tokens_dir: Path, dataset_dir: Path, store: Store, name: str, cfg: GateConfig) -> dict:
    cfg.check()
    meta = json.loads((tokens_dir / "meta.json").read_text())
    labels, task = meta["labels"], meta.get("task", SEQUENCE)
    cfg = replace(cfg, metric=resolve_metric(task, cfg.metric, "gate metric"))
    metrics, rows, y_true = score_test(model_dir, tokens_dir, dataset_dir, meta, cfg)
    test_rows = metrics["rows"]

    champion = champion_score(store, name, labels, rows, y_true, cfg.metric)
    gate = decide(metrics[cfg.metric], champion, cfg)
    log(STEP, f"gate {'PASSED' if gate['passed'] else 'REJECTED'}: {gate['reason']}")
    return {"model_name": name, "task": task, "labels": labels, "test_rows": test_rows, "metrics": metrics, "gate": gate}


def run_step(*, store_uri: str, run_id: str, model_dir: Path, tokens_dir: Path, dataset_dir: Path, model_name: str,
             out_path: Path, cfg: GateConfig) -> dict:
    record = open_run(store_uri, run_id)
    with record.step(STEP, config={"model_name": model_name, **asdict(cfg)}) as rec:
        result = evaluate(model_dir, tokens_dir, dataset_dir, record.store, registry.check_name(model_name), cfg)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        record.write_json("evaluation.json", result)
        rec["outputs"] = {"passed": result["gate"]["passed"], "reason": result["gate"]["reason"],
                          **{k: result["metrics"][k] for k in HEADLINE[result["task"]]}}
    return result


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.evaluate", __doc__)
    p.add_argument("--model", required=True, type=Path, help="fine-tuned model folder (finetune's output)")
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="evaluation.json to write")
    p.add_argument("--name", required=True, help="registry model name (its production model is the champion)")
    add_config_args(p, GateConfig)
    a = p.parse_args(argv)
    result = {}

    def go():
        result.update(run_step(store_uri=a.store, run_id=a.run_id, model_dir=a.model, tokens_dir=a.tokens,
                               dataset_dir=a.dataset, model_name=a.name, out_path=a.out, cfg=config_from_args(GateConfig, a)))

    code = run_main(go)
    # for shell pipelines: 3 when the gate rejected the model, as `kubetune run` does
    return code or (0 if result["gate"]["passed"] else GateRejected.exit_code)


if __name__ == "__main__":
    sys.exit(main())
