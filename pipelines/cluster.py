"""Kubeflow Pipelines server commands: upload the pipeline, submit runs, schedule retraining.

    kubetune upload   --host https://kubeflow.example.com/pipeline --image REGISTRY/kubetune:0.1.0 --store s3://ml/kubetune
    kubetune submit   --host ... --experiment sms-spam --run-name nightly-1 --param train_uri=s3://ml/data/sms.csv
    kubetune schedule --host ... --experiment sms-spam --cron "0 0 3 * * *" --param force=false

Each compiles the pipeline here (the same IR as `kubetune compile`, so the images and store default
are this checkout's) and talks to the KFP API with kfp.Client. The host is --host or
$KF_PIPELINES_ENDPOINT; inside a cluster pod kfp.Client reads the ServiceAccount token from
$KF_PIPELINES_SA_TOKEN_PATH (k8s/base/schedule-cronjob.yaml mounts one); outside, pass a bearer
token through $KF_PIPELINES_TOKEN (never on the command line).

A recurring run starts at most one run at a time (max_concurrency 1) and does not catch up on
missed slots after a pause (no_catchup): retraining is idempotent on unchanged data anyway (the
pipeline's freshness step skips it), but a backlog of GPU runs after an outage is never wanted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from kubetune.core.context import add_store_arg
from kubetune.errors import InputError, KubetuneError
from kubetune.pipelines import parameters
from kubetune.pipelines.config import CLUSTER_STORE, DEFAULT_IMAGE, ClusterConfig

PIPELINE_DESCRIPTION = "Fine-tune a Hugging Face text classifier, gate it, export it to ONNX and publish it (kubetune)."


def add_compile_args(p, store: bool = True) -> None:
    """`store=False`: the command has its own --store (kubetune infer), which is then the pipeline's too."""
    p.add_argument("--image", default=DEFAULT_IMAGE, help="image of the CPU steps; finetune uses IMAGE-cuda")
    p.add_argument("--trainer-image", default="", help="CUDA image for finetune (default: the --image tag + '-cuda')")
    if store:
        add_store_arg(p, default=CLUSTER_STORE, help="default of the pipeline's store parameter")
    p.add_argument("--pipeline-root", default="", help="KFP artifact root (default: the installation's)")
    p.add_argument("--s3-secret", default=ClusterConfig.s3_secret)
    p.add_argument("--s3-config-map", default=ClusterConfig.s3_config_map)


def compile_pipeline(a: argparse.Namespace, output: Path) -> ClusterConfig:
    from kfp import compiler

    from kubetune.pipelines.batch import build_batch_pipeline
    from kubetune.pipelines.training import build_training_pipeline

    cluster = replace(ClusterConfig(), image=a.image, trainer_image=a.trainer_image, pipeline_root=a.pipeline_root,
                      s3_secret=a.s3_secret, s3_config_map=a.s3_config_map)
    output.parent.mkdir(parents=True, exist_ok=True)
    # `kubetune compile --pipeline batch-inference`; the server commands (upload/submit/schedule) run training
    build = build_batch_pipeline if getattr(a, "pipeline", "training") == "batch-inference" else build_training_pipeline
    compiler.Compiler().compile(build(cluster, default_store=a.store), str(output))
    return cluster


# ---- talking to the KFP API ------------------------------------------------------------------


def add_server_args(p: argparse.ArgumentParser, store: bool = True) -> None:
    add_compile_args(p, store)
    k = p.add_argument_group("Kubeflow Pipelines API")
    k.add_argument("--host", default="", help="KFP API endpoint; empty: $KF_PIPELINES_ENDPOINT, or kfp.Client's in-cluster default")
    k.add_argument("--namespace", default="", help="Kubeflow profile namespace (multi-user Kubeflow); empty: the server's default")
    k.add_argument("--ssl-ca-cert", default="", help="CA bundle for a private TLS endpoint")


