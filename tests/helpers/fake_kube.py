"""A small fake Kubernetes API server for InferenceServices: real HTTP, the endpoints the
`kubernetes` Python client calls for get and server-side apply, bearer-token auth, and a
pluggable "controller" that sets the status the way KServe would, and every applied object checked
against its published CRD (tests/helpers/schemas.py) as a strict API server would. Lets the real
client code (kubetune.release.kube) run without a cluster."""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.helpers import schemas

TOKEN = "fake-token"
# any namespaced custom object (InferenceServices, and PyTorchJobs/TrainJobs for the fine-tune launcher)
PATH = re.compile(r"^/apis/[^/]+/[^/]+/namespaces/([^/]+)/[^/]+/([^/]+)$")
CONFIG_MAP = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps/([^/]+)$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message}


def ready(obj: dict) -> dict:
    return {"observedGeneration": obj["metadata"]["generation"], "url": f"http://{obj['metadata']['name']}.example.com",
            "conditions": [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}],
            "modelStatus": {"transitionStatus": "UpToDate"}}


def failed_load(obj: dict) -> dict:
    return {"observedGeneration": obj["metadata"]["generation"],
            "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed", "message": "model failed to load"}],
            "modelStatus": {"transitionStatus": "BlockedByFailedLoad"}}


def version_of(predictor: dict) -> str:
    """The registry version a predictor serves (the tail of its STORAGE_URI)."""
    env = {e["name"]: e["value"] for c in predictor.get("containers", []) for e in c.get("env", [])}
    return env["STORAGE_URI"].rstrip("/").rsplit("/", 1)[-1]


def standard_ready(obj: dict) -> dict:
    """KServe's Standard (RawDeployment) mode: Ready, and each spec.canary entry deployed and Ready
    (CanaryReady); canaryTrafficPercent means nothing here (the real controller ignores it)."""
    canaries = obj["spec"].get("canary") or []
    status = {**ready(obj), "deploymentMode": "RawDeployment",
              "canaryStatuses": [{"name": c["predictor"]["name"], "ready": True, "trafficPercent": c["trafficPercent"]} for c in canaries]}
    if canaries:
        status["conditions"] = status["conditions"] + [{"type": "CanaryReady", "status": "True"}]
    return status


def traffic(obj: dict, previous: str | None) -> dict[str, int]:
    """Which version gets what share of the requests, as the mode's controller routes them.
    Serverless (Knative): canaryTrafficPercent to the latest revision, the rest to the previous
    one. Standard: spec.canary entries get their trafficPercent, the predictor the rest; a
    canaryTrafficPercent is ignored, so the applied predictor takes everything."""
    predictor, share = obj["spec"]["predictor"], {}
    if (obj.get("status") or {}).get("deploymentMode") == "RawDeployment":
        for c in obj["spec"].get("canary") or []:
            share[version_of(c["predictor"])] = c["trafficPercent"]
        share[version_of(predictor)] = 100 - sum(share.values())
    elif predictor.get("canaryTrafficPercent") and previous:
        share = {version_of(predictor): predictor["canaryTrafficPercent"], previous: 100 - predictor["canaryTrafficPercent"]}
    else:
        share = {version_of(predictor): 100}
    return share


def in_progress(obj: dict) -> dict:
    return {"observedGeneration": obj["metadata"]["generation"],
            "conditions": [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}]}


