"""Shared fixtures: real data (SMS Spam Collection), the real model (all-MiniLM-L6-v2), small
trained artifacts built once per session, and a real S3 server (SeaweedFS, one per session)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from kubetune.storage import assets
from kubetune.storage.store import S3Settings

SMALL = 300  # rows of the real data used by fast tests
# training settings that learn the 240-row train split in ~15 s on 2 CPU cores (the defaults are
# tuned for the full data: 1 epoch of batch 32 is only 8 steps here)
QUICK = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-4}


@pytest.fixture(scope="session")
def sms_path() -> Path:
    return assets.resolve("builtin:sms-spam")[0]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return assets.resolve("builtin:all-minilm-l6-v2")[0]


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
def trained_model(tmp_path_factory, small_tokens, model_dir):
    from kubetune.steps.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("model")
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

    return profile.build(clf.task, clf, [t for _, t in sms_rows[1000:1600]])
