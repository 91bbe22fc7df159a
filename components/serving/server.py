"""The KServe custom predictor: `kserve.Model` + `kserve.ModelServer` around
`kubetune.onnx.model.OnnxClassifier`, the prediction contract batch inference uses too.

Imported only by `kubetune.serving.serve` (which guards `sys.argv` first: importing kserve parses the
process's command line for its own flags). Run it with `kubetune serve` / `python -m kubetune.serving.serve`.

What the SDK gives: the v1 and v2 REST routes, health (`/`, `/v2/health/live`, `/v2/health/ready`,
`/v1/models/<name>`, `/v2/models/<name>/ready`), `/metrics` and uvicorn. What this adds: request
parsing with clear 4xx answers (kubetune.serving.protocol), the body size limit (an ASGI
middleware, before anything reads the body), micro-batching (kubetune.serving.microbatch), kubetune
metrics, and the model repository routes switched off (an unload request would take the model down).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from kubetune.core.system import usable_cpus
from kubetune.onnx.model import OnnxClassifier
from kubetune.serving.microbatch import MicroBatcher, Overloaded
from kubetune.serving.protocol import RequestError, TextLimits, apply_limits, texts_from_v1, texts_from_v2, v2_outputs

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServeMetrics:
    """kubetune's Prometheus metrics, next to KServe's request_*_seconds histograms on /metrics."""

    def __init__(self, model: str, version: str, task: str, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        labels = {"model_name": model}
        self.texts = Counter("kubetune_serve_texts", "texts predicted", ["model_name"], registry=reg).labels(**labels)
        self.truncated = Counter("kubetune_serve_texts_truncated", "texts cut to --max-text-chars before tokenization",
                                 ["model_name"], registry=reg).labels(**labels)
        self._rejected = Counter("kubetune_serve_rejected_requests", "requests answered with a 4xx/503, by reason",
                                 ["model_name", "reason"], registry=reg)
        self.batch_texts = Histogram("kubetune_serve_batch_texts", "texts per model call (micro-batch size)", ["model_name"],
                                     buckets=BATCH_BUCKETS, registry=reg).labels(**labels)
        self.batch_requests = Histogram("kubetune_serve_batch_requests", "requests answered by one model call", ["model_name"],
                                        buckets=BATCH_BUCKETS, registry=reg).labels(**labels)
        self.batch_seconds = Histogram("kubetune_serve_batch_seconds", "seconds per model call (tokenize + ONNX Runtime)",
                                       ["model_name"], registry=reg).labels(**labels)
        self.queued = Gauge("kubetune_serve_queued_texts", "texts waiting for a model call", ["model_name"], registry=reg).labels(**labels)
        Gauge("kubetune_serve_model_info", "the served model version (value 1)", ["model_name", "version", "task"],
              registry=reg).labels(model_name=model, version=version, task=task).set(1)
        self.model = model

    def rejected(self, reason: str) -> None:
        self._rejected.labels(model_name=self.model, reason=reason).inc()

    def batch(self, texts: int, requests: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)


class TextModel(kserve.Model):
    """Raw texts in, the OnnxClassifier.predict dicts out (v1 as they are, v2 as typed outputs)."""

    def __init__(self, name: str, model_dir: Path, version: str, cfg, metrics: ServeMetrics):
        super().__init__(name)
        self.model_dir, self.version, self.cfg, self.metrics = model_dir, version, cfg, metrics
        self.limits = TextLimits(cfg.max_texts, cfg.max_text_chars, cfg.long_texts)
        self.classifier: OnnxClassifier | None = None
        self.batcher: MicroBatcher | None = None

    def load(self) -> bool:
        self.classifier = OnnxClassifier(self.model_dir, device=self.cfg.device, threads=self.cfg.threads or usable_cpus())
        self.limits = dataclasses.replace(self.limits, keep=self.classifier.truncation)
        predict = functools.partial(self.classifier.predict, batch_size=self.cfg.onnx_batch_size)
        self.batcher = MicroBatcher(predict, max_batch=self.cfg.max_batch_texts,
                                    max_wait_s=self.cfg.batch_wait_ms / 1000, max_queue=self.cfg.max_queue_texts,
                                    on_batch=self.metrics.batch)
        self.ready = True
        return True

    def get_input_types(self) -> list[dict]:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        if self.classifier is None:
            return []
        return self.classifier.task.output_types(self.classifier.labels)  # [] : the outputs follow predict's keys

    def validate(self, payload):
        """All checks happen in predict (kubetune.serving.protocol), with kubetune's messages; KServe's
        own check would answer 500 for a bare JSON number (it tests `"instances" in payload`)."""
        return payload

    def _texts(self, payload) -> list[str]:
        if isinstance(payload, InferRequest):
            inputs = [SimpleNamespace(name=i.name, datatype=i.datatype, shape=i.shape,
                                      # binary-data extension: the bytes arrive split into items, not as JSON
                                      data=i.as_numpy().reshape(-1).tolist() if i._raw_data is not None else i.data)
                      for i in payload.inputs]
            return texts_from_v2(inputs)
        return texts_from_v1(payload)

    async def predict(self, payload, headers=None):
        try:
            texts, truncated = apply_limits(self._texts(payload), self.limits)
            results = await self.batcher.submit(texts)
        except RequestError as e:
            self.metrics.rejected(e.reason)
            raise
        except Overloaded as e:
            self.metrics.rejected("overloaded")
            raise RequestError(503, "overloaded", str(e)) from None
        finally:
            self.metrics.queued.set(self.batcher.queued)
        self.metrics.texts.inc(len(texts))
        if truncated:
            self.metrics.truncated.inc(truncated)
        if not isinstance(payload, InferRequest):
            return {"predictions": results}
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, model_version=self.version,
                             infer_outputs=[InferOutput(**o) for o in v2_outputs(results)],
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """ASGI middleware in front of KServe's routes: bodies over `max_body_bytes` get a 413 before the
    app reads them (by Content-Length, or by counting a chunked body), and the model repository
    routes (load/unload) are closed."""

    def __init__(self, app, max_body_bytes: int, metrics: ServeMetrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v2/repository"):
            self.metrics.rejected("repository_api")
            return await _send_json(send, 403, {"error": "the model repository API (load/unload) is disabled on this server"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"].endswith("/infer") and b"inference-header-content-length" not in headers \
                and headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/json":
            # curl -d sends a form content type; KServe would take such a v2 body for the binary
            # extension and answer 400. A body without the binary header can only be JSON.
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        too_big = {"error": f"request body over the limit of {self.max_body_bytes} bytes (--max-body-bytes); "
                            "send fewer or shorter texts per request"}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            self.metrics.rejected("body_too_large")
            return await _send_json(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                self.metrics.rejected("body_too_large")
                return await _send_json(send, 413, too_big)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, if any

        return await self.app(scope, replay, send)


def serve_forever(name: str, model_dir: Path, version: str, port: int, grpc_port: int, cfg) -> None:
    """Load the model, then serve until SIGTERM/SIGINT. The port opens only once the model is loaded,
    so a readiness probe never sees a server that cannot answer."""
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    classifier_info = json.loads((model_dir / "kubetune.json").read_text())
    metrics = ServeMetrics(name, version, classifier_info.get("task", "unknown"))
    model = TextModel(name, model_dir, version, cfg, metrics)
    model.load()

    async def request_error(_, exc: RequestError):
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    app.add_middleware(RequestGuard, max_body_bytes=cfg.max_body_bytes, metrics=metrics)
    app.add_exception_handler(RequestError, request_error)
    server = kserve.ModelServer(http_port=port, grpc_port=grpc_port or 8081, enable_grpc=grpc_port > 0, workers=1,
                                enable_docs_url=False, enable_latency_logging=False)
    # Log noise, not information: two kserve.trace lines per request repeat what /metrics and the
    # access log already hold, and kserve's routes trip FastAPI's ORJSONResponse deprecation notice.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    server.start([model])
