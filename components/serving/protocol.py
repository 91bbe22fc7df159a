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

A pair classifier (a task whose inputs are several fields, kubetune.tasks: input_fields) takes
objects with exactly those fields, `{"instances": [{"text": "q", "text_pair": "passage"}]}`, and in
v2 one BYTES input per field, named by it (each [N], all the same N); its inputs are then tuples
(text, text_pair) in the field order.

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
    except RecursionError:  # 100,000 '[' is valid JSON that Python's parser cannot hold
        raise bad(f"the request body is nested too deeply; send {V1_SHAPE}", "bad_json") from None


def check_text(where: str, text: str) -> str:
    """A JSON string may hold a lone surrogate ("\\ud800"): valid JSON, but no text a tokenizer can
    encode. Rejected here, with the item, rather than failing the model call."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{where}: not valid Unicode (a lone surrogate at character {e.start}); send UTF-8 text", "bad_item") from None
    return text


def split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """The items of a BYTES tensor in the binary-data extension: each a 4-byte little-endian length,
    then that many bytes. Lengths that run past the data, or a count other than the shape's, are
    rejected before anything is decoded."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad(f"input {name!r}, item {len(items)}: binary data ends inside a 4-byte length prefix", "bad_item")
        size = int.from_bytes(raw[pos:pos + 4], "little")
        if pos + 4 + size > len(raw):
            raise bad(f"input {name!r}, item {len(items)}: its length prefix says {size} bytes, "
                      f"{len(raw) - pos - 4} are left in the binary data", "bad_item")
        items.append(raw[pos + 4:pos + 4 + size])
        pos += 4 + size
    if len(items) != count:
        raise bad(f"input {name!r}: shape says {count} texts, the binary data holds {len(items)}")
    return items


def _shape_of(fields: tuple[str, ...]) -> str:
    return V1_SHAPE if fields == ("text",) else '{"instances": [{' + ", ".join(f'"{f}": "..."' for f in fields) + "}, ...]}"


def texts_from_v1(payload: Any, fields: tuple[str, ...] = ("text",)) -> list:
    """The inputs of a v1 request: strings, or for a several-field task tuples in `fields` order."""
    if fields != ("text",):
        return _records_from_v1(payload, fields)
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
        texts.append(check_text(f"instances[{i}]", item))
    return texts


def _instances(payload: Any, shape: str) -> list:
    if isinstance(payload, (bytes, bytearray)):
        payload = decode_json(bytes(payload))
    if not isinstance(payload, dict):
        raise bad(f"expected a JSON object {shape}, got a JSON {_type(payload)}")
    if "instances" not in payload:
        raise bad(f"the request has no \"instances\" field (fields: {sorted(payload)}); send {shape}")
    if not isinstance(payload["instances"], list):
        raise bad(f"\"instances\" must be a list, got a JSON {_type(payload['instances'])}; send {shape}")
    return payload["instances"]


def _records_from_v1(payload: Any, fields: tuple[str, ...]) -> list[tuple]:
    shape = _shape_of(fields)
    out = []
    for i, item in enumerate(_instances(payload, shape)):
        if not isinstance(item, dict) or set(item) != set(fields):
            got = f"fields {sorted(item)}" if isinstance(item, dict) else f"a JSON {_type(item)}"
            raise bad(f"instances[{i}]: expected an object with exactly the fields {', '.join(fields)}, got {got}; send {shape}",
                      "bad_item")
        for f in fields:
            if not isinstance(item[f], str):
                raise bad(f"instances[{i}].{f}: expected a string, got a JSON {_type(item[f])}", "bad_item")
        out.append(tuple(check_text(f"instances[{i}].{f}", item[f]) for f in fields))
    return out