def kfp_client(a: argparse.Namespace, environ=None):
    # kfp.client, not kfp.Client: inside a KFP task (_KFP_RUNTIME=true, the batch-retrain step) the
    # package does not import its client at the top level
    from kfp.client import Client

    env = os.environ if environ is None else environ
    return Client(host=a.host or env.get("KF_PIPELINES_ENDPOINT") or None, namespace=a.namespace or "kubeflow",
                      existing_token=env.get("KF_PIPELINES_TOKEN") or None, ssl_ca_cert=a.ssl_ca_cert or None)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="kubetune", help="experiment (created when missing)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, repeatable (names and types as in the Kubeflow run form)")
    p.add_argument("--service-account", default="kubetune-pipeline-runner",
                   help="ServiceAccount the run's pods use (k8s/base); empty: the profile's default-editor")


def parse_params(pairs: list[str], package: Path) -> dict:
    """NAME=VALUE strings -> typed pipeline arguments, checked against the compiled pipeline's
    parameters (a typo fails here, not as an unknown-input error on the server)."""
    doc = next(yaml.safe_load_all(package.read_text()))
    spec = doc["root"]["inputDefinitions"]["parameters"]
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise InputError(f"--param {pair!r}: use NAME=VALUE")
        if name not in spec:
            raise InputError(f"--param {name}: the pipeline has no such parameter; it has {', '.join(sorted(spec))}")
        kind = spec[name]["parameterType"]
        try:
            if kind == "BOOLEAN":
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                out[name] = raw.lower() == "true"
            elif kind == "NUMBER_INTEGER":
                out[name] = int(raw)
            elif kind == "NUMBER_DOUBLE":
                out[name] = float(raw)
            else:
                out[name] = raw
        except ValueError:
            raise InputError(f"--param {name}={raw!r}: expected {kind.lower().replace('number_', '')}") from None
    return out


def check_cron(cron: str) -> str:
    """KFP cron expressions have 6 fields, seconds first (robfig/cron)."""
    fields = cron.split()
    if len(fields) != 6:
        hint = f"; for '{cron}' (5 fields) use '0 {cron}'" if len(fields) == 5 else ""
        raise InputError(f"--cron {cron!r}: KFP expects 6 fields, seconds first (e.g. '0 0 3 * * *' = 03:00 daily){hint}")
    return cron


def cmd_upload(a: argparse.Namespace) -> int:
    from kubetune.pipelines.training import PIPELINE_NAME

    client = kfp_client(a)
    name = a.pipeline_name or PIPELINE_NAME
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "kubetune-training.yaml"
        cluster = compile_pipeline(a, package)
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(str(package), pipeline_name=name, description=PIPELINE_DESCRIPTION,
                                              namespace=a.namespace or None)
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1)
            version = versions.pipeline_versions[0] if versions.pipeline_versions else None
            print(f"uploaded pipeline {name} ({pipeline_id})")
        else:
            version = client.upload_pipeline_version(str(package), pipeline_version_name=a.version or _version_name(cluster),
                                                     pipeline_id=pipeline_id, description=a.description or None)
            print(f"uploaded version {version.display_name} ({version.pipeline_version_id}) of pipeline {name} ({pipeline_id})")
    print(f"images {cluster.image}, {cluster.gpu_image}; start a run from the Kubeflow UI (Pipelines -> {name} -> Create run)")
    return 0


def _version_name(cluster: ClusterConfig) -> str:
    import time

    return f"{cluster.image.rsplit('/', 1)[-1]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def submit_training(a: argparse.Namespace, client=None) -> tuple[str, dict]:
    """Start a training-pipeline run (`kubetune submit`, and `kubetune infer --retrain-on-drift`):
    (run id, the typed parameters it got)."""
    client = client or kfp_client(a)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "kubetune-training.yaml"
        compile_pipeline(a, package)
        params = parse_params(a.param, package)
        parameters.check(params)  # the same check as kubetune run: a bad setting fails here, not hours into the run
        result = client.create_run_from_pipeline_package(
            str(package), arguments=params, run_name=a.run_name or None, experiment_name=a.experiment,
            namespace=a.namespace or None, service_account=a.service_account or None)
    print(f"submitted run {result.run_id} in experiment {a.experiment}" + (f" with {params}" if params else ""))
    return result.run_id, params


