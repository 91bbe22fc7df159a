"""Checks of labelled text tables (sequence classification, and any task whose rows are texts
with a label): great-expectations on each split, class counts, conflicting labels and leakage; and
the reader that streams such a table from any format, folder or prefix (kubetune.storage.formats).

    python -c "from kubetune.validation.tables import load_table as t; print(t('builtin:sms-spam', columns={'text': 'text'})[0])"

Memory stays flat in the data size: a split is read in record batches of BATCH_ROWS rows (`TableSource`),
as often as needed (the files stay on local disk), and what the checks and the splits need of the whole
split is kept per row in a few bytes (`SplitIndex`: an 8-byte hash of the text, a label code, the row
number), not the rows themselves.

Checks, per split (critical ones stop the run with exit code 2, warnings go to the report):
  critical  text not null, not empty/whitespace, length within [min, max] characters   (GE, per batch)
  critical  label not null                                                             (GE, per batch)
  critical  eval/test labels are a subset of the train labels                          (exact, label codes)
  critical  train has >= 2 classes, and each class has >= min_examples_per_class rows   (exact counts)
  warning   duplicate texts, identical texts with different labels, class imbalance,
            eval/test texts that also occur in train (leakage)                          (by text hash)
great-expectations runs the row-level expectations on every batch (every row checked, counts summed,
the first examples kept); the whole-column rules (uniqueness, the number of distinct labels) and the
cross-split ones (labels known to train, overlap with train) need whole columns at once, so kubetune
checks them exactly over the splits' hashes and label codes.

Fan-out (large inputs, kubetune.steps.validate): a split's files are read by parallel tasks, each a
`check_pass` over its files that also keeps its rows as Parquet (`RecordingSource`); `merge_passes`
joins the passes in file order (counts summed, row numbers carried on, label codes in first-seen
order) and `PartsSource` reads the rows back, so the whole-split and cross-split checks, the splits and
the report are those of one pass over the split.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from kubetune.errors import InputError, KubetuneError
from kubetune.storage import assets, formats
from kubetune.storage.store import S3Settings
from kubetune.validation.report import EXAMPLES, Check, Report

BATCH_ROWS = 100_000  # rows per record batch: what validate holds of a split at a time

# ---------------------------------------------------------------------------------------------
# reading


def label_str(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 -> "1": integer labels that went through a float column
    s = str(value).strip()
    return s or None


@dataclass
class TableSource:
    """One split's table (a file, folder or prefix, or builtin:), read in record batches. `columns`
    maps each frame column (role) to the user's column name, e.g. {"text": "review", "label": "stars"};
    every role but `label` must hold text. `source_row` numbers rows across files: file k's rows are
    offset by located[k][1] (its line numbers stay readable in messages, see Report.where)."""

    uri: str
    fmt: str
    files: list  # [(file URI, local path)]
    columns: dict
    header: bool = True
    names: list | None = None
    label: str = "label"
    located: list = field(default_factory=list)  # [(file URI, row offset)], known once read
    end: int = 0  # the row offset after the last file, known once read (the next part's source_row start)

    def batches(self, rows: int | None = None) -> Iterator[pd.DataFrame]:
        """The table, `rows` rows (default BATCH_ROWS) at a time, each a frame of the roles and source_row."""
        rows = rows or BATCH_ROWS
        wanted = tuple(self.columns.values())
        flags = {col: f"--{role.replace('_', '-')}-column" for role, col in self.columns.items()}
        data, located, offset, seen = self._empty(), [], 0, 0
        for file_uri, path in self.files:
            located.append((file_uri, offset))
            last = 0
            for rec in formats.read_records(path, file_uri, self.fmt, header=self.header, names=self.names, columns=wanted,
                                            flags=flags, strict=True):
                for role, col in self.columns.items():
                    value = rec.fields[col]
                    if role != self.label and value is not None and not isinstance(value, str):
                        raise InputError(f"{file_uri}: {formats.unit(self.fmt)} {rec.row}: column {col!r} must hold text, "
                                         f"got {type(value).__name__} {value!r}")
                    data[role].append(label_str(value) if role == self.label else value)
                data["source_row"].append(offset + rec.row)
                last = rec.row
                if len(data["source_row"]) == rows:
                    seen += rows
                    yield self._frame(data)
                    data = self._empty()
            offset += last
        self.located, self.end = located, offset
        if data["source_row"] or not seen:
            if not seen and not data["source_row"]:
                raise InputError(f"{self.uri}: file is empty (a header but no data rows)" if len(self.files) == 1
                                 else f"{self.uri}: the files hold no data rows")
            yield self._frame(data)

    def _empty(self) -> dict:
        return {**{role: [] for role in self.columns}, "source_row": []}

    def _frame(self, data: dict) -> pd.DataFrame:
        frame = pd.DataFrame({role: pd.Series(v, dtype=object) for role, v in data.items() if role != "source_row"})
        frame["source_row"] = pd.Series(data["source_row"], dtype="int64")
        return frame


@dataclass
class FrameSource:
    """A table already in memory (multiple choice's lists of choices), in the same batches."""

    frame: pd.DataFrame
    located: list = field(default_factory=list)

    def batches(self, rows: int | None = None) -> Iterator[pd.DataFrame]:
        rows = rows or BATCH_ROWS
        for start in range(0, len(self.frame), rows):
            yield self.frame.iloc[start:start + rows]


@dataclass
class MappedSource:
    """Another source's batches through `fn` (a task's view of its rows, e.g. the pair as one key)."""

    source: object
    fn: Callable[[pd.DataFrame], pd.DataFrame]

    @property
    def located(self) -> list:
        return self.source.located

    @property
    def end(self) -> int:
        return getattr(self.source, "end", 0)

    def batches(self, rows: int | None = None) -> Iterator[pd.DataFrame]:
        return map(self.fn, self.source.batches(rows))


class RecordingSource:
    """Another source's batches, each also appended to a Parquet file as it is read (a fan-out piece
    keeps its rows for the step that merges the pieces: `PartsSource` reads them back)."""

    def __init__(self, source, path: Path):
        self.source, self.path = source, path

    @property
    def located(self) -> list:
        return self.source.located

    @property
    def end(self) -> int:
        return self.source.end

    def batches(self, rows: int | None = None) -> Iterator[pd.DataFrame]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        try:
            for batch in self.source.batches(rows):
                # every role is text (the label a string by label_str); typed once: a batch of nulls keeps the schema
                schema = pa.schema([(c, pa.int64() if c == "source_row" else pa.string()) for c in batch.columns])
                writer = writer or pq.ParquetWriter(self.path, schema)
                writer.write_table(pa.Table.from_pandas(batch, schema=schema, preserve_index=False))
                yield batch
        finally:
            if writer is not None:
                writer.close()


@dataclass
class PartsSource:
    """A split read back from the Parquet files its fan-out pieces recorded, in order; `shift` numbers
    each part's source_row on from the parts before it, as one reader over all the files would."""

    parts: list  # [(Parquet path, row shift)]
    located: list = field(default_factory=list)

    def batches(self, rows: int | None = None) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        for path, shift in self.parts:
            for table in formats.parquet_batches(pq.ParquetFile(path), rows or BATCH_ROWS):
                frame = table.to_pandas()
                frame["source_row"] += shift
                yield frame


def table_source(uri: str, *, columns: dict[str, str], header: bool = True, settings: S3Settings | None = None,
                 workdir: Path | None = None, label: str = "label", part: list[str] | None = None) -> tuple[TableSource, str]:
    """The source of `uri` and its format; s3:// objects are downloaded under `workdir` (disk, not memory).
    `part`: only these files of it (a fan-out piece: kubetune.steps.validate lists them once, in its plan)."""
    names = None
    if part:
        fmt = formats.format_of(part[0])
        if fmt is None or any(formats.format_of(f) != fmt for f in part):
            raise InputError(f"{uri}: the planned files {part[0]} ... are not of one known format; plan again")
        return TableSource(uri, fmt, formats.local_files(part, settings, workdir or Path(".")), columns, header, None, label), fmt
    if assets.is_builtin(uri):
        _, asset = assets.resolve(uri)
        path = assets.materialize(uri, workdir or Path("."))
        fmt, header, names = asset.reader["format"], asset.reader["header"], asset.reader["names"]
        files = [(uri, path)]
    else:
        uris, fmt = formats.split_files(uri, settings)
        files = formats.local_files(uris, settings, workdir or Path("."))
    return TableSource(uri, fmt, files, columns, header, names, label), fmt


def load_table(uri: str, **kw) -> tuple[pd.DataFrame, str, list[tuple[str, int]]]:
    """The whole table in memory: (frame, format, [(file URI, row offset)]) (tests, small tables)."""
    source, fmt = table_source(uri, **kw)
    frame = pd.concat(list(source.batches()), ignore_index=True)
    return frame, fmt, source.located


def text_hashes(values) -> np.ndarray:
    """An 8-byte hash per text (None hashes to a constant: mask nulls yourself). Duplicates, conflicts,
    leakage and the splits' grouping compare these instead of holding every text."""
    values = np.asarray(values, dtype=object)
    try:
        return pd.util.hash_array(values)
    except UnicodeEncodeError:  # a lone surrogate (a JSON escape): hash its bytes as they are
        return pd.util.hash_array(np.array([v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for v in values],
                                           dtype=object))


def values_at(source, positions: list[int], columns: tuple[str, ...]) -> list[tuple]:
    """The values of `columns` at the given 0-based row positions, read again up to the last one."""
    wanted, out, start = sorted(set(positions)), {}, 0
    for batch in source.batches():
        end = start + len(batch)
        for p in wanted:
            if start <= p < end:
                out[p] = tuple(batch[c].iloc[p - start] for c in columns)
        start = end
        if start > wanted[-1]:
            break
    return [out[p] for p in positions]


# ---------------------------------------------------------------------------------------------
# the per-row index a split keeps


@dataclass
class SplitIndex:
    """What the checks and the splits need of a whole split, per row in the source's order: 13 bytes
    a row (21 when the split group differs from the checked text). Row numbers and texts for messages
    are read again from the source for the few example rows (`examples`)."""

    key: np.ndarray  # uint64 hash of the checked text (a task's key: the pair, question + choices)
    has_text: np.ndarray  # bool: the text is not null
    label: np.ndarray  # int32 code into `labels`, -1 for a null label
    labels: list  # label names by code, in first-seen order
    group_key: np.ndarray | None = None  # uint64 hash of the text that keeps rows together in one split (None: `key`)

    def __len__(self) -> int:
        return len(self.key)

    @property
    def group(self) -> np.ndarray:
        return self.key if self.group_key is None else self.group_key

    def label_names(self, mask=None) -> np.ndarray:
        names = np.array(self.labels + [None], dtype=object)
        codes = self.label if mask is None else self.label[mask]
        return names[codes]  # -1 (null) indexes the trailing None

    def class_counts(self) -> pd.Series:
        """Rows per label, largest first (as pandas' value_counts)."""
        counts = np.bincount(self.label[self.label >= 0], minlength=len(self.labels))
        return pd.Series(counts, index=self.labels, dtype="int64").loc[lambda s: s > 0].sort_values(ascending=False, kind="stable")


class _IndexBuilder:
    def __init__(self):
        self.parts: dict[str, list] = {k: [] for k in ("key", "group_key", "has_text", "label")}
        self.codes: dict[str, int] = {}

    def add(self, batch: pd.DataFrame) -> None:
        key = text_hashes(batch["text"].to_numpy())
        label = np.array([-1 if v is None else self.codes.setdefault(v, len(self.codes)) for v in batch["label"]], dtype=np.int32)
        self.parts["key"].append(key)
        if "group" in batch:
            self.parts["group_key"].append(text_hashes(batch["group"].to_numpy()))
        self.parts["has_text"].append(batch["text"].notna().to_numpy())
        self.parts["label"].append(label)

    def build(self) -> SplitIndex:
        # one array at a time, its parts freed before the next: the peak is the index plus one array
        arrays = {}
        for name in list(self.parts):
            parts = self.parts.pop(name)
            arrays[name] = np.concatenate(parts) if parts else None
            del parts
        return SplitIndex(**arrays, labels=list(self.codes))


# ---------------------------------------------------------------------------------------------
# checks


def _ge_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # in-memory, no analytics (there may be no network), no progress bars in the logs
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx, gx.get_context(project_config=config, mode="ephemeral")


def _expectations(gx, split: str, cfg):
    """(expectation, user column, description of failing rows) for one split: the row-level rules
    (each batch is checked on its own: a fan-out piece checks its rows without the other splits)."""
    E = gx.expectations
    text, label = cfg.text_column, cfg.label_column
    items = [
        (E.ExpectColumnValuesToNotBeNull(column="text"), text, "have no text (null)"),
        (E.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"), text, "are empty or whitespace-only"),
        # the lower bound only when it says more than "not empty" (checked just above)
        (E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_text_chars if cfg.min_text_chars > 1 else None,
                                               max_value=cfg.max_text_chars),
         text, (f"are shorter than {cfg.min_text_chars} or " if cfg.min_text_chars > 1 else "are ")
         + f"longer than {cfg.max_text_chars} characters"),
        (E.ExpectColumnValuesToNotBeNull(column="label"), label, "have no label"),
    ]
    return items


@dataclass(frozen=True)
class RowCheck:
    """A task's own row-level rule, streamed like the expectations: `bad(batch)` marks failing rows."""

    name: str
    column: str  # the user's column name
    description: str
    bad: Callable[[pd.DataFrame], np.ndarray]
    value: str  # the frame column quoted in examples


class _SplitChecks:
    """The checks of one split, fed a batch at a time."""

    def __init__(self, gx, context, split: str, cfg, row_checks: tuple[RowCheck, ...]):
        self.items = _expectations(gx, split, cfg)
        suite = gx.ExpectationSuite(name=f"kubetune-{split}")
        for expectation, _, _ in self.items:
            suite.add_expectation(expectation)
        self.suite = suite
        self.definition = (context.data_sources.add_pandas(f"input-{split}").add_dataframe_asset(split)
                           .add_batch_definition_whole_dataframe("batch"))
        self.checks = [Check(split, e.configuration.type, column, "critical", True, description)
                       for e, column, description in self.items]
        self.row_checks = row_checks
        self.checks += [Check(split, rc.name, rc.column, "critical", True, rc.description) for rc in row_checks]
        self.batches = 0

    def add(self, batch: pd.DataFrame) -> None:
        self.batches += 1
        result = self.definition.get_batch(batch_parameters={"dataframe": batch.reset_index(drop=True)}).validate(
            self.suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["source_row"]}).to_json_dict()
        by_type = {}
        for r in result["results"]:
            conf = r["expectation_config"]
            if r.get("exception_info", {}).get("raised_exception"):
                raise KubetuneError(f"great-expectations failed on {conf['type']}: {r['exception_info']['exception_message']}")
            by_type[(conf["type"], json.dumps(conf["kwargs"].get("regex") or conf["kwargs"].get("column")))] = r
        for (expectation, _, _), check in zip(self.items, self.checks):
            conf = expectation.configuration
            r = by_type[(conf.type, json.dumps(conf.kwargs.get("regex") or conf.kwargs.get("column")))]
            res = r["result"]
            col = conf.kwargs.get("column")
            examples = [(x["source_row"], x.get(col)) for x in (res.get("unexpected_index_list") or [])[:EXAMPLES]]
            self._count(check, bool(r["success"]), int(res.get("unexpected_count") or 0), int(res.get("element_count") or len(batch)),
                        examples)
        for rc, check in zip(self.row_checks, self.checks[len(self.items):]):
            bad = np.asarray(rc.bad(batch), dtype=bool)
            rows = batch[bad]
            self._count(check, not bad.any(), int(bad.sum()), len(batch), list(zip(rows["source_row"], rows[rc.value]))[:EXAMPLES])

    @staticmethod
    def _count(check: Check, success: bool, unexpected: int, elements: int, examples: list) -> None:
        check.success &= success
        check.unexpected_count += unexpected
        check.element_count += elements
        check.examples = (check.examples + examples)[:EXAMPLES]

    def ge_result(self) -> dict:
        """The expectations' outcome over every batch (their checks hold the sums)."""
        return {"batches": self.batches, "results": [
            {"type": e.configuration.type, "kwargs": dict(e.configuration.kwargs), "success": c.success,
             "element_count": c.element_count, "unexpected_count": c.unexpected_count} for (e, _, _), c in zip(self.items, self.checks)]}


