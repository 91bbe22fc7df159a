"""The one reader of kubetune's file formats: CSV, TSV, JSONL, Parquet and CoNLL, from a local file
or folder, an s3:// object or prefix. Used by every task's validation (strict) and by batch
inference (lenient).

    python -c "from kubetune.storage.formats import read_records; print(next(read_records('data.csv', 'data.csv', 'csv')))"

Formats (by file name):
  .csv               comma-separated, header row, RFC 4180 quoting (quoted fields may span lines and
                     be of any size)
  .tsv / .tab        tab-separated, header row, no quoting (the IANA TSV convention)
  .jsonl / .ndjson   one JSON object per line; blank lines are skipped
  .parquet / .pq     columns by name, read in record batches
  .conll .txt .iob .iob2 .bio .conllu   CoNLL columns, one token per line (token classification)
`header=False` reads CSV/TSV without a header row; columns are then named "0", "1", ...

A split may be one file or a folder / s3:// prefix of files of one format (`part-00000.parquet`,
...): `split_files` lists them (hidden and `_` files left out) and they are read in name order as
one table, rows numbered per file.

Policies: `strict=True` (training data) raises an InputError that names the file, the line (text
formats) or row (Parquet), the field and the fix at the first unreadable row; `strict=False`
(batch inference) yields such a row as a Record with a `problem` instead, so each row gets its own
outcome. Bytes that are not UTF-8 are kept as surrogate escapes: `text_problem` finds them.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kubetune.errors import InputError
from kubetune.storage.store import S3Settings, fetch, is_s3, listing, local_path

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
           ".conll": "conll", ".conllu": "conll", ".txt": "conll", ".iob": "conll", ".iob2": "conll", ".bio": "conll"}
TABLES = ("csv", "tsv", "jsonl", "parquet")  # formats with named columns
DOCSTART = "-DOCSTART-"
PARQUET_BATCH = 10_000
SPLIT_ROW_GROUP = 50_000  # rows per Parquet row group of a validated split: readers stream it a group at a time


@dataclass(frozen=True)
class Record:
    row: int  # the line (text formats) or row (Parquet) to quote in messages, 1-based, per file
    fields: dict = field(default_factory=dict)  # column/field -> value ({} when the row is unreadable)
    problem: str = ""  # lenient mode: why the row could not be read


def format_of(name: str, allowed: tuple[str, ...] = TABLES) -> str | None:
    low = name.lower()
    return next((fmt for ext, fmt in FORMATS.items() if low.endswith(ext) and fmt in allowed), None)


def extensions(allowed: tuple[str, ...]) -> str:
    return ", ".join(ext for ext, fmt in FORMATS.items() if fmt in allowed)


def unit(fmt: str) -> str:
    """What a Record's `row` counts in messages."""
    return "row" if fmt == "parquet" else "line"


def split_files(uri: str, settings: S3Settings | None, allowed: tuple[str, ...] = TABLES) -> tuple[list[str], str]:
    """(file URIs, format) of a split: one file, or every file of one format under a folder or
    prefix. An unknown name, an empty folder or a mix of formats is an InputError."""
    files = listing(uri, settings, hidden=False)
    if not files:
        suffix = Path(uri.rstrip("/")).suffix
        if suffix and not format_of(uri, allowed):
            raise InputError(f"{uri}: unknown file type; name it {extensions(allowed)} (or give a folder or prefix of such files)")
        raise InputError(f"{uri}: no such file, folder or prefix")
    if files == [uri] or (not is_s3(uri) and local_path(uri).is_file()):  # one file
        fmt = format_of(files[0], allowed)
        if fmt is None:
            raise InputError(f"{uri}: unknown file type; name it {extensions(allowed)}")
        return files, fmt
    found = {f: format_of(f, allowed) for f in files}
    kinds = {fmt for fmt in found.values() if fmt}
    if not kinds:
        raise InputError(f"{uri}: holds no data files (names must end in {extensions(allowed)}); found e.g. {files[0]}")
    if len(kinds) > 1:
        raise InputError(f"{uri}: holds files of several formats ({', '.join(sorted(kinds))}); one split is files of one format")
    return [f for f, fmt in found.items() if fmt], kinds.pop()


def local_files(uris: list[str], settings: S3Settings | None, workdir: Path) -> list[tuple[str, Path]]:
    """(uri, local path) for each file, s3:// objects downloaded under `workdir`."""
    return [(u, fetch(u, settings, workdir)) for u in uris]


# ---- decoding ------------------------------------------------------------------------------------


