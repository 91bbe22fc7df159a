"""The run summary: every step's outcome, the metrics, the gate, the export and the deployment in
one JSON document, built from the run records (kubetune.storage.records). In the pipeline it is the exit
handler's task, so it is written whether the run passed, was rejected or failed.

    python -m kubetune.steps.summary --store ./kubetune-store --run-id dev [--out summary.json]

Outcome and exit code (the `kubetune run` contract):
  deployed        0   every step succeeded and production points at the new version
  failed          1   a step failed for another reason (its error is in "error")
  input_rejected  2   a step rejected the input or the options: nothing trained, nothing published
  gate_rejected   3   the gate refused the model: export and deploy skipped, nothing published
  skipped         0   the data equals the production model's (kubetune.steps.freshness): not retrained
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kubetune import tasks
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.fanout import is_piece
from kubetune.errors import OUTCOMES, outcome_of
from kubetune.storage.records import STEPS, RunRecord

TRAINING = ("tokenize", "finetune", "evaluate", "export", "deploy")  # what freshness skips
FANNED_OUT = ("validate", "tokenize")  # steps whose large-data work runs as pieces (kubetune.core.fanout)


def _failed_piece(record: RunRecord, step: str) -> dict | None:
    """The record of a failed fan-out piece of `step` (steps/<step>-<piece>.json), if any."""
    for key in record.store.list(record.key("steps")):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        if name.startswith(f"{step}-") and is_piece(name[len(step) + 1:]):
            piece = record.store.read_json(key)
            if piece.get("status") == "failed":
                return piece
    return None


def build_summary(record: RunRecord, pipeline_state: str = "") -> dict:
    steps = {name: record.read_json(f"steps/{name}.json") for name in STEPS}
    evaluation = record.read_json("evaluation.json")
    export = record.read_json("export.json")
    deployment = record.read_json("deployment.json")
    for name in FANNED_OUT:  # a failed piece task is its step's failure (the step itself then never ran)
        if steps.get(name) is None and (piece := _failed_piece(record, name)):
            steps[name] = piece
    freshness = record.read_json("steps/freshness.json")
    if freshness and freshness.get("status") == "failed":
        steps = {**steps, "freshness": freshness}  # so its error is reported
    skip = (freshness or {}).get("outputs") if ((freshness or {}).get("outputs") or {}).get("train") is False else None
    failed = next((s for s in steps.values() if s and s.get("status") == "failed"), None)
    gate = evaluation["gate"] if evaluation else None

    if failed:
        outcome = outcome_of(failed["error"].get("exit_code", 1))  # the exit-code table of kubetune.errors
    elif gate is not None and not gate["passed"]:
        outcome = "gate_rejected"
    elif skip:
        outcome = "skipped"
    elif deployment:
        outcome = "deployed"
    else:
        outcome = "failed"  # e.g. a pod killed before it could write its record

    rows = []
    for name, s in steps.items():
        if name not in STEPS:
            continue
        if s:
            rows.append({"name": name, "status": s["status"], "seconds": s.get("seconds")})
        else:  # never ran: skipped by the gate, or not reached after a failure
            skipped = (outcome == "gate_rejected" and name in ("export", "deploy")) or (outcome == "skipped" and name in TRAINING)
            status = "skipped" if skipped else "not_run"
            rows.append({"name": name, "status": status, "seconds": None})

    metrics = None
    if evaluation:
        metrics = {k: evaluation["metrics"][k] for k in tasks.get(evaluation["task"]).summary_metrics}
    return {
        "run_id": record.run_id,
        "store": record.store.uri,
        "task": evaluation["task"] if evaluation else None,
        "outcome": outcome,
        "exit_code": OUTCOMES[outcome],
        "error": failed and {"step": failed["name"], **failed["error"]},
        "pipeline_state": pipeline_state or None,
        "steps": rows,
        "metrics": metrics,
        # how long it trained and why (epochs=0: chosen from the data size by the finetune step)
        "training": steps.get("finetune") and {k: (steps["finetune"].get("outputs") or {}).get(k)
                                                for k in ("epochs", "epochs_reason", "epochs_run", "best_epoch")},
        "gate": gate and {k: gate.get(k) for k in ("passed", "metric", "value", "threshold", "tolerance",
                                                   "champion_value", "champion_version", "reason")},
        "onnx": export and {**{k: export.get(k) for k in ("uri", "max_abs_diff", "argmax_agreement")},
                            "variants": {name: {k: v.get(k) for k in ("agreement", "accuracy", "accuracy_drop", "size_bytes")}
                                         for name, v in (export.get("variants") or {}).items()},
                            # best-effort variants that failed their check: dropped, with their numbers
                            "rejected_variants": {name: {k: v.get(k) for k in ("agreement", "decided_agreement", "accuracy",
                                                                               "accuracy_drop", "problems")}
                                                  for name, v in (export.get("rejected_variants") or {}).items()}},
        "deployment": deployment and {k: deployment.get(k) for k in ("model_uri", "version", "manifest_uri", "rollout")},
        "skip": skip and {k: skip.get(k) for k in ("reason", "fingerprint", "production_version")},
    }


def run_step(*, store_uri: str, run_id: str, pipeline_state: str = "") -> dict:
    with step_context("summary", store_uri=store_uri, run_id=run_id, record=False) as ctx:
        summary = build_summary(ctx.record, pipeline_state)
        ctx.record.write_json("summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.summary", __doc__)
    p.add_argument("--out", type=Path, help="also write the summary here")
    a = p.parse_args(argv)
    result = {}

    def go():
        result.update(run_step(store_uri=a.store, run_id=a.run_id))
        text = json.dumps(result, indent=2)
        if a.out:
            a.out.write_text(text)
        print(text)

    return run_main(go) or result["exit_code"]  # the run's exit code (kubetune.errors)


if __name__ == "__main__":
    sys.exit(main())
