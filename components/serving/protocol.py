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

A task may declare fields that hold a list of texts (list_fields) and fields a request may leave
out (optional_fields); multiple choice reads (question, choices, context):

    {"instances": [{"question": "2 + 2?", "choices": ["3", "4", "5"], "context": "arithmetic"}]}

v1: each list field a JSON list of strings, an optional field absent, null or a string (a blank one
counts as absent). v2: one BYTES input per field, named by it: plain and optional fields [N]; a list
field [N, C] (row-major, C texts per item), or flattened [M] with an INT32/INT64 input
`<field>_count` of shape [N] (`choice_count` for `choices`) whose values sum to M. Inputs are then
tuples in the field order, a list field's texts a tuple, an absent optional field None; then the
task's `input_problem` (e.g. "has 1 choices; give 2 to 16") rejects an item it cannot score.

Every rejection is a `RequestError` with the HTTP status to answer and a message naming the field,
the item index and the limit, e.g. `instances[3]: expected a string or {"text": string}, got int`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

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


@dataclass(frozen=True)
class InputSpec:
    """What one prediction input holds (kubetune.tasks: input_fields, list_fields, optional_fields,
    input_problem): the request parsers read it, never the task's name."""

    fields: tuple[str, ...] = ("text",)
    list_fields: tuple[str, ...] = ()  # fields holding a list of texts
    optional_fields: tuple[str, ...] = ()  # fields a request may leave out (None)
    problem: Callable[[Any], str] | None = None  # why an item cannot be scored beyond its texts' checks, or ""

    @property
    def plain(self) -> bool:
        """Every field one required text (a single text, a pair): the original request shapes."""
        return not self.list_fields and not self.optional_fields

    def problem_of(self, item) -> str:
        return self.problem(item) if self.problem is not None else ""


def input_spec(task_or_fields: Any = ("text",)) -> InputSpec:
    """The InputSpec of a task (anything with input_fields), or of a tuple of plain text fields."""
    if isinstance(task_or_fields, InputSpec):
        return task_or_fields
    if isinstance(task_or_fields, (tuple, list)):
        return InputSpec(tuple(task_or_fields))
    task = task_or_fields
    return InputSpec(tuple(task.input_fields), tuple(getattr(task, "list_fields", ())), tuple(getattr(task, "optional_fields", ())),
                     getattr(task, "input_problem", None))


def count_input(field: str) -> str:
    """The v2 input holding a flattened list field's per-item counts: choices -> choice_count."""
    return f"{field[:-1] if field.endswith('s') and len(field) > 1 else field}_count"


def _shape_of(fields: tuple[str, ...], spec: InputSpec | None = None) -> str:
    if spec is None or spec.plain:
        return V1_SHAPE if fields == ("text",) else '{"instances": [{' + ", ".join(f'"{f}": "..."' for f in fields) + "}, ...]}"
    parts = [f'"{f}": ["...", "..."]' if f in spec.list_fields else f'"{f}": "..."' for f in fields]
    parts = [p + (" (optional)" if f in spec.optional_fields else "") for f, p in zip(fields, parts)]
    return '{"instances": [{' + ", ".join(parts) + "}, ...]}"


def texts_from_v1(payload: Any, fields: Any = ("text",)) -> list:
    """The inputs of a v1 request: strings, or for a several-field task tuples in field order.
    `fields`: the task (kubetune.tasks), an InputSpec, or a tuple of text fields."""
    spec = input_spec(fields)
    if not spec.plain:
        return _items_from_v1(payload, spec)
    texts = _records_from_v1(payload, spec.fields) if spec.fields != ("text",) else _texts_from_v1(payload)
    return [_checked_item(f"instances[{i}]", t, spec) for i, t in enumerate(texts)] if spec.problem is not None else texts


def _texts_from_v1(payload: Any) -> list[str]:
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


def _items_from_v1(payload: Any, spec: InputSpec) -> list[tuple]:
    """v1 items of a task with list or optional fields: each object's fields checked, then the task's input_problem."""
    fields, shape = spec.fields, _shape_of(spec.fields, spec)
    required = [f for f in fields if f not in spec.optional_fields]
    out = []
    for i, item in enumerate(_instances(payload, shape)):
        if not isinstance(item, dict) or not set(required) <= set(item) <= set(fields):
            got = f"fields {sorted(item)}" if isinstance(item, dict) else f"a JSON {_type(item)}"
            optional = [f for f in fields if f in spec.optional_fields]
            raise bad(f"instances[{i}]: expected an object with the fields {', '.join(required)}"
                      + (f" and optionally {', '.join(optional)}" if optional else "") + f", got {got}; send {shape}", "bad_item")
        values = []
        for f in fields:
            where, value = f"instances[{i}].{f}", item.get(f)
            if f in spec.optional_fields and (value is None or (isinstance(value, str) and not value.strip())):
                values.append(None)  # absent, null or blank: no such field
            elif f in spec.list_fields:
                if not isinstance(value, list):
                    raise bad(f"{where}: expected a list of strings, got a JSON {_type(value)}", "bad_item")
                for k, text in enumerate(value):
                    if not isinstance(text, str):
                        raise bad(f"{where}[{k}]: expected a string, got a JSON {_type(text)}", "bad_item")
                    check_text(f"{where}[{k}]", text)
                values.append(tuple(value))
            elif not isinstance(value, str):
                raise bad(f"{where}: expected a string, got a JSON {_type(value)}", "bad_item")
            else:
                values.append(check_text(where, value))
        out.append(_checked_item(f"instances[{i}]", tuple(values), spec))
    return out


