"""Input files for batch inference: every CSV, TSV, JSONL or Parquet file under a prefix (local or
s3://), cut into row-range shards, read leniently: a bad row becomes a reject with a reason, never
an error for the whole file. Used by kubetune.steps.batch_infer:

    python -m kubetune.steps.batch_infer --input s3://data/incoming/ --output s3://data/scored/ ...

Row problems (each row gets exactly one outcome: a prediction or a reject):
  null text                 the text column/field is null or missing
  not valid UTF-8           the row's bytes do not decode (CSV/TSV/JSONL are decoded per row)
  not text                  the field holds a number, list, ...
  empty text                blank or whitespace only
  over-long                 more than `max_chars` characters (texts over the model's max_length in
                            tokens are not rejects: they are truncated and flagged `truncated`)
  malformed row             wrong field count (CSV/TSV), invalid JSON or not an object (JSONL)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from kubetune.storage.formats import FORMATS
from kubetune.errors import InputError
from kubetune.storage.store import S3Settings, S3Store, is_s3, split_s3


@dataclass(frozen=True)
class Row:
    source_row: int  # 1-based data row in its file (the header is not a row)
    id: str
    text: str | None  # None when rejected
    reason: str = ""  # why it was rejected
    head: str = ""  # a rejected row's first 200 characters, undecodable bytes as \xNN


def _head(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value[:200].decode("utf-8", errors="backslashreplace")
    return str(value)[:200].encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def format_of(name: str) -> str | None:
    return next((fmt for ext, fmt in FORMATS.items() if name.lower().endswith(ext)), None)


def list_inputs(uri: str, settings: S3Settings | None) -> list[str]:
    """The data files under `uri` (a file, a folder or an s3:// prefix), sorted; hidden files and
    unknown extensions are ignored."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        store = S3Store(f"s3://{bucket}", settings or S3Settings())
        keys = [key] if key and format_of(key) and store.exists(key) else [k for k in store.list(key) if format_of(k)]
        files = [f"s3://{bucket}/{k}" for k in keys if not any(p.startswith((".", "_")) for p in k.split("/"))]
    else:
        path = Path(uri).expanduser()
        if path.is_file():
            files = [str(path)]
        else:
            files = sorted(str(p) for p in path.rglob("*") if p.is_file() and format_of(p.name)
                           and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise InputError(f"{uri}: no CSV, TSV, JSONL or Parquet files there (names must end in {', '.join(FORMATS)})")
    return files


def _check_text(value, max_chars: int) -> tuple[str | None, str]:
    if value is None:
        return None, "null text"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"not valid UTF-8 (byte 0x{value[e.start:e.start + 1].hex()} at offset {e.start})"
    if not isinstance(value, str):
        return None, f"not text: {type(value).__name__}"
    bad = next((i for i, ch in enumerate(value) if "\udc80" <= ch <= "\udcff"), None)
    if bad is not None:  # a byte that did not decode, kept by surrogateescape
        return None, f"not valid UTF-8 (byte 0x{ord(value[bad]) - 0xDC00:02x} at character {bad})"
    if not value.strip():
        return None, "empty text"
    if len(value) > max_chars:
        return None, f"over-long: {len(value)} characters > max_chars {max_chars}"
    return value, ""


def _row(n: int, rid, text, reason: str, max_chars: int, default_id: str) -> Row:
    rid = default_id if rid is None or rid == "" else str(rid)
    checked, problem = (None, reason) if reason else _check_text(text, max_chars)
    return Row(n, rid, checked, problem, _head(text) if problem else "")


def read_rows(path: Path, name: str, text_column: str, id_column: str, max_chars: int) -> list[Row]:
    """Every data row of one file. `name` (the file's URI) makes the default ids `<name>:<row>`
    and names the file in errors. Only problems with the whole file raise (unreadable Parquet,
    a missing column): a bad row is a reject."""
    fmt = format_of(name)
    if fmt == "parquet":
        return _parquet_rows(path, name, text_column, id_column, max_chars)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")  # bad bytes -> per-row rejects
    text = text[1:] if text.startswith("\ufeff") else text
    if fmt == "jsonl":
        return _jsonl_rows(text, name, text_column, id_column, max_chars)
    return _delimited_rows(text, name, "," if fmt == "csv" else "\t", text_column, id_column, max_chars)


def _columns(name: str, available: list[str], text_column: str, id_column: str) -> None:
    for flag, col in (("--text-column", text_column), ("--id-column", id_column)):
        if col and col not in available:
            raise InputError(f"{name}: column {col!r} not found; columns are: {', '.join(available) or 'none'}. Pick one with {flag}")


def _delimited_rows(text: str, name: str, sep: str, text_column: str, id_column: str, max_chars: int) -> list[Row]:
    quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    header = next((r for r in reader if r), None)
    if header is None:
        return []
    header = [c.strip() for c in header]
    _columns(name, header, text_column, id_column)
    ti, ii = header.index(text_column), header.index(id_column) if id_column else None
    rows = []
    for record in reader:
        if not record:
            continue
        n = len(rows) + 1
        reason = "" if len(record) == len(header) else f"malformed row: expected {len(header)} fields, found {len(record)}"
        rid = record[ii] if ii is not None and ii < len(record) else None
        rows.append(_row(n, rid, None if reason else record[ti], reason, max_chars, f"{name}:{n}"))
    return rows


def _jsonl_rows(text: str, name: str, text_column: str, id_column: str, max_chars: int) -> list[Row]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        n = len(rows) + 1
        try:
            obj = json.loads(line)
            reason = "" if isinstance(obj, dict) else f"malformed row: a JSON {type(obj).__name__}, not an object"
        except json.JSONDecodeError as e:
            obj, reason = {}, f"malformed row: invalid JSON ({e.msg} at column {e.colno})"
        obj = obj if isinstance(obj, dict) else {}
        rid = obj.get(id_column) if id_column else None
        rows.append(_row(n, rid, obj.get(text_column), reason, max_chars, f"{name}:{n}"))
    return rows


def _parquet_rows(path: Path, name: str, text_column: str, id_column: str, max_chars: int) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise InputError(f"{name}: not a readable Parquet file ({e})") from None
    _columns(name, table.column_names, text_column, id_column)
    texts = table.column(text_column).to_pylist()
    ids = table.column(id_column).to_pylist() if id_column else [None] * len(texts)
    return [_row(n, rid, t, "", max_chars, f"{name}:{n}") for n, (rid, t) in enumerate(zip(ids, texts), start=1)]