def _whole_split_checks(split: str, index: SplitIndex, source, cfg, train: SplitIndex | None) -> list[Check]:
    """The rules that need the whole split: duplicates, distinct labels, class counts, conflicting
    labels (all by hash and counts), and for eval/test the overlap with train."""
    n = len(index)
    repeated = _repeated(index)
    checks = [Check(split, "unique_text", cfg.text_column, "warning", not repeated.any(), "repeat another row's text",
                    unexpected_count=int(repeated.sum()), element_count=n, examples=example_rows(source, repeated, "text"))]
    counts = index.class_counts()
    if split == "train":
        labels = sorted(counts.index)
        checks.append(Check(split, "distinct_labels", cfg.label_column, "critical", len(labels) >= 2,
                            f"has {len(labels)} distinct label(s) {labels}: a classifier needs at least two classes",
                            unexpected_count=0, element_count=n))
        small = counts[counts < cfg.min_examples_per_class]
        checks.append(Check(
            split, "min_examples_per_class", cfg.label_column, "critical", small.empty,
            f"has classes with fewer than {cfg.min_examples_per_class} rows: "
            + ", ".join(f"{k!r}: {v}" for k, v in small.items()) + "; add data or drop those classes",
        ))
        if len(counts) >= 2:
            ratio = counts.min() / counts.max()
            checks.append(Check(
                split, "class_balance", cfg.label_column, "warning", ratio >= cfg.imbalance_warning_ratio,
                f"is imbalanced: smallest class {counts.idxmin()!r} has {counts.min()} rows, largest {counts.idxmax()!r} "
                f"{counts.max()} (ratio {ratio:.2f} < {cfg.imbalance_warning_ratio}); watch macro-F1, not accuracy",
            ))
    # a text with two labels is a repeated text: look for conflicts among the repeated rows only
    rows = np.zeros(n, dtype=bool)
    candidates = np.flatnonzero(repeated & (index.label >= 0))
    if len(candidates):
        pairs = pd.DataFrame({"key": index.key[candidates], "label": index.label[candidates]}).drop_duplicates()
        rows[candidates] = np.isin(index.key[candidates], pairs["key"][pairs["key"].duplicated()].unique())
    checks.append(Check(
        split, "consistent_labels", cfg.label_column, "warning", not rows.any(),
        "share their text with a row of a different label", unexpected_count=int(rows.sum()), element_count=n,
        examples=example_rows(source, rows, "label"),
    ))
    if train is not None:
        known = set(train.class_counts().index)
        outside = np.array([name not in known for name in index.labels] + [False])  # a null label (-1) is the not-null check's
        bad = outside[index.label]
        checks.append(Check(
            split, "labels_in_train", cfg.label_column, "critical", not bad.any(),
            f"have labels that are not in the train labels {sorted(known)}", unexpected_count=int(bad.sum()), element_count=n,
            examples=example_rows(source, bad, "label"),
        ))
        seen = np.sort(train.key[train.has_text])
        at = np.minimum(np.searchsorted(seen, index.key), max(len(seen) - 1, 0))
        leaked = index.has_text & (seen[at] == index.key) if len(seen) else np.zeros(n, dtype=bool)
        checks.append(Check(
            split, "no_train_overlap", cfg.text_column, "warning", not leaked.any(),
            "also occur in the train file (evaluation on seen texts overstates quality)",
            unexpected_count=int(leaked.sum()), element_count=n, examples=example_rows(source, leaked, "text"),
        ))
    return checks


