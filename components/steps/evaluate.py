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

Reference profile: evaluation.json also carries `profile`, the test split's profile (token lengths,
truncation, unknown tokens, scripts, gold and predicted labels, confidence, an embedding sample; see
kubetune.monitoring.profile), which deploy publishes with the version as profile.json for drift reports.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args, opt, param
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import log
from kubetune.errors import ConfigError, GateRejected, InputError
from kubetune.onnx.model import OnnxClassifier
from kubetune.release import registry
from kubetune.storage.contracts import DatasetMeta, TokensMeta, read_labels
from kubetune.storage.shards import load_split
from kubetune.storage.store import Store
from kubetune.training.modeling import TorchBackend, pick_device

STEP = "evaluate"


@dataclass(frozen=True)
class GateConfig:
    metric: str = param("", "Test metric the gate checks; empty = the task's default (macro_f1; entity_micro_f1 for NER; accuracy "
                        "for multiple choice). Sentence pairs may also gate on mrr or accuracy_at_1 (ranking a text's candidates).",
                        name="gate_metric", choices=lambda: ("", *tasks.all_metrics(gate=True)))
    threshold: float = param(0.8, "Minimum gate_metric on the test split.", name="gate_threshold")
    tolerance: float = param(0.01, "How much worse than the current production model the new one may be.", name="gate_tolerance")
    batch_size: int = opt(128, "Rows per batch when scoring the test split (also for the reference profile).")
    device: str = opt("auto", "Torch device for scoring: auto (cuda when available), cpu or cuda.")

    def check(self) -> None:
        known = tasks.all_metrics(gate=True)
        if self.metric and self.metric not in known:
            raise ConfigError(f"gate metric {self.metric!r}: use one of {', '.join(known)} (empty: the task's default)")
        if self.tolerance < 0:
            raise ConfigError(f"gate tolerance {self.tolerance}: must be >= 0")


def champion_score(store: Store, name: str, task, labels: list[str], rows: list, gold, metric: str, workdir: Path) -> dict | None:
    """The production model's `metric`, re-scored on these rows (the task's: texts, or word lists for
    token classification) when its labels match."""
    alias = registry.read_alias(store, name)
    if alias is None:
        return None
    version = alias["version"]
    local = registry.download(store, name, version, workdir / version)
    recorded = json.loads((local / "metrics.json").read_text())
    if metric not in recorded["metrics"]:
        raise ConfigError(f"the production model {name}/{version} is a {recorded.get('task')} model: it has no {metric} "
                          "to compare with; give this model another --name (model_name)")
    champion_labels = read_labels(local)
    if champion_labels != labels:
        return {"version": version, "value": recorded["metrics"][metric],
                "source": f"recorded metric (its labels {champion_labels} differ from {labels}, so it cannot be re-scored)"}
    clf = OnnxClassifier(local, device="cpu", variant="fp32")  # fp32: the same numbers as the torch side it is compared with
    return {"version": version, "value": task.champion_metrics(clf, rows, gold, labels)[metric], "source": "re-scored on this run's test split"}


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


def score_test(model_dir: Path, tokens_dir: Path, dataset_dir: Path, meta: TokensMeta, cfg: GateConfig) -> tuple[dict, list, object, dict]:
    """(test metrics, the rows a champion is re-scored on, their gold labels, the reference profile),
    as the task scores them."""
    import pandas as pd
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    task, labels = tasks.get(meta.task), meta.labels
    test = load_split(tokens_dir, "test")
    device = pick_device(cfg.device)
    backend = TorchBackend(task.model_class().from_pretrained(model_dir).to(device), meta.inputs, device)
    logits = backend.logits(test, cfg.batch_size, task.per_token)
    frame = pd.read_parquet(dataset_dir / "test.parquet")
    metrics, rows, gold = task.test_metrics(logits, test, frame, labels, DatasetMeta.read(dataset_dir).config)
    log(STEP, f"test ({len(test)} {task.row_unit}): {task.describe_test(metrics)}\n{task.card({'metrics': metrics, 'labels': labels})[2]}")
    return metrics, rows, gold, reference_profile(task, backend, tokens_dir, meta, frame, cfg)


def reference_profile(task, backend: TorchBackend, tokens_dir: Path, meta: TokensMeta, frame, cfg: GateConfig) -> dict:
    """The profile of the test split and of this model's predictions on it (kubetune.monitoring.profile),
    through the one prediction path (kubetune.tasks.predictor) that serving and batch inference use,
    on the torch model; deploy publishes it as profile.json."""
    from transformers import AutoTokenizer

    from kubetune.monitoring.profile import build
    from kubetune.tasks.predictor import Predictor

    predictor = Predictor(task, AutoTokenizer.from_pretrained(tokens_dir / "tokenizer"), meta.labels, meta.inputs, backend)
    profile = build(predictor, task.profile_texts(frame), gold=frame, batch_size=cfg.batch_size)
    log(STEP, f"reference profile: {profile['rows']} rows, unknown-token share {profile['shares']['unknown']:.3f}, "
              f"truncated {profile['shares']['truncated']:.3f}")
    return profile


def evaluate(model_dir: Path, tokens_dir: Path, dataset_dir: Path, store: Store, name: str, cfg: GateConfig, workdir: Path) -> dict:
    cfg.check()
    meta = TokensMeta.read(tokens_dir)
    task, labels = tasks.get(meta.task), meta.labels
    cfg = replace(cfg, metric=tasks.resolve_metric(task.name, cfg.metric, "gate metric", gate=True))
    metrics, rows, gold, profile = score_test(model_dir, tokens_dir, dataset_dir, meta, cfg)
    if metrics[cfg.metric] is None:  # a ranking metric over a test split without a whole candidate list
        raise InputError(f"gate metric {cfg.metric}: the test split ({dataset_dir / 'test.parquet'}) has no text with 2 or more "
                         "candidates of which one is positive, so it cannot be ranked; give a test file that keeps each text's "
                         f"candidates, or gate on {task.default_metric}")
    champion = champion_score(store, name, task, labels, rows, gold, cfg.metric, workdir)
    gate = decide(metrics[cfg.metric], champion, cfg)
    log(STEP, f"gate {'PASSED' if gate['passed'] else 'REJECTED'}: {gate['reason']}")
    return {"model_name": name, "task": task.name, "labels": labels, "test_rows": metrics["rows"], "metrics": metrics, "gate": gate,
            "profile": profile}


def run_step(*, store_uri: str, run_id: str, model_dir: Path, tokens_dir: Path, dataset_dir: Path, model_name: str,
             out_path: Path, cfg: GateConfig) -> dict:
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config={"model_name": model_name, **asdict(cfg)}) as ctx:
        result = evaluate(model_dir, tokens_dir, dataset_dir, ctx.store, registry.check_name(model_name), cfg, ctx.scratch)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        ctx.record.write_json("evaluation.json", {k: v for k, v in result.items() if k != "profile"})
        ctx.record.write_json("profile.json", result["profile"])
        ctx.outputs.update(passed=result["gate"]["passed"], reason=result["gate"]["reason"],
                           **{k: result["metrics"][k] for k in tasks.get(result["task"]).headline})
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

        if not result["gate"]["passed"]:  # for shell pipelines: exit 3, as `kubetune run` does
            raise GateRejected(f"the gate rejected the model: {result['gate']['reason']}")

    return run_main(go)


if __name__ == "__main__":
    sys.exit(main())
