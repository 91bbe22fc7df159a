"""Drift: compare data (a batch-inference input, a folder or an s3:// prefix of CSV/TSV/JSONL/Parquet
files) with the reference profile published with a registry version (profile.json, computed by
evaluate on the test split).

    kubetune drift --store ./kubetune-store --model sms-spam[@production|@<version>] --input s3://data/incoming/ \
        --out /tmp/kt/drift
    python -m kubetune.steps.drift --store ./kubetune-store --run-id dev --model sms-spam --input ... --out ...

Writes <out>/drift.json (the report: per-signal distances, thresholds, the domain classifier's
ROC AUC, the predicted-label shift and the verdict `drifted`) and <out>/drift.html (the same,
self-contained: inline SVG, no external resources). Signals and thresholds: kubetune.monitoring.drift.
Up to `max_rows` texts are profiled (a seeded sample of the valid rows); the model's own predictions
on them (the exported ONNX model, as batch inference and serving answer) feed the prediction signals.
Rows are read as batch inference reads them (kubetune.storage.inputs): a pair classifier's with
--text-pair-column, a multiple-choice model's question, choices (--choices-column, or choice_0 ..
choice_N columns) and optional context (--context-column).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kubetune.core.config import add_config_args, config_from_args, opt
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import log
from kubetune.errors import ConfigError, InputError
from kubetune.monitoring import drift, profile
from kubetune.release import registry
from kubetune.storage.inputs import CHOICES_DEFAULT, columns_problem
from kubetune.storage.store import S3Settings, Store, fetch

STEP = "drift"
REPORT_JSON, REPORT_HTML = "drift.json", "drift.html"


@dataclass(frozen=True)
class DriftConfig:
    text_column: str = opt("text", "column (JSONL: field) holding the text")
    text_pair_column: str = opt("", "pair classifiers: column (JSONL: field) holding each row's second text")
    choices_column: str = opt(CHOICES_DEFAULT, "multiple-choice models: column (JSONL: field) holding each question's list of "
                              "choices (CSV: a JSON list), or choice_0 .. choice_N columns when there is no such column; the "
                              "question is --text-column (`question` when that is left at `text` and there is no `text`)")
    context_column: str = opt("", "multiple-choice models: optional column (field) with a passage shared by the choices")
    max_rows: int = opt(5000, "texts (or logged requests) profiled at most: a seeded sample of the valid rows when there are more")
    max_chars: int = opt(100_000, "rows with a longer text are left out, as batch inference rejects them")
    seed: int = opt(0, "seed of the sample taken when there are more than --max-rows rows")

    def check(self) -> None:
        if self.max_rows < 20:
            raise ConfigError(f"max_rows={self.max_rows}: use at least 20 (the domain classifier needs 20 rows a side)")


def read_texts(input_uri: str, cfg: DriftConfig, settings: S3Settings | None, work: Path, task=None) -> list:
    """The valid rows' inputs (texts; tuples for a model that reads several fields: `task`, kubetune.tasks),
    a seeded sample of max_rows when there are more."""
    from kubetune.storage.inputs import list_inputs, read_rows

    texts = [r.text for uri in list_inputs(input_uri, settings)
             for r in read_rows(fetch(uri, settings, work), uri, cfg.text_column, "", cfg.max_chars, cfg.text_pair_column, task=task,
                                choices_column=cfg.choices_column, context_column=cfg.context_column)
             if r.text is not None]
    if not texts:
        raise InputError(f"{input_uri}: no valid text in column {cfg.text_column!r} (see --text-column)")
    if len(texts) > cfg.max_rows:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(texts))[:cfg.max_rows])
        texts = [texts[i] for i in keep]
    return texts


def load_reference(store: Store, ref: str, work: Path):
    """(name, version, model folder, reference profile) of a registry version."""
    name, version = registry.resolve(store, ref)
    local = registry.download(store, name, version, work / version)
    if not (local / "profile.json").is_file():
        raise InputError(f"{name} {version} has no profile.json (published before reference profiles existed): "
                         "retrain it, or check drift against a newer version")
    return name, version, local, json.loads((local / "profile.json").read_text())


def check_drift(clf, reference: dict, texts: list[str], thresholds: drift.Thresholds, about: dict) -> dict:
    """The drift report of `texts` and the model's predictions on them."""
    current = profile.build(clf, texts)
    rep = drift.report(reference, current, thresholds, about)
    log(STEP, f"{'DRIFTED' if rep['drifted'] else 'no drift'}: {len(texts)} rows vs {rep['reference_rows']} reference rows"
              + (f"; signals over threshold: {', '.join(rep['drifted_signals'])}" if rep["drifted"] else ""))
    return rep