def _text_stream(path: Path) -> io.TextIOWrapper:
    # surrogateescape: a byte that is not UTF-8 survives as a lone surrogate, reported per row;
    # utf-8-sig drops a byte-order mark
    return io.TextIOWrapper(open(path, "rb"), encoding="utf-8-sig", errors="surrogateescape", newline="")


def bad_byte(value: str) -> tuple[int, int] | None:
    """(position, byte) of the first byte that did not decode as UTF-8 (kept as a surrogate escape)."""
    i = next((i for i, ch in enumerate(value) if "\udc80" <= ch <= "\udcff"), None)
    return None if i is None else (i, ord(value[i]) - 0xDC00)


def _undecodable(uri: str, row: int, value: str) -> InputError | None:
    bad = bad_byte(value)
    if bad is None:
        return None
    return InputError(f"{uri}: line {row}: bytes are not valid UTF-8 (0x{bad[1]:02x}); re-encode the file as UTF-8, "
                      "e.g. iconv -f latin1 -t utf-8")


def text_problem(value, max_chars: int) -> tuple[str | None, str]:
    """(the text, "") when `value` is usable text for inference, else (None, why): null, not valid
    UTF-8, not text, empty, or longer than `max_chars` characters."""
    if value is None:
        return None, "null text"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"not valid UTF-8 (byte 0x{value[e.start:e.start + 1].hex()} at offset {e.start})"
    if not isinstance(value, str):
        return None, f"not text: {type(value).__name__}"
    bad = bad_byte(value)
    if bad is not None:
        return None, f"not valid UTF-8 (byte 0x{bad[1]:02x} at character {bad[0]})"
    if not value.strip():
        return None, "empty text"
    if len(value) > max_chars:
        return None, f"over-long: {len(value)} characters > max_chars {max_chars}"
    return value, ""


