"""Serve a registry model over HTTP: raw texts in, labels, scores and probabilities out (KServe v1
and Open Inference Protocol v2), with health, readiness, Prometheus metrics and micro-batching.

    kubetune serve --model sms-spam --port 8080                 # production alias in ./kubetune-store
    python -m kubetune.serving.serve --model ./kubetune-store/models/sms-spam/production --port 8080
    kubetune serve --model s3://bucket/kubetune/models/sms-spam/v20261123-061500-fba4c2 --name sms-spam
    curl -s localhost:8080/v1/models/sms-spam:predict -d '{"instances": ["WINNER! Claim your prize now"]}'

--model takes a model folder (local, e.g. /mnt/models where KServe's storage initializer puts
STORAGE_URI, or an s3:// prefix, downloaded first), a registry path `<store>/models/<name>/<alias
or version>`, or a registry reference in --store (`<name>`, `<name>@<alias or version>`,
`models/<name>/<alias or version>`: kubetune.release.registry.parse_ref).
Answers are `OnnxClassifier.predict`'s, the contract batch inference shares, so a text gets the
same label and probabilities from both. Limits (413 when exceeded, 400 for malformed requests):
--max-body-bytes, --max-texts per request, --max-text-chars per text (--long-texts truncate cuts
longer texts there before tokenization; reject answers 413); the model itself reads at most its
max_length tokens of a text, like batch inference. More than --max-queue-texts waiting: 503.
A task whose inputs are several fields takes objects with them (kubetune.serving.protocol), e.g. a
multiple-choice model `{"instances": [{"question": "...", "choices": ["...", "..."], "context": "..."}]}`
(context optional; 2 to 16 choices), answered with {"answer", "letter", "choice", "score", "scores"};
a question counts as one text for --max-texts, and each of its texts is cut to --max-text-chars.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from kubetune.core.config import add_config_args, config_from_args, opt
from kubetune.core.context import add_store_arg
from kubetune.core.progress import log
from kubetune.errors import ConfigError, InputError, KubetuneError
from kubetune.release import registry
from kubetune.storage.store import LocalStore, S3Settings, fetch, is_s3, open_store

STEP = "serve"


@dataclass(frozen=True)
class ServeConfig:
    max_body_bytes: int = opt(1 << 20, "largest request body accepted; larger: 413")
    max_texts: int = opt(256, "most texts in one request; more: 413")
    max_text_chars: int = opt(20_000, "longest text in characters (see --long-texts)")
    long_texts: str = opt("truncate", "truncate: cut longer texts to --max-text-chars before tokenization; reject: answer 413",
                          choices=("truncate", "reject"))
    max_batch_texts: int = opt(64, "most texts per model call; concurrent requests are batched up to this")
    onnx_batch_size: int = opt(4, "texts per ONNX Runtime run inside a model call, which sorts its texts by length first: small "
                                  "runs pad little (best on CPU); raise it on a GPU")
    batch_wait_ms: float = opt(2.0, "how long a model call waits for more requests when its batch is not full; 0: never")
    max_queue_texts: int = opt(4096, "most texts waiting for a model call; more: 503 (retry later)")
    device: str = opt("cpu", "ONNX Runtime device: cpu or cuda (onnxruntime-gpu)")
    threads: int = opt(0, "ONNX Runtime intra-op threads; 0: every CPU this process may use (its cgroup quota counts)")
    request_log: str = opt("off", "sampled request logging to --store (monitoring/<name>/requests/) for kubetune drift, a privacy "
                                  "choice: off; features: per-text profile features and the prediction, never the text; texts: "
                                  "also the texts", choices=("off", "features", "texts"))
    request_log_rate: float = opt(0.1, "fraction of answered texts sampled into the request log")
    request_log_max_per_minute: int = opt(600, "most texts logged per minute (token bucket); more are dropped and counted")
    request_log_flush_s: float = opt(60.0, "seconds between request log part files (also written at --request-log-flush-texts "
                                           "and on shutdown)")
    request_log_flush_texts: int = opt(1000, "texts per request log part file at most")

    def check(self) -> "ServeConfig":
        for name in ("max_texts", "max_text_chars", "max_batch_texts", "onnx_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes {self.max_body_bytes}: must be at least 1024")
        if self.long_texts not in ("truncate", "reject"):
            raise ConfigError(f"--long-texts {self.long_texts!r}: use truncate or reject")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"--batch-wait-ms {self.batch_wait_ms}: use 0 (no waiting) to 1000")
        if self.max_queue_texts < self.max_texts:
            raise ConfigError(f"--max-queue-texts {self.max_queue_texts} is below --max-texts {self.max_texts}: a full request "
                              "could never be queued; raise --max-queue-texts or lower --max-texts")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        if self.threads < 0:
            raise ConfigError(f"--threads {self.threads}: use 0 (every CPU this process may use) or a positive count")
        from kubetune.serving import requestlog

        requestlog.check(self.request_log, self.request_log_rate, self.request_log_max_per_minute, self.request_log_flush_s,
                         self.request_log_flush_texts)
        return self




@dataclass(frozen=True)
class ModelSource:
    path: Path
    name: str | None  # the registry name when the model was found through the registry
    version: str | None


def _is_model_dir(path: Path) -> bool:
    return (path / "model.onnx").is_file() and not _unsealed(path)


def _unsealed(path: Path) -> bool:
    """A `.tmp-` folder is a publish in progress (or one killed midway): never a model to serve."""
    return any(".tmp-" in part for part in path.resolve().parts)


def _from_registry(store_uri: str, ref: registry.ModelRef, settings: S3Settings, workdir: Callable[[], Path]) -> ModelSource:
    store = open_store(store_uri, settings) if is_s3(store_uri) or Path(store_uri).is_dir() else None
    if store is None:
        raise InputError(f"model store {store_uri!r} does not exist (run kubetune run first, or pass --store)")
    name, version = registry.resolve(store, ref)
    if isinstance(store, LocalStore):  # serve in place: a published version never changes
        return ModelSource(store.root / registry.version_prefix(name, version), name, version)
    return ModelSource(registry.download(store, name, version, workdir() / version), name, version)


def locate_model(model: str, store_uri: str, settings: S3Settings, workdir: Callable[[], Path]) -> ModelSource:
    """Where the model folder is; see the module docstring. A remote model is downloaded into
    `workdir()`, called only then: with --model /mnt/models nothing is written, which a pod with a
    read-only root filesystem (the rendered InferenceService's) needs."""
    local, path_ref = Path(model).expanduser(), registry.is_path_ref(model)
    if not is_s3(model) and local.is_dir():
        if _unsealed(local):
            raise InputError(f"{model}: an unsealed .tmp- folder (a publish in progress, or one that was killed); "
                             "serve a published version (<store>/models/<name>/<version>)")
        if _is_model_dir(local):
            return ModelSource(local, None, None)
        if not path_ref:
            raise InputError(f"{model}: no model.onnx in this folder; pass a model version folder "
                             "(<store>/models/<name>/<version>) or a registry reference with --store")
    if is_s3(model) and not path_ref:
        path = fetch(model, settings, workdir())
        if not _is_model_dir(path):
            raise InputError(f"{model}: no model.onnx under this prefix; expected a folder published by kubetune deploy")
        return ModelSource(path, None, None)
    try:
        ref = registry.parse_ref(model)
    except InputError:
        raise InputError(f"--model {model!r}: no such folder, and not a registry reference ({registry.REF_FORMS}, "
                         "or <store>/models/NAME/<alias|version>)") from None
    return _from_registry(ref.store or store_uri, ref, settings, workdir)


def model_name(source: ModelSource, given: str) -> str:
    """--name, else the registry name, else the InferenceService name the deploy step wrote beside the model."""
    if given:
        return registry.check_name(given)
    if source.name:
        return source.name
    manifest = source.path / "inferenceservice.yaml"
    if manifest.is_file():
        return registry.check_name(yaml.safe_load(manifest.read_text())["metadata"]["name"])
    raise InputError(f"{source.path}: cannot tell the model's name; pass --name")


def model_version(source: ModelSource) -> str:
    if source.version:
        return source.version
    metrics = source.path / "metrics.json"
    return str(json.loads(metrics.read_text()).get("version", "")) if metrics.is_file() else ""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"model folder (local or s3://), <store>/models/NAME/<alias|version>, or a registry "
                   f"reference in --store: {registry.REF_FORMS}")
    p.add_argument("--name", default="", help="name in the URL paths (/v1/models/NAME); default: the registry name")
    add_store_arg(p, help="the registry of a --model given as a reference; --request-log writes there")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (HTTP and gRPC); 127.0.0.1: this machine only. "
                   "In a container or pod pass 0.0.0.0 (the image and the rendered InferenceService do)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (v1, v2, health, /metrics)")
    p.add_argument("--grpc-port", type=int, default=0, help="also serve v2 over gRPC on this port; 0: off")
    add_config_args(p, ServeConfig)