def _repeated(index: SplitIndex) -> np.ndarray:
    """Rows whose text another row repeats (every row of such a group, as great-expectations counts)."""
    keys = np.sort(index.key[index.has_text])  # sorted in place of a hash table: 8 bytes a row
    twice = keys[1:][keys[1:] == keys[:-1]]
    del keys
    return index.has_text & np.isin(index.key, np.unique(twice))


def example_rows(source, mask: np.ndarray, column: str) -> list:
    """(row, value of `column`) of the first EXAMPLES rows in `mask`, read again from the source."""
    positions = np.flatnonzero(mask)[:EXAMPLES].tolist()
    return [(int(row), value) for row, value in values_at(source, positions, ("source_row", column))] if positions else []


@dataclass
class SplitPass:
    """One read of a split's rows (or of a fan-out piece's files): the row-level checks with their
    counts and first examples, the great-expectations summary, the index, and where its files start."""

    checks: list  # [Check]
    ge: dict
    index: SplitIndex
    located: list  # [(file URI, row offset)]
    end: int  # the row offset after its last file

    def save(self, folder: Path) -> None:
        arrays = {k: getattr(self.index, k) for k in ("key", "has_text", "label", "group_key") if getattr(self.index, k) is not None}
        np.savez(folder / "index.npz", **arrays)
        (folder / "pass.json").write_text(json.dumps({"checks": [asdict(c) for c in self.checks], "ge": self.ge, "located": self.located,
                                                      "end": self.end, "labels": self.index.labels}, default=str))

    @classmethod
    def load(cls, folder: Path) -> "SplitPass":
        d = json.loads((folder / "pass.json").read_text())
        with np.load(folder / "index.npz") as z:
            index = SplitIndex(**{k: z[k] for k in z.files}, labels=d["labels"])
        checks = [Check(**{**c, "examples": [tuple(e) for e in c["examples"]]}) for c in d["checks"]]
        return cls(checks, d["ge"], index, [tuple(f) for f in d["located"]], d["end"])


