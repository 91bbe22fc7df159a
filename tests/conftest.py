"""Shared fixtures: real data (SMS Spam Collection), small trained artifacts built once per session,
and a real S3 server (SeaweedFS, one per session).

Two models. Plumbing tests (wiring, formats, resume, parity, serving, deploy, gc, drift) use a tiny
random-weight BERT over the real model's tokenizer (tests/helpers/tiny.py), fine-tuned once per
session on 300 real SMS in seconds: `trained_model`, `exported_model`, `clf`, `reference`,
`published_store`. The real all-MiniLM-L6-v2 (`model_dir`) is trained only where a test asserts that
a model learns: `real_trained_model` (tests/steps/test_finetune.py), the small-split default-epochs
run (same file) and the NER pipeline run (tests/tasks/test_token_classification.py); its tokenizer is
used everywhere (the tiny model has the same one)."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune.storage import assets
from kubetune.storage.store import S3Settings

SMALL = 300  # rows of the real data used by fast tests
# training settings that learn the 240-row train split with the real model in ~15 s on 2 CPU cores
# (the defaults are tuned for the full data: 1 epoch of batch 32 is only 8 steps here)
QUICK = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-4}
# the tiny model learns the same split in a few seconds with a high learning rate and more epochs
# (best eval macro-F1 0.92-0.94 for seeds 0-2; early stopping ends it after 5-7 epochs)
TINY = {"epochs": 20, "batch_size": 8, "learning_rate": 5e-3}


def cli_args(settings: dict) -> list[str]:
    """`kubetune run` / step flags for training settings such as QUICK or TINY."""
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="session")
def sms_path() -> Path:
    return assets.resolve("builtin:sms-spam")[0]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real all-MiniLM-L6-v2 (22.7M parameters): for tests that assert learning, and its tokenizer."""
    return assets.resolve("builtin:all-minilm-l6-v2")[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, model_dir) -> Path:
    """A random-weight 2-layer BERT (1M parameters) with the real model's tokenizer."""
    from tests.helpers.tiny import build_tiny_bert

    return build_tiny_bert(model_dir, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sms_rows(sms_path) -> list[tuple[str, str]]:
    """(label, text) for all 5,574 lines, read as the file is meant to be read (no quoting)."""
    with open(sms_path, encoding="utf-8", newline="") as f:
        return [(r[0], r[1]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows, keys=("text", "label")) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(keys, r))) + "\n")
    return path


@pytest.fixture(scope="session")
def sms_csv(tmp_path_factory, sms_rows) -> Path:
    """The first 400 real SMS as a CSV with a header (text,label)."""
    return write_csv(tmp_path_factory.mktemp("data") / "sms.csv", [(t, l) for l, t in sms_rows[:400]])


# ---- small real artifacts, built once --------------------------------------------------------


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    from kubetune.steps.validate import ValidateConfig, validate

    out = tmp_path_factory.mktemp("dataset")
    report, meta = validate("builtin:sms-spam", "", "", ValidateConfig(limit=SMALL), out)
    assert report.passed
    return out


@pytest.fixture(scope="session")
def small_tokens(tmp_path_factory, small_dataset, model_dir):
    from kubetune.steps.tokenize import TokenizeConfig, tokenize

    out = tmp_path_factory.mktemp("tokens")
    tokenize(small_dataset, model_dir, out, TokenizeConfig(max_length=64), store=None)
    return out


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, small_tokens, tiny_model_dir):
    """The tiny model fine-tuned on the 300-row SMS sample (a classifier that separates ham and spam)."""
    from kubetune.steps.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("model")
    finetune(small_tokens, tiny_model_dir, out, FinetuneConfig(**TINY))
    return out


@pytest.fixture(scope="session")
def real_trained_model(tmp_path_factory, small_tokens, model_dir):
    """all-MiniLM-L6-v2 fine-tuned on the same sample with QUICK: the SMS quality run."""
    from kubetune.steps.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("real-model")
    finetune(small_tokens, model_dir, out, FinetuneConfig(**QUICK))
    return out


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory, trained_model, small_tokens):
    from kubetune.steps.export import ExportConfig, export

    out = tmp_path_factory.mktemp("onnx")
    export(trained_model, small_tokens, out, ExportConfig(parity_rows=64), tmp_path_factory.mktemp("export-work"))
    return out


# ---- S3: one real SeaweedFS server per test session (tests/helpers/seaweed.py) ------------------


@pytest.fixture(scope="session")
def seaweedfs():
    """The SeaweedFS server itself (endpoint, credentials, PID): started once, stopped by its PID."""
    from tests.helpers import seaweed

    server, proc = seaweed.start()
    yield server
    seaweed.stop(server, proc)


@pytest.fixture(scope="session")
def s3_server(seaweedfs) -> str:
    """The S3 endpoint URL, http://127.0.0.1:<port>."""
    return seaweedfs.endpoint


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    """Environment of a process that talks to the S3 server, exactly as a pod gets it from the
    kubetune-s3 Secret and ConfigMap."""
    env = seaweedfs.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return env


