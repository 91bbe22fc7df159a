"""Prediction inputs: the data files under a URI and their rows, read leniently. Batch inference
scores them and a drift check profiles them; a bad row is a reject with a reason, never an error
for the whole file.

    rows = read_rows(fetch(uri, settings, work), uri, "text", "", max_chars=100_000)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import InputError
from kubetune.storage import formats
from kubetune.storage.store import S3Settings, listing


@dataclass(frozen=True)
class Row:
    source_row: int  # 1-based data row in its file (the header is not a row)
    id: str
    text: str | tuple | None  # (text, text_pair) for a pair classifier; None when rejected
    reason: str = ""  # why it was rejected
    head: str = ""  # a rejected row's first 200 characters, undecodable bytes as \xNN


def list_inputs(uri: str, settings: S3Settings | None) -> list[str]:
    """The data files under `uri` (a file, a folder or an s3:// prefix), sorted; hidden and `_`
    files and unknown extensions are left out. Files of several formats may be mixed."""
    files = [f for f in listing(uri, settings, hidden=False) if formats.format_of(f)]
    if not files:
        raise InputError(f"{uri}: no CSV, TSV, JSONL or Parquet files there (names must end in {formats.extensions(formats.TABLES)})")
    return files


def read_rows(path: Path, name: str, text_column: str, id_column: str, max_chars: int, pair_column: str = "") -> list[Row]:
    """Every data row of one file, read leniently (kubetune.storage.formats): a bad row is a reject
    with a reason, never an error for the whole file; only a missing column or an unreadable
    Parquet file raise. `name` (the file's URI) makes the default ids `<name>:<row>`. With
    `pair_column` a row's text is the tuple (text, text pair), rejected when either is bad."""
    texts = (text_column, pair_column) if pair_column else (text_column,)
    columns = texts + ((id_column,) if id_column else ())
    fmt = formats.format_of(name)
    rows = []
    flags = {text_column: "--text-column", id_column: "--id-column", pair_column: "--text-pair-column"}
    for n, rec in enumerate(formats.read_records(path, name, fmt, columns=columns, flags=flags, strict=False), start=1):
        rid = rec.fields.get(id_column) if id_column else None
        rid = f"{name}:{n}" if rid is None or rid == "" else str(rid)
        values, problem, value = [], rec.problem, None
        for column in texts if not problem else ():
            value = rec.fields.get(column)
            text, problem = formats.text_problem(value, max_chars)
            if problem:
                problem = f"{column}: {problem}" if pair_column else problem
                break
            values.append(text)
        text = None if problem else (tuple(values) if pair_column else values[0])
        rows.append(Row(n, rid, text, problem, formats.head(value) if problem else ""))
    return rows
