"""Step 6 - deploy: publish the exported model as a registry version, roll it out to the deploy
target (registry | kserve | gitops, see kubetune.release.rollout) and move `production` to it.

    python -m kubetune.steps.deploy --onnx /tmp/kt/onnx --evaluation /tmp/kt/evaluation.json \
        --name sms-spam --store ./kubetune-store --run-id dev [--target kserve --canary-traffic-percent 10]

Order matters for readers: (1) the version folder is published atomically (see kubetune.storage.store),
(2) the target takes it (KServe Ready, or the GitOps commit pushed), (3) then the alias moves by
compare-and-swap. A failure before (3) leaves production untouched (and KServe on its old spec).
The version folder holds the ONNX model folder plus metrics.json (with the data fingerprint that
lets a scheduled run skip retraining on unchanged data), MODEL_CARD.md, report.html (the training
report), profile.json (the reference profile drift reports compare with) and the KServe
InferenceService manifest that points at it. `kubetune deploy` runs steps (2)-(3) for a version
that is already published (`release`).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import log
from kubetune.errors import ConfigError
from kubetune.onnx.model import accepted_variants
from kubetune.release import registry
from kubetune.release.manifests import ServingConfig, inference_service, to_yaml
from kubetune.release.rollout import MANIFEST_FILE, DeployConfig, GitAuth, release
from kubetune.storage.contracts import data_fingerprint
from kubetune.storage.records import RunRecord

STEP = "deploy"
PROFILE_FILE = "profile.json"  # the reference profile drift reports compare with (kubetune.monitoring)
REPORT_FILE = "report.html"  # the training report, next to MODEL_CARD.md


def training_report(evaluation: dict, training: dict, export: dict) -> str:
    """The training run's HTML report (learning curve, confusion heatmap, per-class bars, gate, variants)."""
    from kubetune.monitoring.report import training_html

    history = training.get("outputs", {}).get("history") or []
    return training_html(evaluation, history, export.get("variants") or {}, tasks.get(evaluation["task"]).headline)


def variant_table(variants: dict, rejected: dict | None = None) -> str:
    """The accepted ONNX variants with their held-out check, and the dropped ones with their numbers,
    for the model card."""
    if not variants:
        text = "Variants: fp32 only (model.onnx)."
    else:
        rows = "\n".join(f"| {k} | `{v['file']}` | {v['agreement']:.4f} | {v['accuracy']:.4f} | {100 * v['accuracy_drop']:.2f} | "
                         f"{v['size_bytes'] / 2**20:.1f} |" for k, v in variants.items())
        text = ("Accepted variants (checked against torch on the eval split):\n\n"
                "| variant | file | argmax agreement | accuracy | drop (points) | MiB |\n|---|---|---|---|---|---|\n" + rows)
    if rejected:
        text += "\n\nDropped variants (failed their check; not published):\n\n" + "\n".join(
            f"- {k}: {'; '.join(v.get('problems') or [])} (accuracy {v['accuracy']:.4f}, drop {100 * v['accuracy_drop']:.2f} points)"
            for k, v in rejected.items())
    return text


def model_card(name: str, version: str, evaluation: dict, run: dict, training: dict, export: dict) -> str:
    g = evaluation["gate"]
    settings = {k: training.get("config", {}).get(k) for k in ("epochs", "batch_size", "learning_rate", "seed")}
    if training.get("outputs", {}).get("epochs"):  # epochs=0 in the config: the count finetune chose from the data size
        settings["epochs"] = training["outputs"]["epochs"]
    kind, headline, table = tasks.get(evaluation["task"]).card(evaluation)
    return f"""# {name} {version}

{kind} fine-tuned by kubetune, run `{run.get('run_id')}`.

- Base model: `{training.get('config', {}).get('model', 'unknown')}`
- Training data: `{run.get('train')}`; eval: `{run.get('eval') or 'split from train'}`; test: `{run.get('test') or 'split from train'}`
- Data fingerprints (sha256 of the text/label rows): {json.dumps(run.get('fingerprints', {}))}
- Training: {json.dumps(settings)}, best epoch {training.get('outputs', {}).get('best_epoch')}

## Test results ({evaluation['test_rows']} rows)

{headline}

{table}

Gate: {'passed' if g['passed'] else 'rejected'} - {g['reason']}

## ONNX

Parity with torch on {export.get('rows')} held-out rows: max |logit diff| {export.get('max_abs_diff')},
argmax agreement {export.get('argmax_agreement')}.

{variant_table(export.get('variants') or {}, export.get('rejected_variants'))}

## Intended use and limits

Classifies short texts like those it was trained on. Texts longer than the training max_length are
truncated. Quality on other domains, languages or label definitions is unknown: evaluate before use.
"""


