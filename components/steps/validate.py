"""Step 1 - validate: load labelled text, check it with great-expectations, make the splits.

    python -m kubetune.steps.validate --train builtin:sms-spam --out /tmp/kt/dataset \
        --report /tmp/kt/report.md --expectations /tmp/kt/expectations.json \
        --store ./kubetune-store --run-id dev

Checks, per input file (critical ones stop the run with exit code 2, warnings go to the report):
  critical  text not null, not empty/whitespace, length within [min, max] characters
  critical  label not null; eval/test labels are a subset of the train labels
  critical  train has >= 2 classes, and each class has >= min_examples_per_class rows
  warning   duplicate texts, identical texts with different labels, class imbalance,
            eval/test texts that also occur in train (leakage)

With --task token-classification (NER: CoNLL or JSONL files of tagged words) the checks are those of
kubetune.validation.tagging (IOB2 tags, token/tag counts, unseen tags) and the dataset folder holds
word lists and tag lists instead of texts and labels.

Outputs: a dataset folder (train/eval/test.parquet with columns text, label, source_row;
labels.json; meta.json with counts and content fingerprints), the expectation results as JSON and a
Markdown report. Without eval/test files the splits are made here: stratified by label, seeded, and
grouped by text so that duplicates never straddle two splits.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kubetune.storage import assets

from kubetune.storage import formats as data  # `formats` is also a local name (file formats per split)

from kubetune.validation import tagging as validate_tokens
from kubetune.core.entry import add_config_args, config_from_args, run_main, step_parser
from kubetune.errors import ConfigError, InputError, KubetuneError
from kubetune.tasks.metrics import SEQUENCE, TOKEN, check_task
from kubetune.core.progress import log
from kubetune.storage.records import open_run, scratch
from kubetune.storage.store import S3Settings

STEP = "validate"
SPLITS = ("train", "eval", "test")
EXAMPLES = 5  # example rows quoted per failed check


@dataclass(frozen=True)
class ValidateConfig:
    task: str = SEQUENCE  # sequence-classification | token-classification
    text_column: str = "text"
    label_column: str = "label"
    header: bool = True  # CSV/TSV files start with a header row
    limit: int = 0  # >0: seeded stratified subsample of each file to at most this many rows
    seed: int = 0
    eval_fraction: float = 0.1  # used only when no eval file is given
    test_fraction: float = 0.1  # used only when no test file is given
    min_text_chars: int = 1
    max_text_chars: int = 100_000
    min_examples_per_class: int = 5
    imbalance_warning_ratio: float = 0.2  # warn when smallest/largest class count is below this
    # token classification (see kubetune.validation.tagging)
    token_column: int = 0  # CoNLL: column of the token
    tag_column: int = -1  # CoNLL: column of the tag (-1: the last)
    tokens_field: str = "tokens"  # JSONL fields
    tags_field: str = "tags"
    repair_tags: bool = False  # turn an I-X that continues nothing into B-X instead of rejecting it
    max_sentence_words: int = 128  # longer sentences are reported

    def check(self) -> None:
        check_task(self.task)
        problems = []
        if not 0 < self.eval_fraction < 1 or not 0 < self.test_fraction < 1:
            problems.append(f"eval_fraction={self.eval_fraction}, test_fraction={self.test_fraction}: each must be in (0, 1) "
                            "(they apply only when no eval/test file is given)")
        if self.eval_fraction + self.test_fraction >= 0.9:
            held_out = self.eval_fraction + self.test_fraction
            problems.append(f"eval_fraction + test_fraction = {held_out:.2f} leaves too little to train on; keep it below 0.9")
        if self.task == TOKEN and self.token_column == self.tag_column:
            problems.append(f"token_column and tag_column are both {self.tag_column}: the tag needs its own column")
        if self.limit < 0:
            problems.append(f"limit={self.limit}: use 0 (all rows) or a positive row count")
        if not 0 <= self.min_text_chars <= self.max_text_chars:
            problems.append(f"text length bounds [{self.min_text_chars}, {self.max_text_chars}] are not a range")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class Check:
    split: str
    name: str  # the GE expectation type, or a kubetune check name
    column: str  # the user's column name
    severity: str  # critical | warning
    success: bool
    description: str  # what the failing rows are, e.g. "are empty or whitespace-only"
    unexpected_count: int = 0
    element_count: int = 0
    examples: list = field(default_factory=list)  # [(row, value)]
    unit: str = "rows"  # what element_count counts


@dataclass
class Report:
    sources: dict
    formats: dict
    checks: list
    ge_results: dict

    @property
    def passed(self) -> bool:
        return not any(c.severity == "critical" and not c.success for c in self.checks)

    def failures(self, severity: str) -> list[Check]:
        return [c for c in self.checks if c.severity == severity and not c.success]

    def describe(self, c: Check, examples: int = EXAMPLES) -> str:
        where = data.unit(self.formats.get(c.split, "csv"))
        count = f"{c.unexpected_count} of {c.element_count} {c.unit} " if c.element_count else ""
        examples = ", ".join(f"{where} {row}: {_short(v)}" for row, v in c.examples[:examples])
        return f"{self.sources[c.split]}: column {c.column!r}: {count}{c.description}" + (f"; e.g. {examples}" if examples else "")

    def error_message(self) -> str:
        lines = [self.describe(c) for c in self.failures("critical")]
        return "input rejected by validation:\n  - " + "\n  - ".join(lines)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "sources": self.sources,
            "checks": [asdict(c) for c in self.checks],
            "great_expectations": self.ge_results,
        }

    def markdown(self, meta: dict | None = None) -> str:
        status = "PASSED" if self.passed else "FAILED"
        out = [f"# Data validation: {status}", ""]
        out += ["| split | source | rows |", "|---|---|---|"]
        for split, src in self.sources.items():
            n = next((c.element_count for c in self.checks if c.split == split and c.element_count), "")
            out.append(f"| {split} | `{src}` | {n} |")
        for severity, title in (("critical", "Errors"), ("warning", "Warnings")):
            failed = self.failures(severity)
            if failed:
                out += ["", f"## {title}", ""] + [f"- {self.describe(c)}" for c in failed]
        out += ["", "## Checks", "", "| split | check | column | severity | result | failing rows |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            out.append(f"| {c.split} | {c.name} | {c.column} | {c.severity} | {'ok' if c.success else 'FAIL'} | {c.unexpected_count} |")
        if meta:
            out += ["", "## Splits used for training", "", "| split | rows | " + " | ".join(meta["labels"]) + " |",
                    "|---|---|" + "---|" * len(meta["labels"])]
            for split in SPLITS:
                counts = meta["splits"][split]["class_counts"]
                out.append(f"| {split} | {meta['splits'][split]['rows']} | " + " | ".join(str(counts.get(lab, 0)) for lab in meta["labels"]) + " |")
        return "\n".join(out) + "\n"


def _short(value, n: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


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


def _expectations(gx, split: str, train_labels: list[str], cfg: ValidateConfig):
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


def _run_ge(gx, context, split: str, frame: pd.DataFrame, train_labels: list[str], cfg: ValidateConfig):
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


def _class_checks(split: str, frame: pd.DataFrame, cfg: ValidateConfig) -> list[Check]:
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


def _leakage_check(split: str, frame: pd.DataFrame, train: pd.DataFrame, cfg: ValidateConfig) -> Check:
    leaked = frame[frame["text"].isin(set(train["text"].dropna()))]
    return Check(
        split, "no_train_overlap", cfg.text_column, "warning", leaked.empty,
        "also occur in the train file (evaluation on seen texts overstates quality)",
        unexpected_count=len(leaked), element_count=len(frame),
        examples=list(zip(leaked["source_row"], leaked["text"]))[:EXAMPLES],
    )


def check(frames: dict[str, pd.DataFrame], sources: dict[str, str], formats: dict[str, str], cfg: ValidateConfig) -> Report:
    gx, context = _ge_context()
    train_labels = sorted(frames["train"]["label"].dropna().unique().tolist())
    checks, ge_results = [], {}
    for split, frame in frames.items():
        split_checks, ge_results[split] = _run_ge(gx, context, split, frame, train_labels, cfg)
        checks += split_checks + _class_checks(split, frame, cfg)
        if split != "train":
            checks.append(_leakage_check(split, frame, frames["train"], cfg))
    return Report(sources=sources, formats=formats, checks=checks, ge_results=ge_results)


# ---------------------------------------------------------------------------------------------
# subsample and split


def _allocate(counts: pd.Series, total: int) -> dict:
    """Largest-remainder allocation of `total` rows over classes, at least one per class."""
    exact = counts / counts.sum() * total
    alloc = np.maximum(np.floor(exact).astype(int), 1).clip(upper=counts)
    order = (exact - np.floor(exact)).sort_values(ascending=False).index
    i = 0
    while alloc.sum() < min(total, counts.sum()):
        label = order[i % len(order)]
        if alloc[label] < counts[label]:
            alloc[label] += 1
        i += 1
    return alloc.to_dict()


def subsample(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    if not limit or len(frame) <= limit:
        return frame
    rng = np.random.default_rng(seed)
    take = _allocate(frame["label"].value_counts(), limit)
    parts = [
        group.iloc[np.sort(rng.choice(len(group), size=take[label], replace=False))]
        for label, group in frame.groupby("label", sort=True)
    ]
    return pd.concat(parts).sort_values("source_row")


def split_frame(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Stratified, seeded split of `frame` into 'train' and the named fractions. Identical texts are
    one group, so a duplicate never lands in two splits."""
    rng = np.random.default_rng(seed)
    first_label = frame.groupby("text", sort=False)["label"].first()
    assignment: dict[str, str] = {}
    for label in sorted(first_label.unique()):
        texts = first_label[first_label == label].index.to_numpy()
        texts = texts[rng.permutation(len(texts))]
        start = 0
        for name, frac in fractions.items():
            n = int(round(len(texts) * frac))
            if frac > 0 and len(texts) >= 3:
                n = max(n, 1)  # every class appears in every split it can
            for t in texts[start:start + n]:
                assignment[t] = name
            start += n
    which = frame["text"].map(lambda t: assignment.get(t, "train"))
    return {name: frame[which == name] for name in ["train", *fractions]}


