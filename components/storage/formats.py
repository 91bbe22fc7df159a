"""Reading labelled text tables: CSV, TSV, JSONL or Parquet, from a local path, s3:// or builtin:.

Every problem becomes an InputError that names the file, the line (text formats) or row (Parquet),
the field and the fix. The result is a DataFrame with columns `text`, `label` (strings or None) and
`source_row` (the line/row number to quote in messages).

Formats:
  .csv               comma-separated, header row, RFC 4180 quoting (quoted fields may span lines)
  .tsv / .tab        tab-separated, header row, no quoting (the IANA TSV convention)
  .jsonl / .ndjson   one JSON object per line; blank lines are skipped
  .parquet / .pq     columns by name
`header=False` reads CSV/TSV without a header row; columns are then named "0", "1", ...
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pandas as pd

from kubetune.storage import assets
from kubetune.errors import InputError
from kubetune.storage.store import S3Settings, fetch

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(uri: str) -> str:
    for ext, fmt in FORMATS.items():
        if uri.lower().endswith(ext):
            return fmt
    raise InputError(f"{uri}: unknown file type; name it .csv, .tsv, .jsonl or .parquet")


def unit(fmt: str) -> str:
    """What a `source_row` counts in messages."""
    return "row" if fmt == "parquet" else "line"


def load_table(
    uri: str,
    *,
    text_column: str,
    label_column: str,
    header: bool = True,
    settings: S3Settings | None = None,
    workdir: Path,
) -> tuple[pd.DataFrame, str]:
    """Load `uri` into (frame, format). Raises InputError for anything a user must fix."""
    names = None
    if assets.is_builtin(uri):
        path, asset = assets.resolve(uri)
        fmt, header, names = asset.reader["format"], asset.reader["header"], asset.reader["names"]
    else:
        fmt = detect_format(uri)
        path = fetch(uri, settings, workdir)
        if path.is_dir():
            raise InputError(f"{uri}: is a folder; give one {fmt.upper()} file")
    if fmt == "parquet":
        rows = _read_parquet(path, uri)
    else:
        raw = path.read_bytes()
        if not raw.strip():
            raise InputError(f"{uri}: file is empty (no data rows)")
        text = _decode(raw, uri)
        if fmt == "jsonl":
            rows = _read_jsonl(text, uri, (text_column, label_column))
        else:
            rows = _read_delimited(text, uri, "," if fmt == "csv" else "\t", header, names)
    frame = _select(rows, uri, fmt, text_column, label_column)
    if frame.empty:
        raise InputError(f"{uri}: file is empty (a header but no data rows)")
    return frame, fmt


def _decode(raw: bytes, uri: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start:e.start + 1].hex()
        raise InputError(
            f"{uri}: line {line}: bytes are not valid UTF-8 (0x{bad} at byte offset {e.start}); "
            "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text  # drop a byte-order mark


def _read_delimited(text: str, uri: str, sep: str, header: bool, names: list[str] | None) -> dict:
    quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting, strict=True)
    lines: list[int] = []
    records: list[list[str]] = []
    columns: list[str] | None = names
    start = 1
    try:
        for row in reader:
            if not row:  # a blank line
                start = reader.line_num + 1
                continue
            if columns is None:
                if header:
                    columns = [c.strip() for c in row]
                    start = reader.line_num + 1
                    continue
                columns = [str(i) for i in range(len(row))]
            if len(row) != len(columns):
                raise InputError(
                    f"{uri}: line {start}: expected {len(columns)} fields ({', '.join(columns)}), found {len(row)}"
                    + ("; a text containing commas or newlines must be quoted" if sep == "," else
                       "; a text containing a TAB must be escaped or the file saved as CSV/JSONL")
                )
            records.append(row)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{uri}: line {start}: malformed {'CSV' if sep == ',' else 'TSV'}: {e}") from None
    if columns is None:
        raise InputError(f"{uri}: file is empty (no data rows)")
    data = {c: [r[i] for r in records] for i, c in enumerate(columns)}
    data["__row__"] = lines
    return data


def jsonl_objects(text: str, uri: str, fields: tuple[str, str]):
    """(line number, object) for each non-blank line of a JSONL text that holds both `fields`."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{uri}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{uri}: line {n}: expected a JSON object like {{\"{fields[0]}\": ..., \"{fields[1]}\": ...}}, got {type(obj).__name__}")
        for f in fields:
            if f not in obj:
                raise InputError(f"{uri}: line {n}: field {f!r} is missing; fields are: {', '.join(map(str, obj)) or 'none'}")
        yield n, obj


def _read_jsonl(text: str, uri: str, fields: tuple[str, str]) -> dict:
    data: dict[str, list] = {f: [] for f in fields}
    data["__row__"] = []
    for n, obj in jsonl_objects(text, uri, fields):
        for f in fields:
            data[f].append(obj[f])
        data["__row__"].append(n)
    return data


def _read_parquet(path: Path, uri: str) -> dict:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise InputError(f"{uri}: not a readable Parquet file ({e})") from None
    data = table.to_pydict()
    data["__row__"] = list(range(1, table.num_rows + 1))
    return data


def _label_str(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 -> "1": integer labels that went through a float column
    s = str(value).strip()
    return s or None


def _select(data: dict, uri: str, fmt: str, text_column: str, label_column: str) -> pd.DataFrame:
    available = [c for c in data if c != "__row__"]
    for flag, col in (("--text-column", text_column), ("--label-column", label_column)):
        if col not in data:
            raise InputError(
                f"{uri}: column {col!r} not found; columns are: {', '.join(available) or 'none'}. "
                f"Pick one with {flag}"
            )
    texts = data[text_column]
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise InputError(
            f"{uri}: {unit(fmt)} {data['__row__'][bad]}: column {text_column!r} must hold text, "
            f"got {type(texts[bad]).__name__} {texts[bad]!r}"
        )
    frame = pd.DataFrame(
        {
            "text": pd.Series(texts, dtype=object),
            "label": pd.Series([_label_str(v) for v in data[label_column]], dtype=object),
            "source_row": pd.Series(data["__row__"], dtype="int64"),
        }
    )
    return frame
