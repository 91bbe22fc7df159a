"""Step 6 - deploy: publish the exported model as a registry version and move `production` to it.

    python -m components.deploy --onnx /tmp/kt/onnx --evaluation /tmp/kt/evaluation.json \
        --name sms-spam --store ./kubetune-store --run-id dev

Order matters for readers: (1) the version folder is published atomically (see components.store),
(2) then the alias is rewritten in one write. A failure before (2) leaves production untouched.
The version folder holds the ONNX model folder plus metrics.json, MODEL_CARD.md and a KServe
InferenceService manifest that points at it (applied by a later step or by GitOps, not here).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from components import registry
from components.entry import add_config_args, config_from_args, run_main, step_parser
from components.errors import ConfigError
from components.manifests import ServingConfig, inference_service, to_yaml
from components.progress import log
from components.records import RunRecord, open_run, scratch

STEP = "deploy"
MANIFEST_FILE = "inferenceservice.yaml"


def model_card(name: str, version: str, evaluation: dict, run: dict, training: dict, export: dict) -> str:
    m, g = evaluation["metrics"], evaluation["gate"]
    settings = {k: training.get("config", {}).get(k) for k in ("epochs", "batch_size", "learning_rate", "seed")}
    rows = "\n".join(f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                     for k, v in m["per_class"].items())
    return f"""# {name} {version}

Sequence classifier ({', '.join(evaluation['labels'])}) fine-tuned by kubetune, run `{run.get('run_id')}`.

- Base model: `{training.get('config', {}).get('model', 'unknown')}`
- Training data: `{run.get('train')}`; eval: `{run.get('eval') or 'split from train'}`; test: `{run.get('test') or 'split from train'}`
- Data fingerprints (sha256 of the text/label rows): {json.dumps(run.get('fingerprints', {}))}
- Training: {json.dumps(settings)}, best epoch {training.get('outputs', {}).get('best_epoch')}

## Test results ({evaluation['test_rows']} rows)

accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, weighted F1 {m['weighted_f1']:.4f}

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

Gate: {'passed' if g['passed'] else 'rejected'} - {g['reason']}

## ONNX

Parity with torch on {export.get('rows')} held-out rows: max |logit diff| {export.get('max_abs_diff')},
argmax agreement {export.get('argmax_agreement')}.

## Intended use and limits

Classifies short texts like those it was trained on. Texts longer than the training max_length are
truncated. Quality on other domains, languages or label definitions is unknown: evaluate before use.
"""


def deploy(record: RunRecord, name: str, onnx_dir: Path, evaluation: dict, cfg: ServingConfig) -> dict:
    if not evaluation["gate"]["passed"]:
        raise ConfigError(f"refusing to deploy {name}: the gate rejected it ({evaluation['gate']['reason']})")
    store = record.store
    version = registry.new_version(record.run_id)
    prefix = registry.version_prefix(name, version)
    storage_uri = store.url(prefix)

    # ---- stage the version folder locally, then publish it in one go --------------------------
    staging = scratch(STEP) / version
    shutil.copytree(onnx_dir, staging)
    run = record.read_json("run.json", {})
    run["fingerprints"] = record.read_json("steps/validate.json", {}).get("outputs", {}).get("fingerprints", {})
    training = record.read_json("steps/finetune.json", {})
    export = json.loads((onnx_dir / "parity.json").read_text()) if (onnx_dir / "parity.json").exists() else {}
    (staging / "metrics.json").write_text(json.dumps(
        {**evaluation, "version": version, "run_id": record.run_id, "data_fingerprints": run["fingerprints"]}, indent=2))
    (staging / "MODEL_CARD.md").write_text(model_card(name, version, evaluation, run, training, export))
    manifest = inference_service(name, version, storage_uri, record.run_id, cfg)
    (staging / MANIFEST_FILE).write_text(to_yaml(manifest))
    store.publish_dir(staging, prefix)
    log(STEP, f"published {storage_uri}")

    # ---- move the alias (the commit point) ----------------------------------------------------
    alias = registry.set_alias(store, name, registry.PRODUCTION, version, record.run_id)
    log(STEP, f"{name}/{registry.PRODUCTION} -> {version}" + (f" (was {alias['previous']})" if alias["previous"] else ""))
    return {"model_name": name, "version": version, "model_uri": storage_uri,
            "manifest_uri": store.url(f"{prefix}/{MANIFEST_FILE}"), "alias": alias, "manifest": manifest}


def run_step(*, store_uri: str, run_id: str, model_name: str, onnx_dir: Path, evaluation_path: Path,
             manifest_path: Path, cfg: ServingConfig) -> dict:
    record = open_run(store_uri, run_id)
    with record.step(STEP, config={"model_name": model_name, **asdict(cfg)}) as rec:
        evaluation = json.loads(evaluation_path.read_text())
        result = deploy(record, registry.check_name(model_name), onnx_dir, evaluation, cfg)
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(to_yaml(result["manifest"]))
        record.write_json("deployment.json", {k: v for k, v in result.items() if k != "manifest"})
        rec["outputs"] = {k: result[k] for k in ("version", "model_uri", "manifest_uri")}
    return result


def main(argv: list[str] | None = None) -> int:
    p = step_parser("components.deploy", __doc__)
    p.add_argument("--onnx", required=True, type=Path, help="exported model folder (export's output)")
    p.add_argument("--evaluation", required=True, type=Path, help="evaluation.json (evaluate's output)")
    p.add_argument("--name", required=True)
    p.add_argument("--manifest-out", type=Path, default=Path(MANIFEST_FILE))
    add_config_args(p, ServingConfig)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, model_name=a.name, onnx_dir=a.onnx,
                                     evaluation_path=a.evaluation, manifest_path=a.manifest_out,
                                     cfg=config_from_args(ServingConfig, a)))


if __name__ == "__main__":
    sys.exit(main())