def fingerprint(frame: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"]):
        h.update(json.dumps([text, label], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def prepare(frames: dict[str, pd.DataFrame], sources: dict[str, str], cfg: ValidateConfig, out_dir: Path) -> dict:
    """Subsample, split and write the dataset folder; returns meta.json's content."""
    frames = {s: subsample(f, cfg.limit, cfg.seed) for s, f in frames.items()}
    missing = {s: getattr(cfg, f"{s}_fraction") for s in ("eval", "test") if s not in frames}
    if missing:
        made = split_frame(frames["train"], missing, cfg.seed)
        frames = {**frames, **made}
    labels = sorted(frames["train"]["label"].unique().tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"task": SEQUENCE, "labels": labels, "sources": sources, "split_made_here": sorted(missing), "config": asdict(cfg), "splits": {}}
    for split in SPLITS:
        frame = frames[split]
        if frame.empty:
            raise InputError(f"the {split} split is empty; give more data or a {split} file")
        frame[["text", "label", "source_row"]].reset_index(drop=True).to_parquet(out_dir / f"{split}.parquet", index=False)
        meta["splits"][split] = {
            "rows": len(frame),
            "class_counts": {k: int(v) for k, v in frame["label"].value_counts().sort_index().items()},
            "fingerprint": fingerprint(frame),
        }
    (out_dir / "labels.json").write_text(json.dumps({"labels": labels}, indent=2))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_dataset(dataset_dir: Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """Read back a validated dataset folder (used by later steps)."""
    meta = json.loads((dataset_dir / "meta.json").read_text())
    return {s: pd.read_parquet(dataset_dir / f"{s}.parquet") for s in SPLITS}, meta


# ---------------------------------------------------------------------------------------------
# entry points


def validate(
    train_uri: str, eval_uri: str, test_uri: str, cfg: ValidateConfig, out_dir: Path,
    settings: S3Settings | None = None, workdir: Path | None = None,
) -> tuple[Report, dict | None]:
    """Load and check the inputs; when they pass, write the dataset folder. Returns the report and
    the dataset meta (None when a critical check failed: nothing is written then)."""
    cfg.check()
    workdir = workdir or scratch(STEP)
    for uri in (train_uri, eval_uri, test_uri):
        if assets.is_builtin(uri) and assets.resolve(uri)[1].task != cfg.task:
            ours = assets.DEFAULT_DATA[cfg.task]
            raise InputError(f"{uri} is {assets.resolve(uri)[1].task} data, not {cfg.task} data; use {ours} or your own files")
    if cfg.task == TOKEN:
        return _validate_tokens(train_uri, eval_uri, test_uri, cfg, out_dir, settings, workdir)
    sources = {s: u for s, u in zip(SPLITS, (train_uri, eval_uri, test_uri)) if u}
    frames, formats = {}, {}
    for split, uri in sources.items():
        frames[split], formats[split] = data.load_table(
            uri, text_column=cfg.text_column, label_column=cfg.label_column, header=cfg.header,
            settings=settings, workdir=workdir,
        )
        log(STEP, f"{split}: {len(frames[split])} rows from {uri}")
    report = check(frames, sources, formats, cfg)
    for c in report.failures("warning"):
        log(STEP, f"warning: {report.describe(c, examples=2)}")
    if not report.passed:
        return report, None
    meta = prepare(frames, sources, cfg, out_dir)
    log(STEP, "splits: " + ", ".join(f"{s} {meta['splits'][s]['rows']}" for s in SPLITS) + f"; labels {meta['labels']}")
    return report, meta


def _validate_tokens(train_uri, eval_uri, test_uri, cfg, out_dir, settings, workdir) -> tuple[Report, dict | None]:
    sources = validate_tokens.sources_for(train_uri, eval_uri, test_uri)
    sentences = {s: validate_tokens.load_sentences(s, u, cfg, settings, workdir) for s, u in sources.items()}
    report, usable = validate_tokens.check(sentences, sources, cfg)
    for c in report.failures("warning"):
        log(STEP, f"warning: {report.describe(c, examples=2)}")
    if not report.passed:
        return report, None
    meta = validate_tokens.prepare(usable, sources, cfg, out_dir)
    log(STEP, "splits: " + ", ".join(f"{s} {meta['splits'][s]['rows']} sentences" for s in SPLITS)
        + f"; entities in train {meta['splits']['train']['entities']}")
    return report, meta


def run_step(
    *, store_uri: str, run_id: str, train_uri: str, eval_uri: str, test_uri: str, cfg: ValidateConfig,
    dataset_dir: Path, report_path: Path, expectations_path: Path,
) -> dict:
    record = open_run(store_uri, run_id)
    with record.step(STEP, config={"train": train_uri, "eval": eval_uri, "test": test_uri, **asdict(cfg)}) as rec:
        record.write_json("run.json", {"run_id": record.run_id, "store": record.store.uri, "train": train_uri,
                                       "eval": eval_uri, "test": test_uri, "validate": asdict(cfg)})
        report, meta = validate(train_uri, eval_uri, test_uri, cfg, dataset_dir, S3Settings.from_env())
        # the report is kept for failed runs too: it is what the user reads to fix the data
        markdown = report.markdown(meta)
        for path, text in ((report_path, markdown), (expectations_path, json.dumps(report.to_json(), indent=1, default=str))):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        rec["outputs"] = {
            "report": record.write_text("validation/report.md", markdown),
            "expectations": record.write_json("validation/expectations.json", report.to_json()),
        }
        if not report.passed:
            raise InputError(report.error_message())
        rec["outputs"]["splits"] = {s: meta["splits"][s]["rows"] for s in SPLITS}
        rec["outputs"]["labels"] = meta["labels"]
        rec["outputs"]["fingerprints"] = {s: meta["splits"][s]["fingerprint"] for s in SPLITS}
    return meta


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.validate", __doc__)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", default="")
    p.add_argument("--test", default="")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--report", required=True, type=Path)
    p.add_argument("--expectations", required=True, type=Path)
    add_config_args(p, ValidateConfig)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(
        store_uri=a.store, run_id=a.run_id, train_uri=a.train, eval_uri=a.eval, test_uri=a.test,
        cfg=config_from_args(ValidateConfig, a), dataset_dir=a.out, report_path=a.report, expectations_path=a.expectations,
    ))


if __name__ == "__main__":
    sys.exit(main())