def _checked_item(where: str, item, spec: InputSpec):
    if problem := spec.problem_of(item):
        raise bad(f"{where}: {problem}", "bad_item")
    return item


def texts_from_v2(inputs: list, fields: Any = ("text",)) -> list:
    """The texts of a v2 request: `inputs` are objects with name, datatype, shape and `data` (JSON,
    or the items KServe decoded from the binary-data extension, which check_binary_request checked).
    For a several-field task one input per field, by name; the result is then tuples in field order.
    `fields`: the task (kubetune.tasks), an InputSpec, or a tuple of text fields."""
    spec = input_spec(fields)
    if not spec.plain:
        return _items_from_v2(inputs, spec)
    texts = _plain_from_v2(inputs, spec.fields)
    return [_checked_item(f"item {i}", t, spec) for i, t in enumerate(texts)] if spec.problem is not None else texts


def _plain_from_v2(inputs: list, fields: tuple[str, ...]) -> list:
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


def _expected_v2(spec: InputSpec) -> str:
    def one(f: str) -> str:
        if f in spec.list_fields:
            return f"{f} (BYTES [N, C], or [M] with {count_input(f)} INT32/INT64 [N])"
        return f"{f} (BYTES [N]{', optional' if f in spec.optional_fields else ''})"

    return ", ".join(one(f) for f in spec.fields)


def _items_from_v2(inputs: list, spec: InputSpec) -> list[tuple]:
    """v2 items of a task with list or optional fields (see the module docstring)."""
    counts = {count_input(f): f for f in spec.list_fields}
    names = [i.name for i in inputs]
    allowed = set(spec.fields) | set(counts)
    required = [f for f in spec.fields if f not in spec.optional_fields]
    if len(set(names)) != len(names) or not set(required) <= set(names) <= allowed:
        raise bad(f"expected the inputs {_expected_v2(spec)}, got {names}")
    by_name = {i.name: i for i in inputs}
    columns: dict[str, list] = {}
    for f in spec.fields:
        if f not in by_name:
            continue
        if f in spec.list_fields:
            columns[f] = _lists_of(by_name[f], by_name.get(count_input(f)))
        else:
            columns[f] = _texts_of(by_name[f])
    for name, f in counts.items():
        if name in by_name and f not in by_name:
            raise bad(f"input {name!r} counts the texts of input {f!r}, which the request does not hold")
    sizes = {f: len(c) for f, c in columns.items()}
    if len(set(sizes.values())) != 1:
        raise bad("inputs " + ", ".join(f"{f!r} holds {n}" for f, n in sizes.items()) + ": they must be the same length")
    n = next(iter(sizes.values()))
    where = f"input {spec.list_fields[0]!r}" if spec.list_fields else "inputs"
    out = []
    for i in range(n):
        item = tuple(None if f not in columns else _blank_to_none(columns[f][i]) if f in spec.optional_fields else columns[f][i]
                     for f in spec.fields)
        out.append(_checked_item(f"{where}, item {i}", item, spec))
    return out


def _blank_to_none(value):
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _dims(inp) -> list[int]:
    shape = list(inp.shape or [])
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"input {inp.name!r}: shape must be a list of non-negative integers, got {shape}")
    return shape


def _decoded(name: str, where: str, item) -> str:
    if isinstance(item, (bytes, bytearray)):
        try:
            item = bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"input {name!r}, {where}: not valid UTF-8", "bad_item") from None
    if not isinstance(item, str):
        raise bad(f"input {name!r}, {where}: expected a string, got a JSON {_type(item)}", "bad_item")
    return check_text(f"input {name!r}, {where}", item)


