"""Reading token-tagged sentences (NER data): CoNLL-style files and JSONL, local, s3:// or builtin:.

    python -c "from kubetune.storage.tagged import read_sentences; print(read_sentences('builtin:conll2003', split='test')[0][:2])"

Formats:
  CoNLL (.txt .conll .iob .bio .tsv of tokens)  one token per line, whitespace-separated columns, the
        token in `token_column` (default 0) and its tag in `tag_column` (default -1: the last);
        a blank line ends a sentence; `-DOCSTART-` lines (document breaks) are skipped.
  JSONL (.jsonl .ndjson)  one sentence per line: {"tokens": [...], "tags": [...]} (field names configurable).

The result is a list of Sentence(tokens, tags, line): `line` is the file line where the sentence
starts, the number every error message quotes. Problems that make a file unreadable (a line with
too few columns, invalid JSON, a field that is not a list of strings) raise an InputError naming
the file, line and fix; problems of the content (tag scheme, lengths, unseen tags) are checked by
kubetune.validation.tagging, which reports all of them at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kubetune.storage import assets
from kubetune.storage.formats import _decode, jsonl_objects
from kubetune.errors import InputError
from kubetune.storage.store import S3Settings, fetch

CONLL_EXTENSIONS = (".txt", ".conll", ".conllu", ".iob", ".iob2", ".bio")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
DOCSTART = "-DOCSTART-"


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    line: int  # first line of the sentence in its file


def detect_format(uri: str) -> str:
    low = uri.lower()
    if low.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if low.endswith(CONLL_EXTENSIONS):
        return "conll"
    raise InputError(f"{uri}: unknown file type for token classification; name it .conll/.txt/.iob (CoNLL columns) or .jsonl "
                     '({"tokens": [...], "tags": [...]} per line)')


def read_conll(text: str, uri: str, token_column: int = 0, tag_column: int = -1) -> list[Sentence]:
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    need = max(token_column, tag_column) + 1 if tag_column >= 0 else max(token_column + 1, -tag_column, 2)
    for n, line in enumerate(text.splitlines(), start=1):
        cols = line.split()
        if not cols or cols[0] == DOCSTART:  # a sentence (or document) break
            if tokens:
                sentences.append(Sentence(tokens, tags, start))
            tokens, tags = [], []
            continue
        if len(cols) < need:
            raise InputError(
                f"{uri}: line {n}: expected at least {need} whitespace-separated columns (token in column {token_column}, "
                f"tag in column {tag_column}), found {len(cols)}: {line!r}; fix the line or choose the columns with "
                "--token-column/--tag-column"
            )
        if not tokens:
            start = n
        tokens.append(cols[token_column])
        tags.append(cols[tag_column])
    if tokens:
        sentences.append(Sentence(tokens, tags, start))
    return sentences


def _strings(value, uri: str, n: int, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{uri}: line {n}: field {field!r} must be a list of strings, got {json.dumps(value)[:80]}")
    return value


def read_jsonl(text: str, uri: str, tokens_field: str = "tokens", tags_field: str = "tags") -> list[Sentence]:
    return [Sentence(_strings(obj[tokens_field], uri, n, tokens_field), _strings(obj[tags_field], uri, n, tags_field), n)
            for n, obj in jsonl_objects(text, uri, (tokens_field, tags_field))]


def read_sentences(uri: str, *, split: str = "train", token_column: int = 0, tag_column: int = -1, tokens_field: str = "tokens",
                   tags_field: str = "tags", settings: S3Settings | None = None, workdir: Path | None = None) -> list[Sentence]:
    """Sentences of one file. A `builtin:` dataset with official splits gives its `split` file."""
    if assets.is_builtin(uri):
        path, asset = assets.resolve(uri, split)
        fmt, token_column, tag_column = "conll", asset.reader["token_column"], asset.reader["tag_column"]
    else:
        fmt = detect_format(uri)
        path = fetch(uri, settings, workdir or Path("."))
        if path.is_dir():
            raise InputError(f"{uri}: is a folder; give one {fmt.upper()} file")
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(f"{uri}: file is empty (no sentences)")
    text = _decode(raw, uri)
    if fmt == "jsonl":
        return read_jsonl(text, uri, tokens_field, tags_field)
    return read_conll(text, uri, token_column, tag_column)
