"""Prediction inputs: the data files under a URI and their rows, read leniently. Batch inference
scores them and a drift check profiles them; a bad row is a reject with a reason, never an error
for the whole file.

    rows = read_rows(fetch(uri, settings, work), uri, "text", "", max_chars=100_000)
    rows = read_rows(path, uri, "text", "", 100_000, task=clf.task, choices_column="choices")   # multiple choice

A task whose inputs hold a list of texts (kubetune.tasks: list_fields; multiple choice) gets items
(question, choices, context): the question from the text column (`question` when the column is left
at its default `text` and the file has no `text` column), the choices from a list column (JSON list
text in a CSV cell) or choice_0 .. choice_N columns (kubetune.tasks.choice.choices_of), the context
from the context column when one is given (blank: none). A row whose item the task cannot score
(input_problem: too few or too many choices, an empty one) is a reject with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kubetune.errors import InputError
from kubetune.storage import formats
from kubetune.storage.store import S3Settings, listing

CHOICES_DEFAULT = "choices"  # the choices column's default (--choices-column)
QUESTION_DEFAULT = ("text", "question")  # (the text column's default, what a list-field task reads then when the file has no `text`)


@dataclass(frozen=True)
class Row:
    source_row: int  # 1-based data row in its file (the header is not a row)
    id: str
    text: str | tuple | None  # (text, text_pair) for a pair classifier; (question, choices, context) for multiple choice; None when rejected
    reason: str = ""  # why it was rejected
    head: str = ""  # a rejected row's first 200 characters, undecodable bytes as \xNN


def list_inputs(uri: str, settings: S3Settings | None) -> list[str]:
    """The data files under `uri` (a file, a folder or an s3:// prefix), sorted; hidden and `_`
    files and unknown extensions are left out. Files of several formats may be mixed."""
    files = [f for f in listing(uri, settings, hidden=False) if formats.format_of(f)]
    if not files:
        raise InputError(f"{uri}: no CSV, TSV, JSONL or Parquet files there (names must end in {formats.extensions(formats.TABLES)})")
    return files


def columns_problem(task, pair_column: str, choices_column: str = CHOICES_DEFAULT, context_column: str = "") -> str:
    """What to change when these column options do not fit `task`'s inputs (kubetune.tasks:
    input_fields, list_fields, optional_fields), or "": a second text column iff the task reads two
    plain texts; a choices or context column only for a task with list or optional fields."""
    lists, optional = tuple(getattr(task, "list_fields", ())), tuple(getattr(task, "optional_fields", ()))
    plain = [f for f in task.input_fields if f not in lists and f not in optional]
    if len(plain) > 1 and not pair_column:
        return "give the second text's column with --text-pair-column"
    if len(plain) == 1 and pair_column:
        return "drop --text-pair-column"
    if not lists and choices_column != CHOICES_DEFAULT:
        return "drop --choices-column"
    if not optional and context_column:
        return "drop --context-column"
    return ""


def read_rows(path: Path, name: str, text_column: str, id_column: str, max_chars: int, pair_column: str = "", *,
              task=None, choices_column: str = CHOICES_DEFAULT, context_column: str = "") -> list[Row]:
    """Every data row of one file as a list (iter_rows: one at a time)."""
    return list(iter_rows(path, name, text_column, id_column, max_chars, pair_column, task=task, choices_column=choices_column,
                          context_column=context_column))


def iter_rows(path: Path, name: str, text_column: str, id_column: str, max_chars: int, pair_column: str = "", *,
              task=None, choices_column: str = CHOICES_DEFAULT, context_column: str = "") -> Iterator[Row]:
    """Every data row of one file, in order, read leniently (kubetune.storage.formats): a bad row is a reject
    with a reason, never an error for the whole file; only a missing column or an unreadable
    Parquet file raise. `name` (the file's URI) makes the default ids `<name>:<row>`. With
    `pair_column` a row's text is the tuple (text, text pair), rejected when either is bad. With a
    `task` whose inputs have list fields, a row's text is its item (see the module docstring)."""
    if task is not None and getattr(task, "list_fields", ()):
        yield from _list_rows(path, name, text_column, id_column, max_chars, task, choices_column, context_column)
        return
    texts = (text_column, pair_column) if pair_column else (text_column,)
    columns = texts + ((id_column,) if id_column else ())
    fmt = formats.format_of(name)
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
        yield Row(n, rid, text, problem, formats.head(value) if problem else "")


def _list_rows(path: Path, name: str, text_column: str, id_column: str, max_chars: int, task, choices_column: str,
               context_column: str) -> Iterator[Row]:
    """iter_rows for a task with list fields: (question, choices, context) items (the module docstring)."""
    from kubetune.tasks.choice import choices_of

    fmt = formats.format_of(name)
    flags = {text_column: "--text-column", id_column: "--id-column", context_column: "--context-column"}
    question_column = ""  # picked at the first readable row: the text column, or `question` in its place
    # every column is read: the choices may be choice_0 .. choice_N
    for n, rec in enumerate(formats.read_records(path, name, fmt, flags=flags, strict=False), start=1):
        if not question_column and rec.fields:
            question_column = text_column
            if text_column == QUESTION_DEFAULT[0] and text_column not in rec.fields and QUESTION_DEFAULT[1] in rec.fields:
                question_column = QUESTION_DEFAULT[1]
            if fmt != "jsonl":  # a header: every row has these columns, and a missing one is an error for the file
                _check_columns(name, list(rec.fields), (question_column, id_column, context_column), choices_column, flags, choices_of)
        rid = rec.fields.get(id_column) if id_column else None
        rid = f"{name}:{n}" if rid is None or rid == "" else str(rid)
        if rec.problem:
            yield Row(n, rid, None, rec.problem)
            continue
        item, problem, shown = _list_item(rec.fields, question_column, choices_column, context_column, max_chars, task, choices_of)
        yield Row(n, rid, item, problem, formats.head(shown) if problem else "")


def _check_columns(name: str, columns: list, wanted: tuple[str, ...], choices_column: str, flags: dict, choices_of) -> None:
    if err := formats.missing_columns(name, tuple(c for c in wanted if c), columns, {**flags, wanted[0]: "--text-column"}):
        raise err
    if choices_column not in columns:
        try:  # no list column: choice_0 .. choice_N columns, or an error naming the columns there
            choices_of(dict.fromkeys(columns), choices_column)
        except ValueError as e:
            raise InputError(f"{name}: {e}") from None


def _list_item(fields: dict, question_column: str, choices_column: str, context_column: str, max_chars: int, task, choices_of):
    """(item, "", None), or (None, why, the value to show in text_head) for a rejected row."""
    value = fields.get(question_column)
    question, problem = formats.text_problem(value, max_chars)
    if problem:
        return None, f"{question_column}: {problem}", value
    try:
        choices = choices_of(fields, choices_column)
    except ValueError as e:
        return None, str(e), fields.get(choices_column, question)
    context = fields.get(context_column) if context_column else None
    if isinstance(context, str) and not context.strip():
        context = None  # a blank cell: no passage
    if problem := task.input_problem(_item(task, question, tuple(choices), context)):
        return None, problem, _show(choices)
    texts = []
    for k, choice in enumerate(choices):
        text, problem = formats.text_problem(choice, max_chars)
        if problem:
            return None, f"choice {k}: {problem}", choice
        texts.append(text)
    if context is not None:
        context, problem = formats.text_problem(context, max_chars)
        if problem:
            return None, f"{context_column}: {problem}", fields.get(context_column)
    return _item(task, question, tuple(texts), context), "", None


def _item(task, text: str, texts: tuple, optional):
    """A prediction input in the task's field order: the plain field the text, the list field the
    texts, the optional field `optional` (None: absent)."""
    lists, optional_fields = task.list_fields, getattr(task, "optional_fields", ())
    return tuple(texts if f in lists else optional if f in optional_fields else text for f in task.input_fields)


def _show(choices: list) -> str:
    """A row's choices for a reject record's text_head."""
    return " | ".join("" if c is None else str(c) for c in choices)
