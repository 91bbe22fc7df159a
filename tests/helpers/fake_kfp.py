"""A small fake Kubeflow Pipelines API server (v2beta1 REST, real HTTP): experiments, pipeline
upload and versions, runs and recurring runs, stored in memory and recorded, so `kubetune
upload/submit/schedule` run the real kfp.Client against it."""

from __future__ import annotations

import email
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"


class FakeKfp:
    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.runs: list[dict] = []
        self.recurring_runs: list[dict] = []
        self.ids = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKfp":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    # ---- routes: (method, path) -> (status, body) ------------------------------------------
    def route(self, method: str, path: str, query: dict, body) -> tuple[int, dict]:
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/experiments"):
            return 200, {"experiments": self._filtered(self.experiments.values(), query)}
        if (method, path) == ("POST", f"{API}/experiments"):
            exp = {**body, "experiment_id": self.new_id("experiment")}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if (method, path) == ("GET", f"{API}/pipelines"):
            return 200, {"pipelines": self._filtered(self.pipelines.values(), query)}
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            pipeline = {"pipeline_id": self.new_id("pipeline"), "display_name": query["name"][0],
                        "description": query.get("description", [""])[0]}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self.versions[pipeline["pipeline_id"]] = [{"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": self.new_id("version"),
                                                       "display_name": pipeline["display_name"], "pipeline_spec": body}]
            return 200, pipeline
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            version = {"pipeline_id": query["pipelineid"][0], "pipeline_version_id": self.new_id("version"),
                       "display_name": query["name"][0], "description": query.get("description", [""])[0], "pipeline_spec": body}
            self.versions[version["pipeline_id"]].append(version)
            return 200, version
        if method == "GET" and path.startswith(f"{API}/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[-2]
            return 200, {"pipeline_versions": list(reversed(self.versions.get(pid, [])))}
        if (method, path) == ("POST", f"{API}/runs"):
            run = {**body, "run_id": self.new_id("run"), "state": "PENDING"}
            self.runs.append(run)
            return 200, run
        if (method, path) == ("POST", f"{API}/recurringruns"):
            job = {**body, "recurring_run_id": self.new_id("recurring")}
            self.recurring_runs.append(job)
            return 200, job
        return 404, {"error": f"fake KFP has no route {method} {path}", "code": 5}

    @staticmethod
    def _filtered(items, query) -> list[dict]:
        """The display_name EQUALS filter kfp.Client sends to look things up by name."""
        flt = json.loads(query.get("filter", ["{}"])[0] or "{}")
        preds = flt.get("predicates", [])
        out = []
        for item in items:
            if all(item.get(p["key"]) == p.get("string_value", p.get("stringValue")) for p in preds):
                out.append(item)
        return out

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):  # the uploaded pipeline file
                    msg = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                    (part,) = [p for p in msg.get_payload() if p.get_param("name", header="content-disposition") == "uploadfile"]
                    return list(yaml.safe_load_all(part.get_payload(decode=True)))
                return json.loads(raw) if raw else None

            def _serve(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                body = self._body()
                fake.requests.append({"method": self.command, "path": url.path, "query": query, "body": body})
                code, reply = fake.route(self.command, url.path, query, body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

        return Handler
