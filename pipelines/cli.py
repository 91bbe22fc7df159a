"""The `kubetune` command line.

    kubetune run                         # train on the SMS Spam Collection with all-MiniLM-L6-v2, locally
    kubetune run --task token-classification          # NER on CoNLL-2003 English (official splits)
    kubetune run --task pair-classification --text-column question --text-pair-column passage   # answer selection, NLI
    kubetune run --train s3://data/reviews.csv --text-column review --label-column stars --epochs 3
    kubetune compile --output kubetune-training.yaml [--image REGISTRY/kubetune:TAG]
    kubetune upload|submit|schedule --host KFP_API ...      # Kubeflow Pipelines server (pipelines/cluster.py)
    kubetune deploy NAME [--version V] --target registry|kserve|gitops   # roll out a published version
    kubetune rollback NAME [--to V]      # production back to the previous version
    kubetune models NAME                 # versions and aliases in the registry
    kubetune gc [--dry-run]              # remove stale .tmp- leftovers and aborted uploads from the store
    kubetune serve --model sms-spam --port 8080   # serve the production model of ./kubetune-store over HTTP
    kubetune compile --pipeline batch-inference --output kubetune-batch-inference.yaml
    kubetune infer --model models/sms-spam/production --input s3://data/in/ --output s3://data/scored/

`run` exit codes: 0 model deployed (or training skipped: data unchanged); 2 input rejected (bad data or options): nothing trained or
published; 3 the quality gate rejected the model: nothing published; 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args
from kubetune.core.context import add_store_arg
from kubetune.core.progress import fmt_seconds
from kubetune.errors import Cancelled, ConfigError, InputError, KubetuneError
from kubetune.pipelines import cluster, parameters
from kubetune.pipelines.config import ClusterConfig
from kubetune.release import registry
from kubetune.release.manifests import ServingConfig
from kubetune.release.rollout import DeployConfig, GitAuth, abort_canary, promote, release, roll_back
from kubetune.steps.summary import build_summary
from kubetune.steps.validate import resolve_inputs
from kubetune.storage.records import RunRecord
from kubetune.storage.store import LocalStore, S3Settings, open_store

PIPELINES = ("training", "batch-inference")


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every default."""


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the training pipeline locally (kfp.local)", description=__doc__, formatter_class=_Help)
    p.set_defaults(func=cmd_run)
    parameters.add_run_flags(p)  # one flag per pipeline parameter (kubetune.pipelines.parameters)
    o = p.add_argument_group("output")
    o.add_argument("--summary", type=Path, help="write the run summary JSON here")
    o.add_argument("--verbose", action="store_true", help="show kfp.local's full output, not only kubetune's lines")
    o.add_argument("--keep-kfp-runs", type=int, default=0,
                   help="kfp.local's working copies of step outputs (<store>/kfp-local/) to keep, newest first; the run records "
                        "and the registry hold what matters. Folders changed in the last hour (a run in progress) are never removed")


def _compile_parser(sub) -> None:
    p = sub.add_parser("compile", help="compile a pipeline (training or batch-inference) to KFP v2 IR YAML", formatter_class=_Help)
    p.add_argument("--pipeline", choices=PIPELINES, default="training", help="which pipeline")
    p.add_argument("--output", required=True, type=Path)
    cluster.add_compile_args(p)
    p.set_defaults(func=cmd_compile)