def read_logged_features(input_uri: str, cfg: DriftConfig, settings: S3Settings | None, work: Path) -> list[dict] | None:
    """The records of a features-mode `kubetune serve --request-log` prefix (up to max_rows, a seeded
    sample), or None when the input is data with texts (a texts-mode log is read as texts)."""
    from kubetune.serving.requestlog import read_feature_records
    from kubetune.storage.inputs import list_inputs

    uris = list_inputs(input_uri, settings)
    if not all(u.endswith(".jsonl") for u in uris):
        return None
    # look at the first file before fetching the rest: a data set of texts is then fetched once, by read_texts
    if read_feature_records([fetch(uris[0], settings, work)], uris[:1]) is None:
        return None
    records = read_feature_records([fetch(u, settings, work) for u in uris], uris)
    if records is not None and len(records) > cfg.max_rows:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(records))[:cfg.max_rows])
        records = [records[i] for i in keep]
    return records


def drift_of_features(clf, reference: dict, records: list[dict], thresholds: drift.Thresholds, about: dict) -> dict:
    """The drift report of logged features and the predictions served then (nothing is recomputed)."""
    current = profile.from_features(clf.task, clf.labels, clf.max_length, [r["features"] for r in records],
                                    [r["prediction"] for r in records])
    rep = drift.report(reference, current, thresholds, about)
    log(STEP, f"{'DRIFTED' if rep['drifted'] else 'no drift'}: {len(records)} logged requests' features vs "
              f"{rep['reference_rows']} reference rows")
    return rep


def write_report(rep: dict, out_dir: Path) -> None:
    from kubetune.monitoring.report import drift_html

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(rep, indent=2))
    (out_dir / REPORT_HTML).write_text(drift_html(rep))


def run_drift(store: Store, ref: str, input_uri: str, out_dir: Path, cfg: DriftConfig, thresholds: drift.Thresholds,
              settings: S3Settings | None, work: Path) -> dict:
    from kubetune.onnx.model import OnnxClassifier

    cfg.check()
    thresholds.check()
    name, version, local, reference = load_reference(store, ref, work)
    about = {"model": f"{name}/{version}", "input": input_uri}
    clf = OnnxClassifier(local)
    logged = read_logged_features(input_uri, cfg, settings, work)
    if logged is not None:  # a features-mode serving request log: the texts were never stored
        rep = drift_of_features(clf, reference, logged, thresholds, about)
    else:
        if fix := columns_problem(clf.task, cfg.text_pair_column, cfg.choices_column, cfg.context_column):
            raise InputError(f"model {name} is a {clf.task.name} model, which reads {' and '.join(clf.task.input_fields)}: {fix}")
        rep = check_drift(clf, reference, read_texts(input_uri, cfg, settings, work, clf.task), thresholds, about)
    write_report(rep, out_dir)
    return rep


def run_step(*, store_uri: str, run_id: str, ref: str, input_uri: str, out_dir: Path, cfg: DriftConfig,
             thresholds: drift.Thresholds) -> dict:
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config={"model": ref, "input": input_uri, **asdict(cfg)}) as ctx:
        rep = run_drift(ctx.store, ref, input_uri, out_dir, cfg, thresholds, ctx.settings, ctx.scratch)
        ctx.outputs.update(drifted=rep["drifted"], drifted_signals=rep["drifted_signals"], model=rep["model"])
    return rep


def add_drift_args(p) -> None:
    p.add_argument("--model", required=True, help=f"registry model: {registry.REF_FORMS} (NAME: its production alias)")
    p.add_argument("--input", required=True, help="a data file, folder or s3:// prefix of CSV/TSV/JSONL/Parquet files")
    p.add_argument("--out", required=True, type=Path, help="folder for drift.json and drift.html")
    add_config_args(p, DriftConfig)
    add_config_args(p, drift.Thresholds)


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.drift", __doc__)
    add_drift_args(p)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, ref=a.model, input_uri=a.input, out_dir=a.out,
                                     cfg=config_from_args(DriftConfig, a), thresholds=config_from_args(drift.Thresholds, a)))


if __name__ == "__main__":
    sys.exit(main())