def publish(record: RunRecord, name: str, onnx_dir: Path, evaluation: dict, cfg: ServingConfig, work: Path) -> dict:
    """Publish the version folder (atomically; see kubetune.storage.store). Moves no alias."""
    if not evaluation["gate"]["passed"]:
        raise ConfigError(f"refusing to deploy {name}: the gate rejected it ({evaluation['gate']['reason']})")
    store = record.store
    version = registry.new_version(record.run_id)
    prefix = registry.version_prefix(name, version)
    storage_uri = store.url(prefix)

    staging = work / version
    shutil.copytree(onnx_dir, staging)
    run = record.read_json("run.json", {})
    run["fingerprints"] = record.read_json("steps/validate.json", {}).get("outputs", {}).get("fingerprints", {})
    training = record.read_json("steps/finetune.json", {})
    export = json.loads((onnx_dir / "parity.json").read_text()) if (onnx_dir / "parity.json").exists() else {}
    evaluation = dict(evaluation)
    profile = evaluation.pop("profile", None)  # absent in evaluations written before profiles existed
    if profile is not None:
        (staging / PROFILE_FILE).write_text(json.dumps(profile))
    (staging / REPORT_FILE).write_text(training_report(evaluation, training, export))
    (staging / "metrics.json").write_text(json.dumps(
        {**evaluation, "version": version, "run_id": record.run_id, "data_fingerprints": run["fingerprints"],
         "data_fingerprint": data_fingerprint(run["fingerprints"]) if run["fingerprints"] else None}, indent=2))
    (staging / "MODEL_CARD.md").write_text(model_card(name, version, evaluation, run, training, export))
    (staging / MANIFEST_FILE).write_text(to_yaml(inference_service(name, version, storage_uri, record.run_id, cfg)))
    variants = sorted(accepted_variants(staging))
    store.publish_dir(staging, prefix)
    log(STEP, f"published {storage_uri} (ONNX variants: {', '.join(variants)})")
    return {"version": version, "model_uri": storage_uri, "manifest_uri": store.url(f"{prefix}/{MANIFEST_FILE}"), "variants": variants}


def deploy(record: RunRecord, name: str, onnx_dir: Path, evaluation: dict, cfg: ServingConfig, work: Path,
           target: DeployConfig | None = None, auth: GitAuth | None = None) -> dict:
    target = target or DeployConfig()
    target.check()  # before publishing: a bad target setting should not leave an orphan version
    published = publish(record, name, onnx_dir, evaluation, cfg, work)
    return {**release(record.store, name, published["version"], cfg, target, record.run_id, auth), "variants": published["variants"]}


def run_step(*, store_uri: str, run_id: str, model_name: str, onnx_dir: Path, evaluation_path: Path,
             manifest_path: Path, cfg: ServingConfig, target: DeployConfig | None = None, report_path: Path | None = None) -> dict:
    """`report_path`: a copy of the published training report (the pipeline's HTML artifact, shown in the Kubeflow UI)."""
    target = target or DeployConfig()
    config = {"model_name": model_name, **asdict(cfg), **asdict(target)}
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config=config) as ctx:
        evaluation = json.loads(evaluation_path.read_text())
        result = deploy(ctx.record, registry.check_name(model_name), onnx_dir, evaluation, cfg, ctx.scratch, target, GitAuth.from_env())
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(to_yaml(result["manifest"]))
        if report_path is not None:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_bytes(ctx.store.read_bytes(f"{registry.version_prefix(result['model_name'], result['version'])}/{REPORT_FILE}"))
        ctx.record.write_json("deployment.json", {k: v for k, v in result.items() if k != "manifest"})
        ctx.outputs.update({k: result[k] for k in ("version", "model_uri", "manifest_uri", "variants")}, target=target.target)
    return result


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.deploy", __doc__)
    p.add_argument("--onnx", required=True, type=Path, help="exported model folder (export's output)")
    p.add_argument("--evaluation", required=True, type=Path, help="evaluation.json (evaluate's output)")
    p.add_argument("--name", required=True)
    p.add_argument("--manifest-out", type=Path, default=Path(MANIFEST_FILE))
    add_config_args(p, ServingConfig)
    add_config_args(p, DeployConfig)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, model_name=a.name, onnx_dir=a.onnx,
                                     evaluation_path=a.evaluation, manifest_path=a.manifest_out,
                                     cfg=config_from_args(ServingConfig, a), target=config_from_args(DeployConfig, a)))


if __name__ == "__main__":
    sys.exit(main())
