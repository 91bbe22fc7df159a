"""Requests and responses of the model server, as plain data (no web framework here).

KServe v1, `POST /v1/models/<name>:predict`:

    {"instances": ["free entry to win a prize", "see you at 6"]}          texts
    {"instances": [{"text": "free entry to win a prize"}, ...]}            or objects with a "text"
 -> {"predictions": [{"label": "spam", "score": 0.98, "probabilities": {"ham": 0.02, "spam": 0.98}}, ...]}

Open Inference Protocol (v2), `POST /v2/models/<name>/infer`: one BYTES input of shape [N] (or
[N, 1]) holding the texts; one output per key of the prediction, typed from its values: strings
-> BYTES [N]; numbers -> FP64 [N]; {label: number} -> FP64 [N, K] (row-major, the K labels in the
output's `labels` parameter as a JSON list); anything else (e.g. a token classifier's entity
lists) -> BYTES [N] of JSON (parameter content_type=application/json).

Every rejection is a `RequestError` with the HTTP status to answer and a message naming the field,
the item index and the limit, e.g. `instances[3]: expected a string or {"text": string}, got int`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

V1_SHAPE = '{"instances": ["text", ...]} or {"instances": [{"text": "..."}, ...]}'


class RequestError(Exception):
    """A request the server will not run; `status` is the HTTP status to answer (4xx/503)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def bad(message: str, reason: str = "bad_shape") -> RequestError:
    return RequestError(400, reason, message)


@dataclass(frozen=True)
class TextLimits:
    max_texts: int
    max_text_chars: int
    long_texts: str  # "truncate" | "reject"
    keep: str = "head"  # the model's truncation (kubetune.json): which characters a cut keeps, so tokens are cut alike


def _type(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def decode_json(body: bytes) -> Any:
    """A body sent without a JSON content type (curl -d sends form-encoded): still parsed as JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}); send {V1_SHAPE}", "bad_json") from None


def texts_from_v1(payload: Any) -> list[str]:
    if isinstance(payload, (bytes, bytearray)):
        payload = decode_json(bytes(payload))
    if not isinstance(payload, dict):
        raise bad(f"expected a JSON object {V1_SHAPE}, got a JSON {_type(payload)}")
    if "instances" not in payload:
        raise bad(f"the request has no \"instances\" field (fields: {sorted(payload)}); send {V1_SHAPE}")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise bad(f"\"instances\" must be a list, got a JSON {_type(instances)}; send {V1_SHAPE}")
    texts = []
    for i, item in enumerate(instances):
        if isinstance(item, dict):
            if set(item) != {"text"}:
                raise bad(f"instances[{i}]: an object must have exactly one field \"text\", got fields {sorted(item)}", "bad_item")
            item = item["text"]
        if not isinstance(item, str):
            raise bad(f"instances[{i}]: expected a string or {{\"text\": string}}, got a JSON {_type(item)}", "bad_item")
        texts.append(item)
    return texts


def texts_from_v2(inputs: list, input_name: str = "text") -> list[str]:
    """The texts of a v2 request: `inputs` are objects with name, datatype, shape and either `data`
    (JSON) or `raw` (bytes already split into items by the binary-data extension)."""
    if len(inputs) != 1:
        raise bad(f"expected exactly one input (BYTES, shape [N], the texts), got {len(inputs)}: {[i.name for i in inputs]}")
    inp = inputs[0]
    if inp.datatype != "BYTES":
        raise bad(f"input {inp.name!r}: datatype must be BYTES (the texts), got {inp.datatype}")
    shape = list(inp.shape or [])
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise bad(f"input {inp.name!r}: shape must be [N] or [N, 1], got {shape}")
    data = inp.data
    if data and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # [[t1], [t2]] for shape [N, 1]
    if not isinstance(data, list) or len(data) != shape[0]:
        size = len(data) if isinstance(data, list) else _type(data)
        raise bad(f"input {inp.name!r}: shape {shape} says {shape[0]} texts, data holds {size}")
    texts = []
    for i, item in enumerate(data):
        if isinstance(item, (bytes, bytearray)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise bad(f"input {inp.name!r}, item {i}: not valid UTF-8", "bad_item") from None
        if not isinstance(item, str):
            raise bad(f"input {inp.name!r}, item {i}: expected a string, got a JSON {_type(item)}", "bad_item")
        texts.append(item)
    return texts


def apply_limits(texts: list[str], limits: TextLimits) -> tuple[list[str], int]:
    """(texts, how many were truncated). Empty requests and too many texts are rejected; texts longer
    than max_text_chars are cut there or rejected, as configured."""
    if not texts:
        raise bad("the request holds no texts; send at least one", "empty")
    if len(texts) > limits.max_texts:
        raise RequestError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {limits.max_texts} (split the request)")
    long = [i for i, t in enumerate(texts) if len(t) > limits.max_text_chars]
    if not long:
        return texts, 0
    if limits.long_texts == "reject":
        raise RequestError(413, "text_too_long",
                           f"text {long[0]} has {len(texts[long[0]])} characters; the limit is {limits.max_text_chars}"
                           + (f" ({len(long)} texts are over it)" if len(long) > 1 else ""))
    return [cut_text(t, limits.max_text_chars, limits.keep) for t in texts], len(long)


def cut_text(text: str, limit: int, keep: str) -> str:
    """`text` cut to `limit` characters the way the model's token truncation cuts (head, tail, or
    head+tail: a quarter from the start, the rest from the end), so the tokens the model then keeps
    are those of the whole text whenever each kept piece holds more tokens than max_length needs."""
    if len(text) <= limit:
        return text
    if keep == "tail":
        return text[len(text) - limit:]
    if keep == "head+tail":
        head = limit // 4
        return text[:head] + text[len(text) - (limit - head):]
    return text[:limit]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def v2_outputs(results: list[dict]) -> list[dict]:
    """One OIP output per prediction key (see the module docstring), as InferOutput keyword arguments."""
    n = len(results)
    outputs = []
    for key in results[0]:
        values = [r.get(key) for r in results]
        if all(isinstance(v, str) for v in values):
            outputs.append({"name": key, "datatype": "BYTES", "shape": [n], "data": values})
        elif all(_number(v) for v in values):
            outputs.append({"name": key, "datatype": "FP64", "shape": [n], "data": [float(v) for v in values]})
        elif (all(isinstance(v, dict) for v in values) and all(list(v) == list(values[0]) for v in values)
              and all(_number(x) for v in values for x in v.values())):
            labels = list(values[0])
            outputs.append({"name": key, "datatype": "FP64", "shape": [n, len(labels)],
                            "data": [float(x) for v in values for x in v.values()],
                            "parameters": {"labels": json.dumps(labels, ensure_ascii=False)}})
        else:
            outputs.append({"name": key, "datatype": "BYTES", "shape": [n], "data": [json.dumps(v, ensure_ascii=False) for v in values],
                            "parameters": {"content_type": "application/json"}})
    return outputs
