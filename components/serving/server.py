"""The KServe custom predictor: `kserve.Model` + `kserve.ModelServer` around
`kubetune.onnx.model.OnnxClassifier`, the prediction contract batch inference uses too.

Imported only by `kubetune.serving.serve` (which guards `sys.argv` first: importing kserve parses the
process's command line for its own flags). Run it with `kubetune serve` / `python -m kubetune.serving.serve`.

What the SDK gives: the v1 and v2 REST routes, health (`/`, `/v2/health/live`, `/v2/health/ready`,
`/v1/models/<name>`, `/v2/models/<name>/ready`), `/metrics` and uvicorn. What this adds: request
parsing with clear 4xx answers (kubetune.serving.protocol), the body size limit (an ASGI
middleware, before anything reads the body), micro-batching (kubetune.serving.microbatch), kubetune
metrics, and the model repository routes switched off (an unload request would take the model down).

Monitoring metrics (per answered text; labels: model_name, and `label` = one of the model's classes
or entity types, so the cardinality is bounded by the label set):
  kubetune_serve_predictions_total{label}   predicted labels (NER: entities by type; multiple choice: answer letters)
  kubetune_serve_confidence                 histogram of the top-label probability (NER: entity scores), 0.1 buckets
  kubetune_serve_input_tokens               histogram of tokens per text after max_length
  kubetune_serve_unknown_tokens_total / kubetune_serve_content_tokens_total   unknown-token share = their ratio
They reuse the token ids of the prediction (kubetune.tasks.predictor.Scored): a request is tokenized once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import threading
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from kubetune import tasks
from kubetune.core.progress import log
from kubetune.core.system import usable_cpus
from kubetune.monitoring import features
from kubetune.monitoring.profile import CONFIDENCE_EDGES
from kubetune.onnx.model import OnnxClassifier
from kubetune.serving import protocol
from kubetune.serving.microbatch import MicroBatcher, Overloaded, TextFailed
from kubetune.serving.protocol import RequestError, TextLimits, apply_limits, texts_from_v1, texts_from_v2, v2_outputs
from kubetune.storage.contracts import ModelSettings

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # a client's x-request-id is logged only when it looks like one
LOG = logging.getLogger("kubetune.serve")


class ErrorLog:
    """One log line per failed request (request id, error), at most `burst` lines per `window_s`:
    a flood of bad traffic must not become a flood of log (an earlier version logged a traceback
    per 500: 4 MB in 45 s). What was held back is counted in the next line that gets through."""

    def __init__(self, burst: int = 10, window_s: float = 60.0, logger: logging.Logger = LOG):
        self.burst, self.window_s, self.logger = burst, window_s, logger
        self._lock = threading.Lock()
        self._window_start, self._in_window, self.suppressed = 0.0, 0, 0

    def admit(self, message: str) -> str | None:
        """`message` (with the count of those held back since the last one) when under the rate, else None."""
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self.window_s:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self.burst:
                self.suppressed += 1
                return None
            self._in_window += 1
            held, self.suppressed = self.suppressed, 0
        return message + (f" ({held} similar errors not logged in the last {self.window_s:.0f}s)" if held else "")

    def error(self, message: str) -> bool:
        """Log `message` unless over the rate; True when it was logged."""
        line = self.admit(message)
        if line is not None:
            self.logger.error(line)
        return line is not None


class OneLineRejections(logging.Filter):
    """KServe logs a full traceback for every request its own decoding rejects with a 400 (invalid
    JSON, a lone surrogate orjson refuses): a flood of bad requests became megabytes of log. Such a
    record becomes one line, rate-limited like the 500s (`limit`: at most `burst` per window, the
    rest counted in the next line); the access log already has one per request."""

    def __init__(self, limit: ErrorLog | None = None):
        super().__init__()
        self.limit = limit or ErrorLog()

    def filter(self, record: logging.LogRecord) -> bool:
        from kserve.errors import InvalidInput

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InvalidInput):
            line = self.limit.admit(f"rejected a request (400): {exc}")
            if line is None:
                return False
            record.msg, record.args, record.exc_info, record.exc_text = line, (), None, None
        return True


def request_id(headers) -> str:
    given = (headers or {}).get("x-request-id", "")
    return given if isinstance(given, str) and REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


class ServeMetrics:
    """kubetune's Prometheus metrics, next to KServe's request_*_seconds histograms on /metrics."""

    def __init__(self, model: str, version: str, task: str, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        labels = {"model_name": model}
        self.texts = Counter("kubetune_serve_texts", "texts predicted", ["model_name"], registry=reg).labels(**labels)
        self.truncated = Counter("kubetune_serve_texts_truncated", "texts cut to --max-text-chars before tokenization",
                                 ["model_name"], registry=reg).labels(**labels)
        self._rejected = Counter("kubetune_serve_rejected_requests", "requests answered with an error (4xx, 503, 500), by reason",
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
        # monitoring (kubetune.monitoring): low cardinality on purpose, a label per class / entity type only
        self._predicted = Counter("kubetune_serve_predictions", "predictions by predicted label (NER: entities by type)",
                                  ["model_name", "label"], registry=reg)
        self.confidence = Histogram("kubetune_serve_confidence", "top-label probability (NER: each entity's score)", ["model_name"],
                                    buckets=CONFIDENCE_EDGES[1:], registry=reg).labels(**labels)
        self.input_tokens = Histogram("kubetune_serve_input_tokens", "tokens per text as the model reads it (after max_length)",
                                      ["model_name"], buckets=TOKEN_BUCKETS, registry=reg).labels(**labels)
        self.unknown_tokens = Counter("kubetune_serve_unknown_tokens", "tokens the tokenizer mapped to its unknown token",
                                      ["model_name"], registry=reg).labels(**labels)
        self.content_tokens = Counter("kubetune_serve_content_tokens", "non-special tokens read (unknown share = "
                                      "unknown_tokens / content_tokens)", ["model_name"], registry=reg).labels(**labels)
        self.logged = Counter("kubetune_serve_request_log_texts", "texts written to the request log (--request-log)",
                              ["model_name"], registry=reg).labels(**labels)
        self.log_dropped = Counter("kubetune_serve_request_log_dropped", "sampled texts not logged: rate_limit, queue_full, "
                                   "write_error", ["model_name", "reason"], registry=reg)
        self.model = model

    def observe(self, clf: OnnxClassifier, scored: list) -> None:
        """The monitoring metrics of one answered request: what was predicted, how confidently, how
        long the texts were and how much of them the vocabulary covers (from the predictor's token ids)."""
        outputs = clf.task.profile_outputs([s.prediction for s in scored], clf.labels)
        # the first distribution is what was predicted (labels, entity types, answer positions); others
        # (multiple choice's choice counts) are not predictions
        for label, n in next(iter(outputs["distributions"].values()), {}).items():
            if n:
                self._predicted.labels(model_name=self.model, label=label).inc(n)
        for name, (values, _edges) in outputs["histograms"].items():
            if name == "confidence":
                for v in values:
                    self.confidence.observe(v)
        rows = [s.ids for s in scored]
        unknown, content = features.unknown_counts(rows, clf.tokenizer.unk_token_id, features.special_ids(clf.tokenizer))
        for ids in rows:
            self.input_tokens.observe(len(ids))
        self.unknown_tokens.inc(int(unknown.sum()))
        self.content_tokens.inc(int(content.sum()))

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
        self.errors = ErrorLog()
        self.request_log = None  # a kubetune.serving.requestlog.RequestLog when --request-log is on

    def load(self) -> bool:
        self.classifier = OnnxClassifier(self.model_dir, device=self.cfg.device, threads=self.cfg.threads or usable_cpus())
        self.limits = dataclasses.replace(self.limits, keep=self.classifier.truncation)
        log("serve", f"model {self.name}: variant {self.classifier.variant}, {self.classifier.kernels}, "
                     f"{self.cfg.threads or usable_cpus()} threads")
        # one Scored per text; a micro-batch is encoded in one tokenizer call, run onnx_batch_size texts at a time
        score = functools.partial(self.classifier.score, batch_size=self.cfg.onnx_batch_size, chunk=0)
        self.batcher = MicroBatcher(score, max_batch=self.cfg.max_batch_texts,
                                    max_wait_s=self.cfg.batch_wait_ms / 1000, max_queue=self.cfg.max_queue_texts,
                                    on_batch=self.metrics.batch)
        self.ready = True
        return True

    def get_input_types(self) -> list[dict]:
        """One BYTES input per field of the task's inputs: [-1], or [-1, -1] for a list field (its
        flattened form with a `<field>_count` input is accepted too). The metadata schema has no
        place to mark an optional field (multiple choice's context): it is listed like the others."""
        spec = protocol.input_spec(self.classifier.task if self.classifier else ("text",))
        return [{"name": f, "datatype": "BYTES", "shape": [-1, -1] if f in spec.list_fields else [-1]} for f in spec.fields]

    def get_output_types(self) -> list[dict]:
        if self.classifier is None:
            return []
        # [] : the outputs follow predict's keys. Only the metadata tensor's fields: REST drops the rest, gRPC refuses them
        return [{k: o[k] for k in ("name", "datatype", "shape")} for o in self.classifier.task.output_types(self.classifier.labels)]

    def validate(self, payload):
        """All checks happen in predict (kubetune.serving.protocol), with kubetune's messages; KServe's
        own check would answer 500 for a bare JSON number (it tests `"instances" in payload`)."""
        return payload

    def _texts(self, payload) -> list[str]:
        if isinstance(payload, InferRequest):
            # binary-data extension: KServe decoded the items into `data` (RequestGuard checked them first)
            inputs = [SimpleNamespace(name=i.name, datatype=i.datatype, shape=i.shape,
                                      data=i.as_numpy().reshape(-1).tolist() if i._raw_data is not None else i.data)
                      for i in payload.inputs]
            return texts_from_v2(inputs, self.classifier.task)
        return texts_from_v1(payload, self.classifier.task)

    async def predict(self, payload, headers=None):
        try:
            texts, truncated = apply_limits(self._texts(payload), self.limits)
            scored = await self.batcher.submit(texts)
        except RequestError as e:
            self.metrics.rejected(e.reason)
            raise
        except Overloaded as e:
            self.metrics.rejected("overloaded")
            raise RequestError(503, "overloaded", str(e)) from None
        except TextFailed as e:  # the model failed on this text alone; the rest of its batch was answered
            rid = request_id(headers)
            self.metrics.rejected("text_failed")
            self.errors.error(f"request {rid}: text {e.index} failed the model: {type(e.cause).__name__}: {e.cause}")
            raise RequestError(422, "text_failed", f"text {e.index} could not be processed by the model "
                                                   f"({type(e.cause).__name__}); request id {rid}") from None
        except Exception as e:  # a bug, not the client's fault: 500 for this request only, logged once
            rid = request_id(headers)
            self.metrics.rejected("internal_error")
            self.errors.error(f"request {rid}: internal error: {type(e).__name__}: {e}")
            raise RequestError(500, "internal_error", f"internal error while predicting; request id {rid} "
                                                      "(the server log has the details)") from None
        finally:
            self.metrics.queued.set(self.batcher.queued)
        self.metrics.texts.inc(len(texts))
        self.metrics.observe(self.classifier, scored)
        if self.request_log is not None:
            self.request_log.offer(texts, scored)
        results = [s.prediction for s in scored]
        if truncated:
            self.metrics.truncated.inc(truncated)
        if not isinstance(payload, InferRequest):
            return {"predictions": results}
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, model_version=self.version,
                             infer_outputs=[InferOutput(**o) for o in v2_outputs(results)],
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


MAX_JSON_DEPTH = 32  # a v2 request is 5 deep ({"inputs": [{"data": [[t]]}]}); KServe's own JSON parser stops at 1024
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(body: bytes) -> int:
    """How deep the brackets of a JSON text nest, outside its strings; vectorized, since a 1 MB body
    of '[' must be turned away fast. Not a validator: the JSON parser runs later."""
    import numpy as np

    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit: the usual request pays two counts
    codes = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


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
        declared_json = headers.get(b"inference-header-content-length", b"")
        json_part = body[:int(declared_json)] if declared_json.isdigit() else body  # not the binary tensor data
        depth = json_depth(json_part)
        if depth > MAX_JSON_DEPTH:
            # Python's JSON parser (FastAPI's, for v2) raises RecursionError on 100,000 '[': a 500
            self.metrics.rejected("bad_json")
            return await _send_json(send, 400, {"error": f"the request body is nested {depth} levels deep; "
                                                         f"the limit is {MAX_JSON_DEPTH} (send a flat list of texts)"})
        if declared_json.isdigit():
            try:
                protocol.check_binary_request(body, int(declared_json))
            except RequestError as e:
                self.metrics.rejected(e.reason)
                return await _send_json(send, e.status, {"error": e.message})

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, if any

        return await self.app(scope, replay, send)


def listen_on(host: str) -> None:
    """KServe 0.21 binds HTTP to 0.0.0.0 and gRPC to [::], with no option: set the address on the
    uvicorn config its RESTServer builds, and rewrite the address its GRPCServer passes to grpc.
    Checked by tests/serving/test_serve.py (the sockets the server process listens on)."""
    import kserve.model_server as model_server
    import kserve.protocol.grpc.server as grpc_server

    class RESTServer(model_server.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host  # read when uvicorn binds, after this

    real_aio = grpc_server.aio
    grpc_host = f"[{host}]" if ":" in host else host

    class Aio:
        def __getattr__(self, attr):
            return getattr(real_aio, attr)

        def server(self, *args, **kwargs):
            srv = real_aio.server(*args, **kwargs)
            add_port = srv.add_insecure_port
            srv.add_insecure_port = lambda address: add_port(address.replace("[::]", grpc_host, 1))
            return srv

    model_server.RESTServer = RESTServer
    grpc_server.aio = Aio()


def serve_forever(name: str, model_dir: Path, version: str, host: str, port: int, grpc_port: int, cfg, log_store=None) -> None:
    """Load the model, then serve until SIGTERM/SIGINT. The port opens only once the model is loaded,
    so a readiness probe never sees a server that cannot answer."""
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    metrics = ServeMetrics(name, version, ModelSettings.read(model_dir, tasks.DEFAULT).task)
    model = TextModel(name, model_dir, version, cfg, metrics)
    model.load()
    if log_store is not None:
        from kubetune.serving.requestlog import RequestLog

        model.request_log = RequestLog(log_store, name, version, model.classifier, cfg, (metrics.logged, metrics.log_dropped))

    async def request_error(_, exc: RequestError):
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    app.add_middleware(RequestGuard, max_body_bytes=cfg.max_body_bytes, metrics=metrics)
    app.add_exception_handler(RequestError, request_error)
    listen_on(host)
    server = kserve.ModelServer(http_port=port, grpc_port=grpc_port or 8081, enable_grpc=grpc_port > 0, workers=1,
                                enable_docs_url=False, enable_latency_logging=False)
    # Log noise, not information: two kserve.trace lines per request repeat what /metrics and the
    # access log already hold, and kserve's routes trip FastAPI's ORJSONResponse deprecation notice.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    logging.getLogger("kserve").addFilter(OneLineRejections())
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    try:
        server.start([model])
    finally:  # SIGTERM ends start(): write what the request log still holds
        if model.request_log is not None:
            model.request_log.close()
