"""Checks of labelled text tables (sequence classification, and any task whose rows are texts
with a label): great-expectations on each split, class counts, conflicting labels and leakage; and
the loader that reads such a table from any format, folder or prefix (kubetune.storage.formats).

    python -c "from kubetune.validation.tables import load_table as t; print(t('builtin:sms-spam', columns={'text': 'text'})[0])"

Checks, per split (critical ones stop the run with exit code 2, warnings go to the report):
  critical  text not null, not empty/whitespace, length within [min, max] characters
  critical  label not null; eval/test labels are a subset of the train labels
  critical  train has >= 2 classes, and each class has >= min_examples_per_class rows
  warning   duplicate texts, identical texts with different labels, class imbalance,
            eval/test texts that also occur in train (leakage)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from kubetune.errors import InputError, KubetuneError
from kubetune.storage import assets, formats
from kubetune.storage.store import S3Settings
from kubetune.validation.report import EXAMPLES, Check, Report

# ---------------------------------------------------------------------------------------------
# loading


def label_str(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 -> "1": integer labels that went through a float column
    s = str(value).strip()
    return s or None


def load_table(uri: str, *, columns: dict[str, str], header: bool = True, settings: S3Settings | None = None,
               workdir: Path | None = None, label: str = "label") -> tuple[pd.DataFrame, str, list[tuple[str, int]]]:
    """Read `uri` (a file, folder or prefix, or builtin:) into (frame, format, files). `columns` maps
    each frame column (role) to the user's column name, e.g. {"text": "review", "label": "stars"};
    every role but `label` must hold text. `source_row` numbers rows across files: file k's rows are
    offset by files[k][1] (its line numbers stay readable in messages, see Report.where)."""
    names = None
    if assets.is_builtin(uri):
        path, asset = assets.resolve(uri)
        path = assets.materialize(uri, workdir or Path("."))
        fmt, header, names = asset.reader["format"], asset.reader["header"], asset.reader["names"]
        files = [(uri, path)]
    else:
        uris, fmt = formats.split_files(uri, settings)
        files = formats.local_files(uris, settings, workdir or Path("."))
    data = {role: [] for role in columns}
    data["source_row"] = []
    located, offset = [], 0
    wanted = tuple(columns.values())
    flags = {col: f"--{role.replace('_', '-')}-column" for role, col in columns.items()}
    for file_uri, path in files:
        located.append((file_uri, offset))
        last = 0
        for rec in formats.read_records(path, file_uri, fmt, header=header, names=names, columns=wanted, flags=flags, strict=True):
            for role, col in columns.items():
                value = rec.fields[col]
                if role != label and value is not None and not isinstance(value, str):
                    raise InputError(f"{file_uri}: {formats.unit(fmt)} {rec.row}: column {col!r} must hold text, "
                                     f"got {type(value).__name__} {value!r}")
                data[role].append(label_str(value) if role == label else value)
            data["source_row"].append(offset + rec.row)
            last = rec.row
        offset += last
    frame = pd.DataFrame({role: pd.Series(v, dtype=object) for role, v in data.items() if role != "source_row"})
    frame["source_row"] = pd.Series(data["source_row"], dtype="int64")
    if frame.empty:
        raise InputError(f"{uri}: file is empty (a header but no data rows)" if len(files) == 1 else f"{uri}: the files hold no data rows")
    return frame, fmt, located


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


def _expectations(gx, split: str, train_labels: list[str], cfg):
    """(expectation, user column, description of failing rows) for one split."""
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
        (E.ExpectColumnValuesToBeUnique(column="text", severity="warning"), text, "repeat another row's text"),
    ]
    if split == "train":
        items.append((E.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2), label,
                      "has fewer than 2 distinct labels: a classifier needs at least two classes"))
    else:
        items.append((E.ExpectColumnValuesToBeInSet(column="label", value_set=train_labels), label,
                      f"have labels that are not in the train labels {train_labels}"))
    return items


def _run_ge(gx, context, split: str, frame: pd.DataFrame, train_labels: list[str], cfg):
    items = _expectations(gx, split, train_labels, cfg)
    suite = gx.ExpectationSuite(name=f"kubetune-{split}")
    for expectation, _, _ in items:
        suite.add_expectation(expectation)
    batch = (
        context.data_sources.add_pandas(f"input-{split}")
        .add_dataframe_asset(split)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame.reset_index(drop=True)})
    )
    result = batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["source_row"]}
    ).to_json_dict()
    by_type = {}
    for r in result["results"]:
        conf = r["expectation_config"]
        if r.get("exception_info", {}).get("raised_exception"):
            raise KubetuneError(f"great-expectations failed on {conf['type']}: {r['exception_info']['exception_message']}")
        by_type[(conf["type"], json.dumps(conf["kwargs"].get("regex") or conf["kwargs"].get("column")))] = r
    checks = []
    for expectation, column, description in items:
        conf = expectation.configuration
        r = by_type[(conf.type, json.dumps(conf.kwargs.get("regex") or conf.kwargs.get("column")))]
        res = r["result"]
        col = conf.kwargs.get("column")
        examples = [(x["source_row"], x.get(col)) for x in (res.get("unexpected_index_list") or [])[:EXAMPLES]]
        if conf.type == "expect_column_unique_value_count_to_be_between" and not r["success"]:
            labels = sorted(frame["label"].dropna().unique().tolist())
            description = f"has {len(labels)} distinct label(s) {labels}: a classifier needs at least two classes"
        checks.append(Check(
            split=split, name=conf.type, column=column, severity=r["expectation_config"].get("severity", "critical"),
            success=bool(r["success"]), description=description,
            unexpected_count=int(res.get("unexpected_count") or 0),
            element_count=int(res.get("element_count") or len(frame)), examples=examples,
        ))
    return checks, result


def _class_checks(split: str, frame: pd.DataFrame, cfg) -> list[Check]:
    counts = frame["label"].value_counts()
    checks = []
    small = counts[counts < cfg.min_examples_per_class]
    if split == "train":
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
    labelled = frame.dropna(subset=["text", "label"])
    per_text = labelled.groupby("text")["label"].nunique()
    conflicting = per_text[per_text > 1]
    rows = labelled[labelled["text"].isin(conflicting.index)]
    checks.append(Check(
        split, "consistent_labels", cfg.label_column, "warning", conflicting.empty,
        "share their text with a row of a different label", unexpected_count=len(rows), element_count=len(frame),
        examples=list(zip(rows["source_row"], rows["label"]))[:EXAMPLES],
    ))
    return checks


def _leakage_check(split: str, frame: pd.DataFrame, train: pd.DataFrame, cfg) -> Check:
    leaked = frame[frame["text"].isin(set(train["text"].dropna()))]
    return Check(
        split, "no_train_overlap", cfg.text_column, "warning", leaked.empty,
        "also occur in the train file (evaluation on seen texts overstates quality)",
        unexpected_count=len(leaked), element_count=len(frame),
        examples=list(zip(leaked["source_row"], leaked["text"]))[:EXAMPLES],
    )


def check_tables(frames: dict[str, pd.DataFrame], sources: dict[str, str], formats: dict[str, str], cfg, files: dict | None = None) -> Report:
    gx, context = _ge_context()
    train_labels = sorted(frames["train"]["label"].dropna().unique().tolist())
    checks, ge_results = [], {}
    for split, frame in frames.items():
        split_checks, ge_results[split] = _run_ge(gx, context, split, frame, train_labels, cfg)
        checks += split_checks + _class_checks(split, frame, cfg)
        if split != "train":
            checks.append(_leakage_check(split, frame, frames["train"], cfg))
    return Report(sources=sources, formats=formats, checks=checks, ge_results=ge_results, files=files or {})

