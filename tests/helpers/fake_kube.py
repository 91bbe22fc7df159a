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


def in_progress(obj: dict) -> dict:
    return {"observedGeneration": obj["metadata"]["generation"],
            "conditions": [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}]}


class FakeKube:
    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.controller: Callable[[dict], dict] = ready  # status for the current generation
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
                    fake.objects[(ns, name)] = obj
                    self._send(201 if old is None else 200, obj)

        return Handler