def _lists_of(inp, count) -> list[tuple[str, ...]]:
    """A list field's items: [N, C] row-major (or nested rows), or [M] cut by the counts input [N]."""
    if inp.datatype != "BYTES":
        raise bad(f"input {inp.name!r}: datatype must be BYTES (the texts), got {inp.datatype}")
    shape, data = _dims(inp), inp.data
    if len(shape) == 2 and count is None:
        rows, width = shape
        if isinstance(data, list) and data and all(isinstance(r, list) for r in data):  # nested [[a, b], [c, d]]
            if len(data) != rows or any(len(r) != width for r in data):
                raise bad(f"input {inp.name!r}: shape {shape} says {rows} rows of {width}, data holds rows of "
                          f"{sorted({len(r) for r in data})} in {len(data)} rows")
            data = [x for r in data for x in r]
        if not isinstance(data, list) or len(data) != rows * width:
            size = len(data) if isinstance(data, list) else _type(data)
            raise bad(f"input {inp.name!r}: shape {shape} says {rows * width} texts ({rows} items of {width}), data holds {size}")
        sizes = [width] * rows
    elif len(shape) == 1 and count is not None:
        if not isinstance(data, list) or len(data) != shape[0]:
            size = len(data) if isinstance(data, list) else _type(data)
            raise bad(f"input {inp.name!r}: shape {shape} says {shape[0]} texts, data holds {size}")
        sizes = _counts_of(count, inp.name, shape[0])
    elif len(shape) == 1:
        raise bad(f"input {inp.name!r}: shape {shape} is flattened: give each item's count in an INT32/INT64 input "
                  f"{count_input(inp.name)!r} of shape [N], or send shape [N, C]")
    elif len(shape) == 2:
        raise bad(f"input {inp.name!r}: shape {shape} is [N, C], which needs no {count.name!r} input; "
                  f"send the texts flattened (shape [M]) with it, or leave it out")
    else:
        raise bad(f"input {inp.name!r}: shape must be [N, C], or [M] with an input {count_input(inp.name)!r} of shape [N]; got {shape}")
    out, pos = [], 0
    for i, size in enumerate(sizes):
        out.append(tuple(_decoded(inp.name, f"item {i}, text {k}", data[pos + k]) for k in range(size)))
        pos += size
    return out


def _counts_of(inp, field: str, total: int) -> list[int]:
    if inp.datatype not in ("INT32", "INT64"):
        raise bad(f"input {inp.name!r}: datatype must be INT32 or INT64 (texts per item of {field!r}), got {inp.datatype}")
    shape, data = _dims(inp), inp.data
    if len(shape) != 1:
        raise bad(f"input {inp.name!r}: shape must be [N], got {shape}")
    if not isinstance(data, list) or len(data) != shape[0]:
        size = len(data) if isinstance(data, list) else _type(data)
        raise bad(f"input {inp.name!r}: shape {shape} says {shape[0]} counts, data holds {size}")
    for i, c in enumerate(data):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise bad(f"input {inp.name!r}, item {i}: expected a count (an integer >= 0), got {c!r}", "bad_item")
    if sum(data) != total:
        raise bad(f"input {inp.name!r}: the counts sum to {sum(data)}, input {field!r} holds {total} texts")
    return list(data)


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
    return [_decoded(inp.name, f"item {i}", item) for i, item in enumerate(data)]


def check_binary_request(body: bytes, header_length: int) -> None:
    """A v2 request in the binary-data extension (a JSON header of `header_length` bytes, then each
    input's bytes), checked before KServe decodes it: KServe unpacks BYTES items with struct and a
    bad length prefix would surface as a 500. Sizes must fit the body, BYTES items and numbers their shape."""
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
            for i, item in enumerate(split_bytes(body[pos:pos + size], _elements(name, shape), str(name))):
                try:  # KServe decodes the items as UTF-8 itself and answers 500 when it cannot
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad(f"input {name!r}, item {i}: not valid UTF-8", "bad_item") from None
        elif (width := FIXED_WIDTH.get(inp.get("datatype"))) is not None:
            # numbers (a list field's counts): KServe reads them with numpy, which fails (a 500) on a buffer of another size
            if size != (need := _elements(name, shape) * width):
                raise bad(f"input {name!r}: shape {shape} of {inp.get('datatype')} takes {need} bytes, "
                          f"binary_data_size is {size}", "bad_binary")
        pos += size


def _elements(name, shape) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    count = 1
    for d in shape:
        count *= d
    return count


FIXED_WIDTH = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "INT32": 4, "UINT32": 4, "FP32": 4,
               "INT64": 8, "UINT64": 8, "FP64": 8}  # bytes per element of the fixed-size datatypes


def _texts_in(item):
    """The texts of one input: a text, or the texts of a tuple (nested for a list field; None for an absent field)."""
    if isinstance(item, str):
        yield item
    elif item is not None:
        for t in item:
            yield from _texts_in(t)


def _longest(item) -> int:
    return len(item) if isinstance(item, str) else max((len(t) for t in _texts_in(item)), default=0)


def _cut_each(item, limit: int):
    if item is None or isinstance(item, str):
        return item if item is None else item[:limit]
    return tuple(_cut_each(t, limit) for t in item)


def _cut(item, limit: int, keep: str = "head"):
    return cut_text(item, limit, keep) if isinstance(item, str) else _cut_each(item, limit)


def apply_limits(texts: list, limits: TextLimits) -> tuple[list, int]:
    """(texts, how many were truncated). Empty requests and too many texts are rejected; texts longer
    than max_text_chars are cut there or rejected, as configured (each text of a pair, each choice,
    on its own). A multiple-choice question counts as one text."""
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