def _registry_parsers(sub) -> None:
    p = sub.add_parser("deploy", help="roll a published version out to a deploy target and move its alias", formatter_class=_Help,
                       description="Roll a published registry version out (registry: move the production alias; kserve: apply "
                                   "the InferenceService, wait for Ready, roll back on failure; gitops: commit it for Argo CD).")
    p.add_argument("name", help="registry name")
    p.add_argument("--version", default=registry.PRODUCTION, help="version or alias to deploy")
    p.add_argument("--promote", action="store_true", help="the canary becomes production: all traffic to it, in the service's "
                   "KServe mode (Standard: the stable predictor retargeted to the canary), then the production alias moves to it")
    add_store_arg(p)
    add_config_args(p, DeployConfig)
    add_config_args(p, ServingConfig)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("rollback", help="move production back to the previous version (and roll it out to a target)", formatter_class=_Help)
    p.add_argument("name", help="registry name")
    p.add_argument("--to", default="", help="version to go back to (default: production's previous)")
    p.add_argument("--canary", action="store_true", help="roll the canary back instead: production takes all traffic again "
                   "(the canary entry or revision goes), the canary alias is removed, production does not move")
    add_store_arg(p)
    add_config_args(p, DeployConfig)
    add_config_args(p, ServingConfig)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("models", help="list a model's published versions and aliases", formatter_class=_Help)
    p.add_argument("name", help="registry name")
    add_store_arg(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("gc", help="remove stale leftovers of crashed writers from a store; list old versions", formatter_class=_Help,
                       description="Remove unsealed .tmp- folders/objects and unfinished multipart uploads older than the grace "
                                   "period from a store (nothing outside it, never $TMPDIR); list published versions the retention "
                                   "rule allows deleting (never production, its previous version or canary).")
    add_store_arg(p)
    p.add_argument("--grace-hours", type=float, default=24.0, help="leave leftovers younger than this (a publish may be running)")
    p.add_argument("--keep-versions", type=int, default=5, help="newest published versions of each model not listed as old")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.set_defaults(func=cmd_gc)


def _serve_parser(sub) -> None:
    from kubetune.serving import serve

    p = sub.add_parser("serve", help="serve a registry model over HTTP (KServe v1 and v2 protocols)", description=serve.__doc__,
                       formatter_class=_Help)
    serve.add_serve_args(p)
    p.set_defaults(func=cmd_serve)


def _infer_parser(sub) -> None:
    from kubetune.steps.batch_infer import add_batch_args

    p = sub.add_parser("infer", help="batch ONNX inference over files with a registry model, in this process", formatter_class=_Help,
                       description="Score every CSV/TSV/JSONL/Parquet file under --input; Parquet predictions under --output. "
                                   "Re-run with the same --output to resume after a crash (committed shards are skipped).")
    add_batch_args(p)
    p.add_argument("--summary", type=Path, help="write the batch manifest JSON here too")
    r = p.add_argument_group("retraining on drift (the same submission as kubetune submit)")
    r.add_argument("--retrain-on-drift", action="store_true",
                   help="when the batch's drift report says drifted, start a training-pipeline run for the same store and "
                        "model name (give its data with --param train_uri=...)")
    cluster.add_server_args(p, store=False)
    cluster.add_run_args(p)
    r.add_argument("--run-name", default="", help="name of the retraining run (default: pipeline name + time)")
    p.set_defaults(func=cmd_infer)


def _drift_parser(sub) -> None:
    from kubetune.steps import drift

    p = sub.add_parser("drift", help="a drift report of data against a registry version's reference profile", formatter_class=_Help,
                       description=drift.__doc__)
    add_store_arg(p, help="the registry")
    drift.add_drift_args(p)
    p.set_defaults(func=cmd_drift)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune", description="Fine-tune, gate, export and publish transformer text classifiers on Kubeflow.")
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _compile_parser(sub)
    cluster.add_parsers(sub, _Help)
    _registry_parsers(sub)
    _serve_parser(sub)
    _infer_parser(sub)
    _drift_parser(sub)
    return p


# ---------------------------------------------------------------------------------------------
# run


def pipeline_arguments(a: argparse.Namespace, store_uri: str, run_id: str) -> dict:
    """CLI options -> pipeline parameters, checked (parameters.check: the same check as submit and
    schedule) before anything runs; the data and registry name resolved as the pipeline resolves them."""
    values = {**parameters.from_args(a), "store": store_uri, "run_id": run_id}
    parameters.check(values)
    values["train_uri"], values["model_name"] = resolve_inputs(values["task"], values["train_uri"], values["model_name"])
    return values


def print_summary(s: dict, wall: float) -> None:
    w = sys.stdout.write
    w("\nstep       status        seconds\n")
    for row in s["steps"]:
        secs = f"{row['seconds']:8.1f}" if row["seconds"] is not None else "       -"
        w(f"{row['name']:<10} {row['status']:<12} {secs}\n")
    w(f"{'total':<10} {'wall time':<12} {wall:8.1f}  ({fmt_seconds(wall)})\n\n")
    if s["metrics"]:
        w(f"test: {tasks.get(s['task']).describe_test(s['metrics'])}\n")
    if s["gate"]:
        w(f"gate: {'passed' if s['gate']['passed'] else 'REJECTED'} - {s['gate']['reason']}\n")
    if s["onnx"]:
        w(f"onnx: max |logit diff| {s['onnx']['max_abs_diff']:.2e}, argmax agreement {s['onnx']['argmax_agreement']:.4f}\n")
        for name, v in (s["onnx"].get("variants") or {}).items():
            w(f"  {name:<9} agreement {v['agreement']:.4f}, accuracy {v['accuracy']:.4f} (drop {100 * v['accuracy_drop']:.2f} points), "
              f"{v['size_bytes'] / 2**20:.1f} MiB\n")
    if s["deployment"]:
        d = s["deployment"]
        w(f"deployed: {d['version']} at {d['model_uri']}\n          manifest {d['manifest_uri']}\n")
        if d.get("rollout") and d["rollout"].get("target") != "registry":
            w(f"          rolled out: {json.dumps(d['rollout'])}\n")
    if s.get("skip"):
        w(f"skipped: {s['skip']['reason']}\n")
    if s["error"]:
        verb = "cancelled" if s["outcome"] == "cancelled" else "failed"
        w(f"\n{s['error']['step'] or 'run'} {verb}: {s['error']['message']}\n")
    w(f"\noutcome: {s['outcome']} (exit {s['exit_code']}), records in {s['store']}/runs/{s['run_id']}\n")


KFP_BUSY_S = 3600  # a kfp-local folder changed this recently may belong to a run in progress


def prune_kfp_outputs(root: Path, own: set[Path], keep: int) -> list[Path]:
    """Remove kfp.local run folders beyond the newest `keep`: this run's own (finished) folders, and
    earlier ones untouched for an hour (another run on the same store may still be writing)."""
    if not root.is_dir():
        return []
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for path in runs[keep:]:
        if path in own or time.time() - max((q.stat().st_mtime for q in path.rglob("*")), default=path.stat().st_mtime) > KFP_BUSY_S:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty
    return removed


def cmd_run(a: argparse.Namespace) -> int:
    from kubetune.pipelines.local import run_locally, stop_steps_on_signal
    from kubetune.pipelines.training import build_training_pipeline

    store = open_store(a.store, S3Settings.from_env())
    store_uri = store.uri
    run_id = a.run_id or f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    arguments = pipeline_arguments(a, store_uri, run_id)
    name = arguments["model_name"]
    record = RunRecord(store, run_id)
    if store.list(record.prefix):  # also the first store access: an unreachable S3 store fails here
        raise InputError(f"run id {run_id!r} already has records in {store.url(record.prefix)}; pick another --run-id")

    # kfp.local needs a local pipeline root; keep it in a local store, in a temp folder otherwise
    local = isinstance(store, LocalStore)
    pipeline_root = store.root / "kfp-local" if local else Path(tempfile.mkdtemp(prefix="kubetune-kfp-"))
    log_path = (store.root / record.prefix / "kfp-local.log") if local else pipeline_root / "kfp-local.log"
    print(f"kubetune run {run_id}: {name} from {arguments['train_uri']} with {arguments['model_uri']}\n  store {store_uri}\n"
          f"  full log {log_path}", flush=True)

    if a.keep_kfp_runs < 0:
        raise ConfigError(f"--keep-kfp-runs {a.keep_kfp_runs}: use 0 or more")
    before = set(pipeline_root.iterdir()) if pipeline_root.is_dir() else set()
    # The step processes get a private TMPDIR, removed afterwards: kfp.local's component command makes
    # a mktemp folder per step that nothing removes, and a step killed midway leaves its scratch.
    # Only this folder, which this process made, is removed - never other $TMPDIR content.
    run_tmp = Path(tempfile.mkdtemp(prefix="kubetune-run-"))
    saved_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(run_tmp)
    t0 = time.perf_counter()
    cancelled = None
    try:
        # no task retries locally: a failure here is not a flaky node, and backoff would only delay it
        with stop_steps_on_signal():
            run_locally(build_training_pipeline(ClusterConfig(retries=0), default_store=store_uri), arguments,
                        pipeline_root=pipeline_root, log_path=log_path, verbose=a.verbose)
    except Cancelled as e:  # the steps are stopped; nothing more runs (the exit handler's summary neither)
        cancelled = e
    finally:
        if not local:
            store.upload(log_path, record.key("kfp-local.log"))
            shutil.rmtree(pipeline_root, ignore_errors=True)
        else:
            prune_kfp_outputs(pipeline_root, own=set(pipeline_root.iterdir() if pipeline_root.is_dir() else ()) - before,
                              keep=a.keep_kfp_runs)
        if saved_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_tmpdir
        shutil.rmtree(run_tmp, ignore_errors=True)
    wall = time.perf_counter() - t0

    if cancelled:
        summary = build_summary(record)
        # the first step without a record was the one running (or about to start); the rest never ran
        step = next((s for s in summary["steps"] if s["status"] == "not_run"), None)
        if step:
            step["status"] = "cancelled"
        summary.update(outcome="cancelled", exit_code=cancelled.exit_code,
                       error={"step": step and step["name"], "kind": cancelled.kind, "exit_code": cancelled.exit_code,
                              "message": str(cancelled)})
        record.write_json("summary.json", summary)
    else:
        summary = record.read_json("summary.json") or build_summary(record)
    summary["wall_seconds"] = round(wall, 1)
    print_summary(summary, wall)
    if a.summary:
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.summary.with_name(f".{a.summary.name}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(a.summary)
    return summary["exit_code"]


# ---------------------------------------------------------------------------------------------
# compile


def cmd_compile(a: argparse.Namespace) -> int:
    c = cluster.compile_pipeline(a, a.output)
    print(f"wrote {a.output} (images {c.image}, {c.gpu_image})")
    return 0


# ---------------------------------------------------------------------------------------------
# registry: deploy, rollback, models


def cmd_deploy(a: argparse.Namespace) -> int:
    ref = registry.ModelRef(registry.check_name(a.name), a.version)  # before the store: a rejected name creates nothing
    store = open_store(a.store, S3Settings.from_env(), create=False)
    run_id = f"cli-deploy-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if a.promote:
        if a.version != registry.PRODUCTION:
            raise ConfigError(f"--promote rolls out the canary's version: drop --version {a.version}")
        result = promote(store, ref.name, config_from_args(ServingConfig, a), config_from_args(DeployConfig, a), run_id, GitAuth.from_env())
    else:
        name, version = registry.resolve(store, ref)
        result = release(store, name, version, config_from_args(ServingConfig, a), config_from_args(DeployConfig, a), run_id,
                         GitAuth.from_env())
    print(json.dumps({k: v for k, v in result.items() if k != "manifest"}, indent=2))
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    name = registry.check_name(a.name)
    if a.to:
        registry.check_version(a.to, "--to")
    store = open_store(a.store, S3Settings.from_env(), create=False)
    run_id = f"cli-rollback-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if a.canary:
        if a.to:
            raise ConfigError("--canary gives the traffic back to production: drop --to")
        result = abort_canary(store, name, config_from_args(ServingConfig, a), config_from_args(DeployConfig, a), run_id, GitAuth.from_env())
        print(f"{a.name}/canary {result['alias']['canary_removed']} rolled back; {registry.PRODUCTION} {result['version']} takes all traffic")
        return 0
    result = roll_back(store, name, config_from_args(ServingConfig, a), config_from_args(DeployConfig, a),
                       run_id, GitAuth.from_env(), to=a.to)
    alias = result["alias"]
    print(f"{a.name}/{registry.PRODUCTION}: {alias['rolled_back_from']} -> {alias['version']} (previous now {alias['previous']})")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    name = registry.check_name(a.name)
    store = open_store(a.store, S3Settings.from_env(), create=False)
    production = registry.read_alias(store, name) or {}
    canary = registry.read_alias(store, name, "canary") or {}
    found = registry.versions(store, name)
    if not found and not production:
        there = registry.names(store)
        raise InputError(f"no model {name!r} in {store.uri}: " + (f"the models there are {', '.join(there)}" if there else
                                                                  "it has no published models (kubetune run publishes one)"))
    for version in found:
        tags = [t for t, v in ((registry.PRODUCTION, production.get("version")), (registry.PREVIOUS, production.get("previous")),
                               ("canary", canary.get("version"))) if v == version]
        print(f"{version}  {' '.join(tags)}")
    return 0


def cmd_gc(a: argparse.Namespace) -> int:
    from kubetune.release import gc

    store = open_store(a.store, S3Settings.from_env(), create=False)
    report = gc.collect(store, grace_s=a.grace_hours * 3600, keep_versions=a.keep_versions, dry_run=a.dry_run)
    gc.print_report(report, store, a.dry_run)
    return 0


# ---------------------------------------------------------------------------------------------
# serve


def cmd_serve(a: argparse.Namespace) -> int:
    from kubetune.serving.serve import serve

    return serve(a)


# ---------------------------------------------------------------------------------------------
# infer


def cmd_infer(a: argparse.Namespace) -> int:
    from kubetune.steps.batch_infer import BatchConfig, run_batch

    manifest = run_batch(a.store, a.model, a.input, a.output, config_from_args(BatchConfig, a))
    t = manifest["totals"]
    print(f"\n{t['rows']} rows in {len(manifest['shards'])} shards: {t['predicted']} predicted, {t['rejected']} rejected, "
          f"{t['truncated']} truncated; model {manifest['model']['name']} {manifest['model']['version']} ({manifest['variant']})\n"
          f"manifest {a.output.rstrip('/')}/manifest.json")
    drift = manifest["drift"]
    print(f"drift: {'DRIFTED (' + ', '.join(drift['drifted_signals']) + ')' if drift.get('drifted') else drift.get('skipped') or 'none'}")
    if a.retrain_on_drift and manifest["drifted"]:
        given = {p.partition("=")[0] for p in a.param}
        a.param = [*a.param, *([f"model_name={manifest['model']['name']}"] if "model_name" not in given else [])]
        manifest["retraining_run"] = cluster.submit_training(a)[0]
    if a.summary:
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        a.summary.write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# drift


def cmd_drift(a: argparse.Namespace) -> int:
    """Exit 0 either way: a drift verdict is a finding, not an error (`drifted` is in drift.json)."""
    from kubetune.monitoring.drift import Thresholds
    from kubetune.steps.drift import REPORT_HTML, REPORT_JSON, DriftConfig, run_step

    rep = run_step(store_uri=a.store, run_id="", ref=a.model, input_uri=a.input, out_dir=a.out,
                   cfg=config_from_args(DriftConfig, a), thresholds=config_from_args(Thresholds, a))
    print(f"\n{'DRIFTED' if rep['drifted'] else 'no drift'} ({', '.join(rep['drifted_signals']) or 'every signal within its threshold'}); "
          f"model {rep['model']}, {rep['rows']} rows\nreport {a.out / REPORT_JSON}, {a.out / REPORT_HTML}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KubetuneError as e:  # its exit code is the one table's (kubetune.errors): 2 for input and options
        print(f"kubetune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kubetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