def retrain(*, store: str, model_ref: str, train_uri: str, experiment: str, host: str, image: str, s3_secret: str,
            s3_config_map: str) -> str:
    """The batch pipeline's retraining trigger (its batch-retrain task, run when the batch drifted):
    `kubetune submit` for the same store and model name, from inside the cluster (`host` empty: the
    in-cluster KFP API, with the pod's ServiceAccount token). Returns the new run's id.

    It runs as a child process: inside a KFP task the kfp package is in runtime mode
    (_KFP_RUNTIME=true), where compiling a pipeline fails on a circular import."""
    from kubetune.release import registry

    name = registry.parse_ref(model_ref).name
    # --flag=value: a value starting with '-' stays a value; no shell is involved
    args = [sys.executable, "-m", "kubetune.pipelines.cli", "submit", f"--store={store}", f"--image={image}",
            f"--s3-secret={s3_secret}", f"--s3-config-map={s3_config_map}", f"--experiment={experiment or 'kubetune'}",
            f"--param=model_name={name}", *([f"--param=train_uri={train_uri}"] if train_uri else []), *([f"--host={host}"] if host else [])]
    env = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout, end="")
    found = re.search(r"submitted run (\S+) in experiment", proc.stdout)
    if proc.returncode != 0 or not found:
        raise KubetuneError(f"kubetune submit failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return found.group(1)


def cmd_submit(a: argparse.Namespace) -> int:
    client = kfp_client(a)
    run_id, _ = submit_training(a, client)
    if a.wait:
        run = client.wait_for_run_completion(run_id, timeout=a.wait)
        print(f"run {run_id} finished: {run.state}")
        return 0 if run.state == "SUCCEEDED" else 1
    return 0


def cmd_schedule(a: argparse.Namespace) -> int:
    client = kfp_client(a)
    cron = check_cron(a.cron)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "kubetune-training.yaml"
        compile_pipeline(a, package)
        params = parse_params(a.param, package)
        parameters.check(params)  # the same check as kubetune run
        experiment = client.create_experiment(a.experiment, namespace=a.namespace or None)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=a.job_name, description=f"kubetune retraining, cron {cron}",
            cron_expression=cron, max_concurrency=1, no_catchup=True, params=params, pipeline_package_path=str(package),
            enabled=True, service_account=a.service_account or None)
    print(f"scheduled {a.job_name} ({job.recurring_run_id}): cron '{cron}', at most one run at a time, no catch-up")
    return 0


def add_parsers(sub, formatter) -> None:
    p = sub.add_parser("upload", help="upload the pipeline (or a new version of it) to Kubeflow Pipelines", formatter_class=formatter)
    add_server_args(p)
    p.add_argument("--pipeline-name", default="", help="pipeline name in the UI (default kubetune-training)")
    p.add_argument("--version", default="", help="version name (default: image tag + UTC time)")
    p.add_argument("--description", default="", help="version description")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("submit", help="start a pipeline run on Kubeflow Pipelines", formatter_class=formatter)
    add_server_args(p)
    add_run_args(p)
    p.add_argument("--run-name", default="", help="run name in the UI (default: pipeline name + time)")
    p.add_argument("--wait", type=int, default=0, metavar="SECONDS", help="wait up to this long for the run to finish; exit 1 unless it succeeded")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="create a KFP recurring run (scheduled retraining)", formatter_class=formatter)
    add_server_args(p)
    add_run_args(p)
    p.add_argument("--cron", required=True, help="6-field cron, seconds first, in UTC: '0 0 3 * * *' = daily at 03:00")
    p.add_argument("--job-name", default="kubetune-retraining", help="recurring run name")
    p.set_defaults(func=cmd_schedule)