def texts_from_v2(inputs: list, fields: tuple[str, ...] = ("text",)) -> list:
    """The texts of a v2 request: `inputs` are objects with name, datatype, shape and `data` (JSON,
    or the items KServe decoded from the binary-data extension, which check_binary_request checked).
    For a several-field task one input per field, by name; the result is then tuples in `fields` order."""
    if fields != ("text",):
        by_name = {i.name: i for i in inputs}
        if sorted(by_name) != sorted(fields) or len(inputs) != len(fields):
            raise bad(f"expected the BYTES inputs {', '.join(fields)} (one each, shape [N]), got {[i.name for i in inputs]}")
        columns = [_texts_of(by_name[f]) for f in fields]
        if len({len(c) for c in columns}) != 1:
            raise bad("inputs " + ", ".join(f"{f!r} holds {len(c)}" for f, c in zip(fields, columns)) + ": they must be the same length")
        return list(zip(*columns))
    if len(inputs) != 1:
        raise bad(f"expected exactly one input (BYTES, shape [N], the texts), got {len(inputs)}: {[i.name for i in inputs]}")
    return _texts_of(inputs[0])


def _texts_of(inp) -> list[str]:
    if inp.datatype != "BYTES":
        raise bad(f"input {inp.name!r}: datatype must be BYTES (the texts), got {inp.datatype}")
    shape = list(inp.shape or [])
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape) \
            or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
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
        texts.append(check_text(f"input {inp.name!r}, item {i}", item))
    return texts


def check_binary_request(body: bytes, header_length: int) -> None:
    """A v2 request in the binary-data extension (a JSON header of `header_length` bytes, then each
    input's bytes), checked before KServe decodes it: KServe unpacks BYTES items with struct and a
    bad length prefix would surface as a 500. Sizes must fit the body, BYTES items their shape."""
    if header_length > len(body):
        raise bad(f"inference-header-content-length {header_length} is larger than the body ({len(body)} bytes)", "bad_binary")
    try:
        header = json.loads(body[:header_length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return  # not JSON: KServe's own parser answers 400
    inputs = header.get("inputs") if isinstance(header, dict) else None
    pos = header_length
    for inp in inputs if isinstance(inputs, list) else []:
        params = inp.get("parameters") if isinstance(inp, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        name, size, shape = inp.get("name"), params["binary_data_size"], inp.get("shape")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"input {name!r}: binary_data_size must be a byte count, got {size!r}", "bad_binary")
        if pos + size > len(body):
            raise bad(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                      f"({len(body) - pos} bytes left)", "bad_binary")
        if inp.get("datatype") == "BYTES":
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise bad(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
            count = 1
            for d in shape:
                count *= d
            for i, item in enumerate(split_bytes(body[pos:pos + size], count, str(name))):
                try:  # KServe decodes the items as UTF-8 itself and answers 500 when it cannot
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad(f"input {name!r}, item {i}: not valid UTF-8", "bad_item") from None
        pos += size


def _longest(item) -> int:
    return len(item) if isinstance(item, str) else max(len(t) for t in item)


def _cut(item, limit: int, keep: str = "head"):
    return cut_text(item, limit, keep) if isinstance(item, str) else tuple(t[:limit] for t in item)


def apply_limits(texts: list, limits: TextLimits) -> tuple[list, int]:
    """(texts, how many were truncated). Empty requests and too many texts are rejected; texts longer
    than max_text_chars are cut there or rejected, as configured (each text of a pair on its own)."""
    if not texts:
        raise bad("the request holds no texts; send at least one", "empty")
    if len(texts) > limits.max_texts:
        raise RequestError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {limits.max_texts} (split the request)")
    long = [i for i, t in enumerate(texts) if _longest(t) > limits.max_text_chars]
    if not long:
        return texts, 0
    if limits.long_texts == "reject":
        raise RequestError(413, "text_too_long",
                           f"text {long[0]} has {_longest(texts[long[0]])} characters; the limit is {limits.max_text_chars}"
                           + (f" ({len(long)} texts are over it)" if len(long) > 1 else ""))
    over = set(long)
    return [_cut(t, limits.max_text_chars, limits.keep) if i in over else t for i, t in enumerate(texts)], len(long)


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
