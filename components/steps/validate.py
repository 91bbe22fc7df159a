"""Step 1 - validate: load labelled data, check it, make the splits.

    python -m kubetune.steps.validate --train builtin:sms-spam --out /tmp/kt/dataset \
        --report /tmp/kt/report.md --expectations /tmp/kt/expectations.json \
        --store ./kubetune-store --run-id dev

What is read and checked is the task's (kubetune.tasks): for sequence classification CSV/TSV/JSONL/
Parquet tables of text and label, checked with great-expectations (kubetune.validation.tables); for
token classification CoNLL/JSONL tagged sentences (kubetune.validation.tagging). Any input may be
one file or a folder / s3:// prefix of files of one format. Critical failures stop the run with exit
code 2 and a message naming the file, column, count and example lines; warnings go to the report.

Outputs: a dataset folder (train/eval/test.parquet, labels.json, meta.json with counts and content
fingerprints), the expectation results as JSON and a Markdown report. Without eval/test files the
splits are made here: seeded, and for tables stratified by label and grouped by text so that
duplicates never straddle two splits.

Fan-out (large data, tables): when a split is given as several files and the inputs hold more than
`fanout_mb`, the pipeline runs `plan_step` (the files of each split, listed once, in
<store>/runs/<run>/pieces/validate/plan.json, grouped into pieces of about fanout_mb), a `piece_step`
per piece (dsl.ParallelFor: the row-level checks and the index over its files, its rows kept as
Parquet, published under the run) and then this step with the pieces (`run_step(pieces=...)`): it
merges them in file order and makes the whole-split and cross-split checks (duplicates, labels,
train/test overlap by hash), the splits and the report, as one task over the same files would.
Smaller data is one piece, `whole`, which this step reads itself.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args, opt, param
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.fanout import WHOLE, Piece, check_count, in_order, parse_pieces, pieces_prefix
from kubetune.core.progress import log
from kubetune.core.system import return_freed_memory
from kubetune.errors import ConfigError, InputError, KubetuneError
from kubetune.release import registry
from kubetune.storage import assets, formats
from kubetune.storage.contracts import DatasetMeta
from kubetune.storage.store import NotFound, S3Settings, Store, StoreError, file_size, join
from kubetune.validation import tables
from kubetune.validation.report import SPLITS, Report

STEP = "validate"
PLAN = "plan.json"  # under the run's pieces/validate/: the files of each split, listed once for every piece task
MB = 1 << 20


@dataclass(frozen=True)
class ValidateConfig:
    task: str = param(tasks.DEFAULT, f"The task family: {' or '.join(tasks.names())} (kubetune.tasks: what each reads, trains and "
                      "predicts).", choices=tasks.names)
    text_column: str = param("text", "Column (field) holding the text.")
    label_column: str = param("label", "Column (field) holding the label.")
    text_pair_column: str = param("text_pair", "pair-classification: column (field) holding the second text of each pair "
                                  "(passage, candidate answer, hypothesis); --text-column holds the first (question, premise).")
    choices_column: str = param("choices", "multiple-choice: column (field) holding each question's list of choices; "
                                "without it, choice_0 .. choice_N columns.")
    context_column: str = param("", "multiple-choice: optional column (field) with a passage shared by the choices, read before "
                                "the question.")
    positive_label: str = param("", "pair-classification: the label of a matching pair, whose probability ranks a text's "
                                "candidates (MRR, accuracy@1); empty: the label named 1/true/yes/positive/relevant/..., else the "
                                "last in sorted order.")
    allow_mixed_choices: bool = param(False, "multiple-choice: accept questions with different choice counts (absent choices are "
                                             "masked); default: every question must have the same count.")
    header: bool = param(True, "Whether CSV/TSV files start with a header row (else columns are named 0, 1, ...).",
                         flag="--no-header", invert=True)
    limit: int = param(0, "Use at most this many rows per input file (seeded stratified sample); 0 = all.")
    seed: int = param(0, "Seed for splitting, sampling and training.")
    eval_fraction: float = param(0.1, "Share of training rows held out for eval when no eval file is given.")
    test_fraction: float = param(0.1, "Share of training rows held out for test when no test file is given.")
    min_text_chars: int = opt(1, "Texts shorter than this many characters fail validation (1: only empty ones).")
    # a sanity bound (a 1 MB field is not a text); tokenize truncates long texts
    max_text_chars: int = opt(1_000_000, "Texts longer than this many characters fail validation (a sanity bound; tokenize "
                                         "truncates long texts).")
    min_examples_per_class: int = opt(5, "Fail validation when a train class has fewer rows than this.")
    imbalance_warning_ratio: float = opt(0.2, "Warn when the smallest train class has fewer rows than this share of the "
                                              "largest.")
    # token classification (see kubetune.validation.tagging)
    token_column: int = opt(0, "NER, CoNLL files: the column holding the token (0-based).")
    tag_column: int = param(-1, "NER, CoNLL files: the column holding the tag (0-based; -1 = the last).")
    tokens_field: str = opt("tokens", "NER, JSONL files: the field holding a sentence's tokens.")
    tags_field: str = opt("tags", "NER, JSONL files: the field holding a sentence's tags.")
    repair_tags: bool = param(False, "NER: an I-<type> that continues nothing becomes B-<type> instead of an error.")
    max_sentence_words: int = opt(128, "NER: warn about sentences with more words than this (tokenize truncates them to "
                                       "max_length tokens).")
    fanout_mb: float = param(512.0, "Large data: when a split is given as several files (a folder or s3:// prefix) and the inputs "
                                "hold more than this many MB, the rows are checked by parallel tasks (dsl.ParallelFor) of whole files "
                                "of about this size each, then merged; 0: always one task. Tables only (NER and multiple-choice "
                                "data are checked in one task).")

    def check(self) -> None:
        tasks.get(self.task)
        problems = []
        if not 0 < self.eval_fraction < 1 or not 0 < self.test_fraction < 1:
            problems.append(f"eval_fraction={self.eval_fraction}, test_fraction={self.test_fraction}: each must be in (0, 1) "
                            "(they apply only when no eval/test file is given)")
        if self.eval_fraction + self.test_fraction >= 0.9:
            held_out = self.eval_fraction + self.test_fraction
            problems.append(f"eval_fraction + test_fraction = {held_out:.2f} leaves too little to train on; keep it below 0.9")
        if self.token_column == self.tag_column:
            problems.append(f"token_column and tag_column are both {self.tag_column}: the tag needs its own column")
        if self.fanout_mb < 0:
            problems.append(f"fanout_mb={self.fanout_mb}: use 0 (always one task) or a size in MB")
        if self.limit < 0:
            problems.append(f"limit={self.limit}: use 0 (all rows) or a positive row count")
        if not 0 <= self.min_text_chars <= self.max_text_chars:
            problems.append(f"text length bounds [{self.min_text_chars}, {self.max_text_chars}] are not a range")
        if self.positive_label and not tasks.get(self.task).gate_only_metrics:
            ranking = [n for n in tasks.names() if tasks.get(n).gate_only_metrics]
            problems.append(f"positive_label={self.positive_label!r}: only {' and '.join(ranking)} ranks candidates by a positive "
                            f"label; a {self.task} run has none, so leave it empty")
        if problems:
            raise ConfigError("; ".join(problems))


def check_builtins(task, uris) -> None:
    """A builtin dataset in the format another task reads is rejected with the data this task ships."""
    for uri in uris:
        if assets.is_builtin(uri):
            fmt = assets.resolve(uri)[1].reader.get("format")
            if fmt and fmt not in task.formats:
                raise InputError(f"{uri} is {fmt.upper()} data, which {task.name} does not read; "
                                 f"use {task.default_data} or your own files")


def resolve_inputs(task_name: str, train_uri: str, model_name: str) -> tuple[str, str]:
    """The training data (the task's built-in dataset when empty) and the registry name (derived
    from the data's name when empty): decided once, here, for the CLI and the pipeline."""
    train = train_uri or tasks.get(task_name).default_data
    return train, registry.check_name(model_name) if model_name else registry.name_from_uri(train)


def load_dataset(dataset_dir: Path) -> tuple[dict[str, pd.DataFrame], DatasetMeta]:
    """Read back a validated dataset folder (used by later steps)."""
    meta = DatasetMeta.read(dataset_dir)
    return {s: pd.read_parquet(dataset_dir / f"{s}.parquet") for s in SPLITS}, meta


def validate(train_uri: str, eval_uri: str, test_uri: str, cfg: ValidateConfig, out_dir: Path,
             settings: S3Settings | None = None, workdir: Path | None = None, merged: dict | None = None) -> tuple[Report, dict | None]:
    """Load and check the inputs; when they pass, write the dataset folder. Returns the report and
    the dataset meta (None when a critical check failed: nothing is written then). `merged`: the
    fan-out pieces' results (`merge_pieces`) in place of reading the inputs."""
    cfg.check()
    task = tasks.get(cfg.task)
    train_uri = train_uri or task.default_data
    check_builtins(task, (train_uri, eval_uri, test_uri))
    sources = task.sources(train_uri, eval_uri, test_uri)
    if merged:
        data, fmts, passes = merged["data"], merged["formats"], merged["passes"]
        report, usable = task.check(data, sources, fmts, {}, cfg, passes=passes)
    else:
        data, fmts, files = {}, {}, {}
        for split, uri in sources.items():
            data[split], fmts[split], files[split] = task.load(split, uri, cfg, settings, workdir or out_dir.parent)
        report, usable = task.check(data, sources, fmts, files, cfg)
    for split, uri in sources.items():
        parts = len(report.files.get(split) or [])
        log(STEP, f"{split}: {report.rows(split)} {task.row_unit} from {uri}" + (f" ({parts} files)" if parts > 1 else ""))
    for c in report.failures("warning"):
        log(STEP, f"warning: {report.describe(c, examples=2)}")
    if not report.passed:
        return report, None
    meta = task.prepare(usable, sources, cfg, out_dir)
    log(STEP, "splits: " + task.describe_splits(meta))
    return report, meta


# ---- fan-out ---------------------------------------------------------------------------------------


def plan_pieces(train_uri: str, eval_uri: str, test_uri: str, cfg: ValidateConfig, settings: S3Settings | None) -> tuple[list, dict]:
    """(pieces, plan): [WHOLE] and no plan unless the task fans out, a split is several files and the
    inputs hold more than fanout_mb; else each split's files in runs of about fanout_mb."""
    cfg.check()
    task = tasks.get(cfg.task)
    sources = task.sources(train_uri or task.default_data, eval_uri, test_uri)
    if not cfg.fanout_mb or not task.fans_out or any(assets.is_builtin(u) for u in sources.values()):
        return [WHOLE], {}
    listed = {split: formats.split_files(uri, settings) for split, uri in sources.items()}
    if all(len(files) == 1 for files, _ in listed.values()):
        return [WHOLE], {}
    sizes = {split: [file_size(f, settings) for f in files] for split, (files, _) in listed.items()}
    limit = int(cfg.fanout_mb * MB)
    if sum(map(sum, sizes.values())) <= limit:
        return [WHOLE], {}
    pieces = []
    for split, split_sizes in sizes.items():
        first, size = 0, 0
        for i, n in enumerate(split_sizes):
            if i > first and size + n > limit:
                pieces.append(str(Piece(split, first, i - first)))
                first, size = i, 0
            size += n
        pieces.append(str(Piece(split, first, len(split_sizes) - first)))
    files = sum(map(len, sizes.values()))
    check_count(pieces, f"fanout_mb={cfg.fanout_mb}: {files} files", "raise fanout_mb")
    return pieces, {"sources": sources, "formats": {s: fmt for s, (_, fmt) in listed.items()},
                    "files": {s: files for s, (files, _) in listed.items()}, "pieces": pieces}


def plan_step(*, store_uri: str, run_id: str, train_uri: str, eval_uri: str, test_uri: str, cfg: ValidateConfig) -> list[str]:
    """The pipeline's first task: the pieces validate fans out over ([WHOLE]: one task). A problem
    with the inputs is left to validate, which reports it as it would without a fan-out."""
    with step_context(f"{STEP}-plan", store_uri=store_uri, run_id=run_id, config={"train": train_uri, **asdict(cfg)}) as ctx:
        try:
            pieces, plan = plan_pieces(train_uri, eval_uri, test_uri, cfg, ctx.settings)
        except KubetuneError as e:
            log(STEP, f"no fan-out: {e}")
            pieces, plan = [WHOLE], {}
        if plan:
            ctx.store.write_json(join(pieces_prefix(ctx, STEP), PLAN), plan)
            log(STEP, f"{sum(map(len, plan['files'].values()))} files checked by {len(pieces)} parallel tasks")
        ctx.outputs["pieces"] = len(pieces)
    return pieces


def piece_step(*, store_uri: str, run_id: str, cfg: ValidateConfig, piece: str) -> str:
    """One fan-out task: the row-level checks and the index over the piece's files, its rows kept as
    Parquet, all published under the run for run_step to merge. WHOLE: nothing to do here."""
    if piece == WHOLE:
        return piece
    parsed = Piece.parse(piece)
    with step_context(f"{STEP}-{parsed}", store_uri=store_uri, run_id=run_id, config={"piece": piece, **asdict(cfg)}) as ctx:
        prefix = pieces_prefix(ctx, STEP)
        plan = _read_plan(ctx.store, prefix)
        files = plan["files"].get(parsed.split, [])[parsed.first:parsed.first + parsed.count]
        if len(files) != parsed.count:
            raise StoreError(f"validate piece {piece}: the plan {ctx.store.url(join(prefix, PLAN))} lists {len(files)} of its files")
        task = tasks.get(cfg.task)
        source, _, _ = task.load(parsed.split, plan["sources"][parsed.split], cfg, ctx.settings, ctx.scratch, part=files)
        folder = ctx.tmp("piece")
        done = task.check_piece(tables.RecordingSource(source, folder / "rows.parquet"), parsed.split, cfg)
        done.save(folder)
        ctx.store.publish_dir(folder, join(prefix, str(parsed)))  # False: an earlier try published the same piece
        rows = len(done.index)
        log(STEP, f"{parsed}: {rows} {task.row_unit} of {len(files)} file(s) checked")
        ctx.outputs.update(rows=rows, files=len(files))
    return piece


def _read_plan(store: Store, prefix: str) -> dict:
    try:
        return store.read_json(join(prefix, PLAN))
    except NotFound:
        raise NotFound(f"{store.url(join(prefix, PLAN))}: no fan-out plan under this run; plan it first (validate --plan, the "
                       "pipeline's validate-plan task) with the same store and run id") from None


def merge_pieces(store: Store, prefix: str, pieces: tuple[Piece, ...], workdir: Path) -> dict:
    """The pieces' passes merged per split, and their recorded rows as each split's source."""
    plan = _read_plan(store, prefix)
    data, passes = {}, {}
    for split, files in plan["files"].items():
        parts, done, covered, shift = [], [], 0, 0
        for piece in in_order(pieces, split):
            if piece.first != covered:
                break
            local = store.download_dir(join(prefix, str(piece)), workdir / str(piece))
            done.append(tables.SplitPass.load(local))
            parts.append((local / "rows.parquet", shift))
            covered, shift = covered + piece.count, shift + done[-1].end
        if covered != len(files):
            raise StoreError(f"the validate pieces of {split} under {store.url(prefix)} cover {covered} of its {len(files)} files "
                             f"(pieces given: {', '.join(str(p) for p in pieces if p.split == split) or 'none'}); rerun the pipeline")
        passes[split] = tables.merge_passes(done)
        data[split] = tables.PartsSource(parts, passes[split].located)
    return {"data": data, "formats": plan["formats"], "passes": passes}


def run_step(
    *, store_uri: str, run_id: str, train_uri: str, eval_uri: str, test_uri: str, cfg: ValidateConfig,
    dataset_dir: Path, report_path: Path, expectations_path: Path, model_name: str = "", pieces: list[str] | tuple = (),
) -> dict:
    """The step as the pipeline runs it; returns the dataset meta, with the registry name the run
    publishes under as "model_name" (given, or derived from the data). `pieces`: those the fan-out
    tasks checked (`piece_step`), merged here; empty or [WHOLE]: the inputs are read here."""
    return_freed_memory()  # RSS follows what the step holds (it streams the data)
    train_uri, model_name = resolve_inputs(cfg.task, train_uri, model_name)
    fanned = parse_pieces(pieces)
    config = {"train": train_uri, "eval": eval_uri, "test": test_uri, "model_name": model_name, **asdict(cfg)}
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config=config) as ctx:
        record = ctx.record
        record.write_json("run.json", {"run_id": record.run_id, "store": ctx.store.uri, "train": train_uri, "eval": eval_uri,
                                       "test": test_uri, "model_name": model_name, "validate": asdict(cfg)})
        prefix = pieces_prefix(ctx, STEP) if fanned else ""
        try:
            merged = merge_pieces(ctx.store, prefix, fanned, ctx.tmp("pieces")) if fanned else None
            report, meta = validate(train_uri, eval_uri, test_uri, cfg, dataset_dir, ctx.settings, ctx.scratch, merged)
        finally:  # validate is not retried: its pieces go, whatever happened
            if fanned:
                ctx.store.delete_prefix(prefix)
        ctx.outputs["pieces"] = len(fanned) or 1
        # the report is kept for failed runs too: it is what the user reads to fix the data
        markdown = report.markdown(meta)
        for path, text in ((report_path, markdown), (expectations_path, json.dumps(report.to_json(), indent=1, default=str))):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        ctx.outputs["report"] = record.write_text("validation/report.md", markdown)
        ctx.outputs["expectations"] = record.write_json("validation/expectations.json", report.to_json())
        if not report.passed:
            raise InputError(report.error_message())
        ctx.outputs["splits"] = {s: meta["splits"][s]["rows"] for s in SPLITS}
        ctx.outputs["labels"] = meta["labels"]
        ctx.outputs["fingerprints"] = {s: meta["splits"][s]["fingerprint"] for s in SPLITS}
        ctx.outputs["model_name"] = model_name
    return {**meta, "model_name": model_name}


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.validate", __doc__)
    p.add_argument("--train", default="", help="training data (required except with --piece)")
    p.add_argument("--eval", default="")
    p.add_argument("--test", default="")
    p.add_argument("--out", type=Path, help="dataset folder to write")
    p.add_argument("--report", type=Path)
    p.add_argument("--expectations", type=Path)
    p.add_argument("--name", default="", help="registry name the run publishes under; empty: derived from --train")
    fan = p.add_mutually_exclusive_group()  # the fan-out outside KFP (e.g. Argo, a shell): plan, a task per piece, then merge
    fan.add_argument("--plan", action="store_true",
                     help="plan the fan-out (--fanout-mb): plan.json under the run, its pieces printed as a JSON list (the last line)")
    fan.add_argument("--piece", default="", help="check this piece of the plan and publish it under the run")
    fan.add_argument("--pieces", default="", help="comma-separated: merge these published pieces (with --out, --report, --expectations)")
    add_config_args(p, ValidateConfig)
    a = p.parse_args(argv)
    cfg = config_from_args(ValidateConfig, a)
    if not a.piece and not a.train:
        p.error("--train is required (except with --piece)")
    if not (a.plan or a.piece) and not (a.out and a.report and a.expectations):
        p.error("--out, --report and --expectations are required (except with --plan and --piece)")
    if a.plan:
        return run_main(lambda: print(json.dumps(plan_step(store_uri=a.store, run_id=a.run_id, train_uri=a.train, eval_uri=a.eval,
                                                           test_uri=a.test, cfg=cfg))))
    if a.piece:
        return run_main(lambda: piece_step(store_uri=a.store, run_id=a.run_id, cfg=cfg, piece=a.piece))
    return run_main(lambda: run_step(
        store_uri=a.store, run_id=a.run_id, train_uri=a.train, eval_uri=a.eval, test_uri=a.test, cfg=cfg, dataset_dir=a.out,
        report_path=a.report, expectations_path=a.expectations, model_name=a.name, pieces=[x for x in a.pieces.split(",") if x],
    ))


if __name__ == "__main__":
    sys.exit(main())