@pytest.fixture
def s3_bucket(s3_env, request):
    """A fresh, empty bucket per test."""
    settings = S3Settings.from_env(os.environ)
    name = "kt-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 1000}"
    client = settings.client()
    client.create_bucket(Bucket=name)
    yield name
    keys = [o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket=name) for o in p.get("Contents", [])]
    for k in keys:
        client.delete_object(Bucket=name, Key=k)
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def clf(exported_model):
    """The exported model's classifier (read-only; shared by the monitoring and request-log tests)."""
    from kubetune.onnx.model import OnnxClassifier

    return OnnxClassifier(exported_model)


@pytest.fixture(scope="session")
def reference(clf, sms_rows):
    """The reference profile of 600 SMS the drift and request-log tests compare against (built once)."""
    from kubetune.monitoring import profile

    return profile.build(clf, [t for _, t in sms_rows[1000:1600]])


# ---- the published sequence model, shared by serving, isolation, batch inference and drift ---------

PUBLISHED_NAME, PUBLISHED_VERSION = "sms-spam", "v20261123-000000-test"


def publish_version(store, exported: Path, staging: Path, version: str = PUBLISHED_VERSION, profile: dict | None = None) -> str:
    """`exported` as deploy publishes it (minus the card and report): a sealed version with
    metrics.json, the InferenceService manifest and, when given, the reference profile; then the
    production alias. `staging`: an empty scratch folder."""
    import shutil

    from kubetune.release import registry
    from kubetune.release.manifests import ServingConfig, inference_service, to_yaml

    folder = staging / version
    shutil.copytree(exported, folder)
    (folder / "metrics.json").write_text(json.dumps({"version": version}))
    manifest = inference_service(PUBLISHED_NAME, version, store.url(registry.version_prefix(PUBLISHED_NAME, version)), "test",
                                 ServingConfig())
    (folder / "inferenceservice.yaml").write_text(to_yaml(manifest))
    if profile is not None:
        (folder / "profile.json").write_text(json.dumps(profile))
    store.publish_dir(folder, registry.version_prefix(PUBLISHED_NAME, version))
    registry.set_alias(store, PUBLISHED_NAME, registry.PRODUCTION, version, "test")
    return version


@pytest.fixture(scope="session")
def published_store(tmp_path_factory, exported_model, reference):
    """A local store holding `exported_model` as the production version of sms-spam, with the
    600-SMS reference profile. Read-only: a test that writes into a store publishes its own."""
    from kubetune.storage.store import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("published") / "store")
    publish_version(store, exported_model, tmp_path_factory.mktemp("staging"), profile=reference)
    return store


# ---- one training run against S3, shared by the e2e test and the container test -------------------


@dataclass(frozen=True)
class S3Run:
    bucket: str
    args: list  # the `kubetune run` options, without --store/--run-id/--summary
    store_uri: str
    code: int
    summary: dict


S3_RUN_BUCKET = "kt-session-s3-run"


@pytest.fixture(scope="session")
def s3_run(seaweedfs, tmp_path_factory, tiny_model_dir, sms_rows) -> S3Run:
    """`kubetune run` with everything on S3 (a real SeaweedFS): 1,200 SMS uploaded as a CSV, the
    tiny base model uploaded as a plain prefix (as `aws s3 cp --recursive` leaves it), the store in
    the same bucket. tests/pipelines/test_e2e.py checks it; tests/images/test_containers.py runs the
    same options in the images and compares."""
    from kubetune.pipelines.cli import main
    from kubetune.storage.store import open_store

    tmp = tmp_path_factory.mktemp("s3-run")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in seaweedfs.env().items():
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(k, raising=False)
        settings = S3Settings.from_env(os.environ)
        settings.client().create_bucket(Bucket=S3_RUN_BUCKET)
        data = open_store(f"s3://{S3_RUN_BUCKET}", settings)
        for k in range(3):  # a prefix of part files, as data lakes hold large data
            data.upload(write_csv(tmp / f"part-{k}.csv", [(t, l) for l, t in sms_rows[400 * k:400 * (k + 1)]]), f"input/sms/part-{k}.csv")
        for f in sorted(tiny_model_dir.iterdir()):
            data.upload(f, f"base-model/{f.name}")
        args = ["--train", f"s3://{S3_RUN_BUCKET}/input/sms/", "--model", f"s3://{S3_RUN_BUCKET}/base-model",
                "--name", "sms-spam", "--limit", "300", "--max-length", "64", *cli_args(TINY), "--gate-threshold", "0.5",
                "--onnx-variants", "fp32",  # the variants are covered by the local-store run
                # the fan-outs large data gets, merged through S3: a validate task per file, a tokenize task per split
                "--fanout-mb", "0.02", "--fanout-rows", "100"]
        store_uri = f"s3://{S3_RUN_BUCKET}/kubetune"
        code = main(["run", *args, "--store", store_uri, "--run-id", "s3run", "--summary", str(tmp / "summary.json")])
        summary = json.loads((tmp / "summary.json").read_text())
    return S3Run(S3_RUN_BUCKET, args, store_uri, code, summary)