def head(value, n: int = 200) -> str:
    """The first `n` characters of a value for a reject record, undecodable bytes as \\xNN."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value[:n].decode("utf-8", errors="backslashreplace")
    return str(value)[:n].encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


# ---- table formats -------------------------------------------------------------------------------


def read_records(path: Path, uri: str, fmt: str, *, header: bool = True, names: list[str] | None = None,
                 columns: tuple[str, ...] = (), flags: dict[str, str] | None = None, strict: bool = True) -> Iterator[Record]:
    """The rows of one CSV/TSV/JSONL/Parquet file. `columns` must exist: else an InputError naming the
    columns there and the option that picks one (`flags`: column -> option; JSONL: checked per row,
    strict only). `uri` names the file in messages."""
    flags = flags or {}
    if fmt == "parquet":
        yield from _parquet(path, uri, columns, flags)
    elif fmt == "jsonl":
        yield from _jsonl(path, uri, columns, strict)
    elif fmt in ("csv", "tsv"):
        yield from _delimited(path, uri, "," if fmt == "csv" else "\t", header, names, columns, flags, strict)
    else:
        raise InputError(f"{uri}: {fmt} is not a table format; use {extensions(TABLES)}")


def missing_columns(uri: str, wanted: tuple[str, ...], available: list[str], flags: dict[str, str]) -> InputError | None:
    gone = [c for c in wanted if c not in available]
    if not gone:
        return None
    return InputError(f"{uri}: column {gone[0]!r} not found; columns are: {', '.join(map(str, available)) or 'none'}. "
                      f"Pick one with {flags.get(gone[0], 'the matching --...-column option')}")


def _delimited(path: Path, uri: str, sep: str, header: bool, names: list[str] | None, columns: tuple[str, ...],
               flags: dict[str, str], strict: bool) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)  # fields of any size: a long document is data, tokenize truncates it
    kind = "CSV" if sep == "," else "TSV"
    quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
    with _text_stream(path) as f:
        reader = csv.reader(f, delimiter=sep, quoting=quoting, strict=strict)
        cols, start = names, 1
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row:
                    continue  # a blank line
                if strict and (e := next((_undecodable(uri, line, v) for v in row if _undecodable(uri, line, v)), None)):
                    raise e
                if cols is None:
                    if header:
                        cols = [c.strip() for c in row]
                        if err := missing_columns(uri, columns, cols, flags):
                            raise err
                        continue
                    cols = [str(i) for i in range(len(row))]
                    if err := missing_columns(uri, columns, cols, flags):
                        raise err
                if len(row) != len(cols):
                    why = (f"expected {len(cols)} fields ({', '.join(cols)}), found {len(row)}"
                           + ("; a text containing commas or newlines must be quoted" if sep == "," else
                              "; a text containing a TAB must be escaped or the file saved as CSV/JSONL"))
                    if strict:
                        raise InputError(f"{uri}: line {line}: {why}")
                    yield Record(line, {}, f"malformed row: expected {len(cols)} fields, found {len(row)}")
                    continue
                yield Record(line, dict(zip(cols, row)))
        except csv.Error as e:
            raise InputError(f"{uri}: line {start}: malformed {kind}: {e}") from None
    if cols is None and strict:
        raise InputError(f"{uri}: file is empty (no data rows)")


def _jsonl(path: Path, uri: str, columns: tuple[str, ...], strict: bool) -> Iterator[Record]:
    with _text_stream(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if strict and (e := _undecodable(uri, n, line)):
                raise e
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if strict:
                    raise InputError(f"{uri}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield Record(n, {}, f"malformed row: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                if strict:
                    shape = ", ".join(f'"{c}": ...' for c in columns)
                    raise InputError(f"{uri}: line {n}: expected a JSON object like {{{shape}}}, got {type(obj).__name__}")
                yield Record(n, {}, f"malformed row: a JSON {type(obj).__name__}, not an object")
                continue
            if strict:
                gone = next((c for c in columns if c not in obj), None)
                if gone is not None:
                    raise InputError(f"{uri}: line {n}: field {gone!r} is missing; fields are: {', '.join(map(str, obj)) or 'none'}")
            yield Record(n, obj)


def parquet_batches(parquet, rows: int, columns: list[str] | None = None, start: int = 0, stop: int | None = None) -> Iterator:
    """A Parquet file's rows [start, stop) as Arrow tables of `rows` rows (the last may be shorter),
    read one row group at a time: memory holds a row group and the rows carried to the next batch.
    Row groups wholly before `start` are not read. (pyarrow's iter_batches holds on to memory until
    its reader is dropped: over a 1.6M-row split of 40 row groups RSS went from 229 to 300 MB with it
    and stayed at ~200 MB read this way.)"""
    import pyarrow as pa

    meta = parquet.metadata
    stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
    carry, first = [], 0  # first: the file row of the group read next
    for group in range(parquet.num_row_groups):
        n = meta.row_group(group).num_rows
        first, begin = first + n, first
        if first <= start:
            continue
        if begin >= stop:
            break
        table = parquet.read_row_group(group, columns=columns)
        carry.append(table.slice(max(start - begin, 0), min(stop, first) - max(start, begin)))
        table = pa.concat_tables(carry)
        at = 0
        while table.num_rows - at >= rows:
            yield table.slice(at, rows)
            at += rows
        carry = [table.slice(at)] if at < table.num_rows else []
        del table
    if carry and carry[0].num_rows:
        yield carry[0]


def _parquet(path: Path, uri: str, columns: tuple[str, ...], flags: dict[str, str]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise InputError(f"{uri}: not a readable Parquet file ({e})") from None
    if err := missing_columns(uri, columns, parquet.schema_arrow.names, flags):
        raise err
    n = 0
    try:
        for batch in parquet_batches(parquet, PARQUET_BATCH, list(columns) or None):
            for values in batch.to_pylist():
                n += 1
                yield Record(n, values)
    except InputError:
        raise
    except Exception as e:  # a corrupt page, a column that cannot be decoded
        raise InputError(f"{uri}: row {n + 1}: not readable Parquet ({e})") from None


# ---- CoNLL (token classification) ----------------------------------------------------------------


def read_conll(path: Path, uri: str, token_column: int = 0, tag_column: int = -1) -> Iterator[tuple[int, list[str], list[str]]]:
    """(first line, tokens, tags) per sentence of a CoNLL file: one token per line, whitespace
    columns, a blank line between sentences, `-DOCSTART-` lines skipped. Always strict."""
    need = max(token_column, tag_column) + 1 if tag_column >= 0 else max(token_column + 1, -tag_column, 2)
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    with _text_stream(path) as f:
        for n, line in enumerate(f, start=1):
            cols = line.split()
            if not cols or cols[0] == DOCSTART:  # a sentence (or document) break
                if tokens:
                    yield start, tokens, tags
                tokens, tags = [], []
                continue
            if e := _undecodable(uri, n, line):
                raise e
            if len(cols) < need:
                raise InputError(
                    f"{uri}: line {n}: expected at least {need} whitespace-separated columns (token in column {token_column}, "
                    f"tag in column {tag_column}), found {len(cols)}: {line.rstrip()!r}; fix the line or choose the columns with "
                    "--token-column/--tag-column"
                )
            if not tokens:
                start = n
            tokens.append(cols[token_column])
            tags.append(cols[tag_column])
    if tokens:
        yield start, tokens, tags