class FakeKube:
    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.controller: Callable[[dict], dict] = ready  # status for the current generation
        self.config_maps: dict[tuple[str, str], dict] = {}  # (namespace, name) -> data
        self.forbidden_config_maps = False  # a ServiceAccount without RBAC to read them
        self.unknown_fields: tuple[str, ...] = ()  # spec fields an older CRD does not have (e.g. "canary" before KServe 0.20)
        self.previous: dict[tuple[str, str], str] = {}  # the version served before the current spec (Serverless traffic)
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> a Pod (metadata.labels, status)
        self.logs: dict[tuple[str, str], list[str]] = {}  # (namespace, pod) -> its log lines so far
        self.forbidden_logs = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKube":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def traffic(self, ns: str, name: str) -> dict[str, int]:
        obj = self.objects[(ns, name)]
        return traffic({**obj, "status": self.controller(obj)}, self.previous.get((ns, name)))

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "deployer", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "deployer"}}],
        }))
        return path

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                url = urlsplit(self.path)
                fake.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                      "content_type": self.headers.get("Content-Type")})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, status(401, "Unauthorized", "Unauthorized"))
                    return None
                m = PATH.match(url.path)
                if not m:
                    self._send(404, status(404, "NotFound", f"the server could not find the requested resource {url.path}"))
                    return None
                return m.group(1), m.group(2), parse_qs(url.query)

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                cm, pods, log = CONFIG_MAP.match(path), PODS.match(path), POD_LOG.match(path)
                if cm:
                    self._config_map(*cm.groups())
                    return
                if pods or log:
                    self._core(pods, log)
                    return
                route = self._route()
                if route is None:
                    return
                ns, name, _ = route
                with fake.lock:
                    obj = fake.objects.get((ns, name))
                    if obj is None:
                        self._send(404, status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found'))
                        return
                    obj["status"] = fake.controller(obj)
                    self._send(200, obj)

            def _core(self, pods, log) -> None:
                """Pods by label selector, and a pod's log (timestamped lines, tailLines honoured)."""
                query = parse_qs(urlsplit(self.path).query)
                fake.requests.append({"method": "GET", "path": urlsplit(self.path).path, "query": query, "content_type": None})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, status(401, "Unauthorized", "Unauthorized"))
                    return
                if fake.forbidden_logs:
                    self._send(403, status(403, "Forbidden", 'pods is forbidden: User cannot list resource "pods"'))
                    return
                with fake.lock:
                    if pods:
                        want = dict(kv.split("=", 1) for kv in (query.get("labelSelector") or [""])[0].split(",") if kv)
                        items = [p for (ns, _), p in fake.pods.items() if ns == pods.group(1)
                                 and all(p["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
                        self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                        return
                    key = log.groups()
                    if key not in fake.pods:
                        self._send(404, status(404, "NotFound", f'pods "{key[1]}" not found'))
                        return
                    lines = [f"2026-12-07T10:00:{i // 60:02d}.{i % 60:09d}Z {line}" for i, line in enumerate(fake.logs.get(key, []))]
                tail = query.get("tailLines")
                lines = lines[-int(tail[0]):] if tail else lines
                data = "".join(line + "\n" for line in lines).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _config_map(self, ns: str, name: str) -> None:
                fake.requests.append({"method": "GET", "path": self.path, "query": {}, "content_type": None})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, status(401, "Unauthorized", "Unauthorized"))
                elif fake.forbidden_config_maps:
                    self._send(403, status(403, "Forbidden", f'configmaps "{name}" is forbidden: User cannot get resource "configmaps"'))
                elif (ns, name) not in fake.config_maps:
                    self._send(404, status(404, "NotFound", f'configmaps "{name}" not found'))
                else:
                    self._send(200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
                                     "data": fake.config_maps[(ns, name)]})

            def do_PATCH(self) -> None:
                route = self._route()
                if route is None:
                    return
                ns, name, query = route
                if self.headers.get("Content-Type") != "application/apply-patch+yaml" or query.get("fieldManager") != ["kubetune"]:
                    self._send(415, status(415, "UnsupportedMediaType", "expected a server-side apply by field manager kubetune"))
                    return
                body = yaml.safe_load(self.rfile.read(int(self.headers["Content-Length"])))
                if body["metadata"].get("name") != name or body["metadata"].get("namespace") != ns:
                    self._send(400, status(400, "BadRequest", "name/namespace in the body do not match the URL"))
                    return
                for field in fake.unknown_fields:  # an older CRD: rejected under strict validation, else dropped without a word
                    if field in body.get("spec", {}):
                        if query.get("fieldValidation") == ["Strict"]:
                            self._send(422, status(422, "Invalid", f".spec.{field}: field not declared in schema"))
                            return
                        del body["spec"][field]
                try:  # like an API server with strict field validation, against the published CRD
                    schemas.validate(body)
                except schemas.SchemaError as e:
                    self._send(422, status(422, "Invalid", str(e)))
                    return
                with fake.lock:
                    old = fake.objects.get((ns, name))
                    generation = 1 if old is None else old["metadata"]["generation"] + (old["spec"] != body["spec"])
                    # every field is ours (one field manager): the applied config replaces spec/labels/annotations
                    obj = copy.deepcopy(body)
                    obj["metadata"].update(generation=generation, uid=(old or {}).get("metadata", {}).get("uid", f"uid-{name}"),
                                           resourceVersion=str(len(fake.requests)), managedFields=[{"manager": "kubetune"}])
                    obj["status"] = (old or {}).get("status", {})
                    if old is not None and old["spec"] != body["spec"] and old["spec"].get("predictor", {}).get("containers"):
                        fake.previous[(ns, name)] = version_of(old["spec"]["predictor"])
                    fake.objects[(ns, name)] = obj
                    self._send(201 if old is None else 200, obj)

        return Handler