def check_pass(source, split: str, cfg, row_checks: tuple[RowCheck, ...] = (), ge=None) -> SplitPass:
    """Read `source` once, a batch at a time: the row-level checks and the index."""
    gx, context = ge or _ge_context()
    split_checks, builder = _SplitChecks(gx, context, split, cfg, row_checks), _IndexBuilder()
    for batch in source.batches():
        split_checks.add(batch)
        builder.add(batch)
        del batch  # the next batch is read while this one would still be held
    return SplitPass(split_checks.checks, split_checks.ge_result(), builder.build(), source.located, getattr(source, "end", 0))


def merge_passes(parts: list[SplitPass]) -> SplitPass:
    """The passes of a split's pieces, in file order, as one pass over all its files."""
    checks = [replace(c, success=True, unexpected_count=0, element_count=0, examples=[]) for c in parts[0].checks]
    located, shift, codes, labels = [], 0, {}, []
    for part in parts:
        for total, c in zip(checks, part.checks, strict=True):
            _SplitChecks._count(total, c.success, c.unexpected_count, c.element_count, [(row + shift, v) for row, v in c.examples])
        located += [(uri, offset + shift) for uri, offset in part.located]
        shift += part.end
        to_global = np.array([codes.setdefault(name, len(codes)) for name in part.index.labels] + [-1], dtype=np.int32)
        labels.append(to_global[part.index.label])  # -1 (null) indexes the trailing -1
    group = [p.index.group_key for p in parts]
    index = SplitIndex(np.concatenate([p.index.key for p in parts]), np.concatenate([p.index.has_text for p in parts]),
                       np.concatenate(labels), list(codes), None if group[0] is None else np.concatenate(group))
    # the expectations' summary follows from their merged checks (the first checks, one per expectation), as in one pass
    results = [{**r, "success": c.success, "element_count": c.element_count, "unexpected_count": c.unexpected_count}
               for r, c in zip(parts[0].ge["results"], checks)]
    return SplitPass(checks, {"batches": sum(p.ge["batches"] for p in parts), "results": results}, index, located, shift)