def serve(a: argparse.Namespace) -> int:
    """Run the server in this process until it is stopped (SIGTERM, Ctrl-C)."""
    cfg = config_from_args(ServeConfig, a).check()
    for flag, port in (("--port", a.port), ("--grpc-port", a.grpc_port)):
        if not 0 <= port <= 65535 or (flag == "--port" and port == 0):
            raise ConfigError(f"{flag} {port}: not a usable port")
    host = check_host(a.host)
    scratch: list[Path] = []

    def workdir() -> Path:
        if not scratch:
            scratch.append(Path(tempfile.mkdtemp(prefix="kubetune-serve-")))
        return scratch[0]

    try:
        source = locate_model(a.model, a.store, S3Settings.from_env(), workdir)
        name, version = model_name(source, a.name), model_version(source)
        log(STEP, f"serving {source.path} as {name!r} (version {version or 'unknown'}) on {host}:{a.port}")
        with kserve_argv():
            from kubetune.serving.server import serve_forever
        log_store = open_store(a.store, S3Settings.from_env()) if cfg.request_log != "off" else None
        serve_forever(name, source.path, version, host, a.port, a.grpc_port, cfg, log_store)
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
    return 0


def check_host(host: str) -> str:
    """--host: an IP address (v4 or v6) or localhost; a name would be resolved by uvicorn and gRPC
    differently, so only literal addresses are taken."""
    import ipaddress

    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"--host {host!r}: use an IP address, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None


@contextlib.contextmanager
def kserve_argv():
    """Importing kserve parses sys.argv with its own parser (allowing abbreviations, so our --model
    would set its --model_name): hide our arguments from it while it loads."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune.serving.serve", description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_args(p)
    a = p.parse_args(argv)
    try:
        return serve(a)
    except KubetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