def check_tables(sources: dict, source_uris: dict[str, str], formats: dict[str, str], cfg, files: dict | None = None,
                 row_checks: tuple[RowCheck, ...] = (), passes: dict[str, SplitPass] | None = None) -> tuple[Report, dict[str, SplitIndex]]:
    """Check each split (a source, or a frame) a batch at a time, train first; returns the report and
    each split's index (kubetune.validation.splits makes and writes the splits from it). A batch may
    carry a "group" column: the text that keeps rows together when splitting (default: "text").
    `passes`: the splits' row-level passes made already (a fan-out's pieces, merged); the sources are
    then read only for the examples of the whole-split checks."""
    ge = None  # great-expectations' context, made once and only when a split is read here (not for merged passes)
    sources = {s: FrameSource(src) if isinstance(src, pd.DataFrame) else src for s, src in sources.items()}
    checks, ge_results, indexes, located = [], {}, {}, {}
    for split in sorted(sources, key=lambda s: s != "train"):
        source = sources[split]
        done = (passes or {}).get(split)
        if done is None:
            ge = ge or _ge_context()
            done = check_pass(source, split, cfg, row_checks, ge)
        indexes[split], ge_results[split] = done.index, done.ge
        if done.located:
            located[split] = done.located
        checks += done.checks + _whole_split_checks(split, done.index, source, cfg, indexes.get("train") if split != "train" else None)
    report = Report(sources=source_uris, formats=formats, checks=checks, ge_results=ge_results, files={**(files or {}), **located})
    return report, indexes
