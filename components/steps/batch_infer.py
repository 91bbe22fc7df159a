"""Batch inference: score every CSV/TSV/JSONL/Parquet file under an input prefix with a registry
model and write Parquet predictions under an output prefix, in resumable shards.

    python -m kubetune.steps.batch_infer --store ./kubetune-store --model models/sms-spam/production \
        --input s3://data/incoming/ --output s3://data/scored/2026-11-23/

Three stages (the `batch-inference` KFP pipeline runs them as tasks, one pod per shard; this entry
point and `kubetune infer` run them in one process):
  plan     list the input files, cut them into shards of `shard_rows` rows, pin the model version
           (`models/<name>/production` is resolved once, so every shard uses the same model even
           if the alias moves mid-run) and write <output>/plan.json. A re-run finds the same plan
           and continues it; a different input or setting under the same output is an error.
  score    one shard: read its rows, reject bad ones with a reason (read leniently by kubetune.storage.formats), sort
           the rest by length, tokenize the next batch in a thread while ONNX Runtime runs this
           one (all cores), and commit <output>/shards/<id>/ atomically: predictions.parquet,
           rejects.parquet, shard.json (the shard's manifest entry), sealed by _MANIFEST.json.
           A shard already committed is skipped: re-running after a crash redoes only the rest.
  collect  check every shard is committed and write <output>/manifest.json (files, totals, model).

predictions.parquet: id, source_file, source_row, label, score, prob_<label> for every class,
truncated (the text was longer than the model's max_length tokens). For a token classifier (NER):
id, source_file, source_row, entities (a JSON list of {"text", "type", "start", "end", "score"},
character offsets into the input text), entity_count, truncated. For a multiple-choice model (rows
of a question, its choices and an optional context: kubetune.storage.inputs): id, source_file,
source_row, answer (0-based), letter, choice, score, prob_A .. (empty past a row's choices),
truncated. The columns are the task's
(kubetune.tasks: output_columns); predictions come from OnnxClassifier.score (kubetune.tasks.predictor), the
same path the online server answers with.
rejects.parquet: id, source_file, source_row, reason, text_head (the first 200 characters).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kubetune.core.config import add_config_args, config_from_args, opt
from kubetune.core.context import add_store_arg, run_main, step_context
from kubetune.core.progress import Progress, log
from kubetune.core.system import usable_cpus
from kubetune.errors import ConfigError, InputError
from kubetune.monitoring import profile
from kubetune.onnx.model import VARIANTS, OnnxClassifier
from kubetune.release import registry
from kubetune.storage.contracts import MODEL_SETTINGS, ModelSettings
from kubetune.storage.inputs import CHOICES_DEFAULT, Row, columns_problem, iter_rows, list_inputs
from kubetune.storage.store import NotFound, S3Settings, Store, fetch, join, open_store

STEP = "infer"
PLAN, MANIFEST, PROFILE = "plan.json", "manifest.json", "profile.json"
DRIFT_JSON, DRIFT_HTML = "drift.json", "drift.html"
# settings added after plans were first written: left out of a plan's config at their defaults, so a
# plan written before them keeps its fingerprint (its batch can still be resumed)
LATER_FIELDS = ("choices_column", "context_column")


@dataclass(frozen=True)
class BatchConfig:
    text_column: str = opt("text", "column (JSONL: field) holding the text")
    text_pair_column: str = opt("", "pair classifiers: column (JSONL: field) holding each row's second text")
    choices_column: str = opt(CHOICES_DEFAULT, "multiple-choice models: column (JSONL: field) holding each question's list of "
                              "choices (CSV: a JSON list), or choice_0 .. choice_N columns when there is no such column; the "
                              "question is --text-column (`question` when that is left at `text` and there is no `text`)")
    context_column: str = opt("", "multiple-choice models: optional column (field) with a passage shared by the choices")
    id_column: str = opt("", "column copied to the predictions' id; empty: <file>:<row>")
    variant: str = opt("auto", "ONNX variant: auto (CPU: optimized > fp32), or int8 (fastest on CPU), fp32, ...")
    shard_rows: int = opt(50_000, "rows per shard (one commit, one pod in the pipeline)")
    batch_size: int = opt(64, "rows per ONNX Runtime batch (sorted by length first)")
    max_chars: int = opt(100_000, "longer texts are rejected; over max_length tokens they are truncated")
    device: str = opt("cpu", "ONNX Runtime provider: cpu or cuda (cuda never falls back silently)", choices=("cpu", "cuda"))
    threads: int = opt(0, "ONNX Runtime threads; 0: every core this process may use")

    def check(self) -> None:
        if self.variant != "auto" and self.variant not in VARIANTS:
            raise ConfigError(f"variant {self.variant!r}: use auto or one of {', '.join(VARIANTS)}")
        if self.shard_rows < 1 or self.batch_size < 1 or self.max_chars < 1:
            raise ConfigError("shard_rows, batch_size and max_chars must be >= 1")
        if not self.text_column:
            raise ConfigError("text_column must not be empty")


# ---- plan ----------------------------------------------------------------------------------------


def make_plan(store: Store, model_ref: str, input_uri: str, output: Store, cfg: BatchConfig, settings: S3Settings | None,
              work: Path) -> dict:
    """Shards for every input file, the pinned model version; reused when the output already has
    the same plan (a re-run), refused when it has a different one."""
    cfg.check()
    name, version = registry.resolve(store, model_ref)
    task = model_task(store, name, version, settings, work)
    if task is not None:
        check_columns(task, cfg, name)
    shards = []
    for uri in list_inputs(input_uri, settings):
        rows = sum(1 for _ in _read(fetch(uri, settings, work), uri, cfg, task))  # counted as read: memory flat in the file
        for start in range(0, rows, cfg.shard_rows):
            shards.append({"id": f"{len(shards):05d}", "file": uri, "start": start, "stop": min(start + cfg.shard_rows, rows)})
    if not shards:
        raise InputError(f"{input_uri}: the input files hold no data rows")
    config = {k: v for k, v in asdict(cfg).items() if k not in LATER_FIELDS or v != getattr(BatchConfig, k)}
    plan = {"input": input_uri, "model_ref": model_ref, "config": config, "shards": shards}
    plan["fingerprint"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    plan["model"] = {"name": name, "version": version, "uri": store.url(registry.version_prefix(name, version))}
    try:
        existing = output.read_json(PLAN)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.get("fingerprint") != plan["fingerprint"]:
            raise InputError(f"{output.url(PLAN)} belongs to another batch (input {existing.get('input')}, model "
                             f"{existing.get('model_ref')}, other files or settings); use a new --output prefix")
        log(STEP, f"resuming the plan in {output.url(PLAN)} (model {existing['model']['name']} {existing['model']['version']})")
        return existing
    output.write_json(PLAN, plan)
    log(STEP, f"plan: {len(shards)} shards of <= {cfg.shard_rows} rows from {len({s['file'] for s in shards})} files; "
              f"model {name} {version}")
    return plan


def model_task(store: Store, name: str, version: str, settings: S3Settings | None, work: Path):
    """The task (kubetune.tasks) of a registry version, from its settings file alone (the plan needs
    it to read the rows, not the model); None when the version has none (the scorer then says why)."""
    from kubetune import tasks

    try:
        path = fetch(store.url(join(registry.version_prefix(name, version), MODEL_SETTINGS)), settings, work)
    except (InputError, NotFound):
        return None
    return tasks.get(ModelSettings.read(path.parent, tasks.DEFAULT).task)


def check_columns(task, cfg: BatchConfig, model: str) -> None:
    """The column options must fit what the model reads (a second text for a pair classifier, ...)."""
    fix = columns_problem(task, cfg.text_pair_column, cfg.choices_column, cfg.context_column)
    if fix:
        raise InputError(f"model {model} is a {task.name} model, which reads {' and '.join(task.input_fields)}: {fix}")


def _read(path: Path, uri: str, cfg: BatchConfig, task) -> Iterator[Row]:
    return iter_rows(path, uri, cfg.text_column, cfg.id_column, cfg.max_chars, cfg.text_pair_column, task=task,
                     choices_column=cfg.choices_column, context_column=cfg.context_column)


# ---- score ---------------------------------------------------------------------------------------


def _frames(rows: list[Row], file: str, columns: dict, truncated: np.ndarray):
    import pandas as pd

    ok = [r for r in rows if r.text is not None]
    pred = {"id": [r.id for r in ok], "source_file": [file] * len(ok), "source_row": np.array([r.source_row for r in ok], dtype=np.int64),
            **columns, "truncated": truncated}
    bad = [r for r in rows if r.text is None]
    rejects = pd.DataFrame({"id": [r.id for r in bad], "source_file": [file] * len(bad),
                            "source_row": np.array([r.source_row for r in bad], dtype=np.int64),
                            "reason": [r.reason for r in bad], "text_head": [r.head for r in bad]})
    return pd.DataFrame(pred), rejects


class ShardScorer:
    """Scores the shards of one plan; loads the model once. Only a shard's rows are held: the input
    file is read on from where the last shard ended (consecutive shards usually share a file), or
    from its start for a shard before that (a pod scoring one shard skips the rows before it)."""

    def __init__(self, plan: dict, output: Store, settings: S3Settings | None, work: Path):
        self.plan, self.output, self.settings, self.work = plan, output, settings, work
        self.cfg = BatchConfig(**plan["config"])
        self._clf: OnnxClassifier | None = None
        self._reading: tuple[str, int, Iterator[Row]] | None = None  # (file, next row's position, rows)

    @property
    def clf(self) -> OnnxClassifier:
        if self._clf is None:
            model_dir = fetch(self.plan["model"]["uri"], self.settings, self.work)
            threads = self.cfg.threads or usable_cpus()
            self._clf = OnnxClassifier(model_dir, device=self.cfg.device, threads=threads, variant=self.cfg.variant)
            check_columns(self._clf.task, self.cfg, self.plan["model"]["name"])
            log(STEP, f"model {self.plan['model']['name']} {self.plan['model']['version']}, variant {self._clf.variant}, "
                      f"{self._clf.kernels}, {threads} threads")
        return self._clf

    def rows(self, file: str, start: int, stop: int) -> list[Row]:
        """Rows [start, stop) of `file` (positions among its data rows, as the plan counted them)."""
        if self._reading is None or self._reading[0] != file or self._reading[1] > start:
            self._reading = (file, 0, _read(fetch(file, self.settings, self.work), file, self.cfg, self.clf.task))
        _, at, rows = self._reading
        for _ in itertools.islice(rows, start - at):  # skipped, not kept
            pass
        shard = list(itertools.islice(rows, stop - start))
        self._reading = (file, start + len(shard), rows)
        return shard

    def score(self, shard_id: str, progress: Progress | None = None) -> dict:
        prefix = join("shards", shard_id)
        if self.output.is_published(prefix):
            log(STEP, f"shard {shard_id}: already committed, skipped")
            return self.output.read_json(join(prefix, "shard.json"))
        shard = next((s for s in self.plan["shards"] if s["id"] == shard_id), None)
        if shard is None:
            raise InputError(f"shard {shard_id!r} is not in {self.output.url(PLAN)}")
        t0 = time.perf_counter()
        rows = self.rows(shard["file"], shard["start"], shard["stop"])
        texts = [r.text for r in rows if r.text is not None]
        progress = progress or Progress(STEP, len(rows), "rows", label=f"shard {shard_id}")
        progress.update(len(rows) - len(texts))  # rejects are done too
        scored = self.clf.score(texts, self.cfg.batch_size, lambda n, _s: progress.update(n))  # the one prediction path
        columns = self.clf.task.output_columns([s.prediction for s in scored], self.clf.labels)
        truncated = np.array([s.truncated for s in scored], dtype=bool)
        predictions, rejects = _frames(rows, shard["file"], columns, truncated)
        seconds = time.perf_counter() - t0
        entry = {**shard, "rows": len(rows), "predicted": len(predictions), "rejected": len(rejects), "truncated": int(truncated.sum()),
                 "seconds": round(seconds, 3), "rows_per_s": round(len(rows) / seconds, 1) if seconds else None,
                 "model_version": self.plan["model"]["version"], "variant": self.clf.variant, "kernels": self.clf.kernels,
                 "files": ["predictions.parquet"] + (["rejects.parquet"] if len(rejects) else [])}
        staging = self.work / f"shard-{shard_id}"
        staging.mkdir(parents=True, exist_ok=True)
        predictions.to_parquet(staging / "predictions.parquet", index=False)
        if len(rejects):
            rejects.to_parquet(staging / "rejects.parquet", index=False)
        # the shard's profile: collect merges them into the batch's drift report (no second model pass)
        shard_profile = profile.build(self.clf, texts, scored=scored)
        (staging / PROFILE).write_text(json.dumps(shard_profile))
        entry["files"].append(PROFILE)
        (staging / "shard.json").write_text(json.dumps(entry, indent=2))
        self.output.publish_dir(staging, prefix)  # the commit: all of the shard or nothing
        log(STEP, f"shard {shard_id}: {len(predictions)} predicted, {len(rejects)} rejected, {entry['truncated']} truncated "
                  f"in {seconds:.1f}s ({entry['rows_per_s']} rows/s)")
        return entry


# ---- collect -------------------------------------------------------------------------------------


def collect(plan: dict, output: Store, settings: S3Settings | None = None) -> dict:
    """Check every shard is committed and write the batch manifest."""
    missing = [s["id"] for s in plan["shards"] if not output.is_published(join("shards", s["id"]))]
    if missing:
        raise InputError(f"{output.uri}: {len(missing)} of {len(plan['shards'])} shards are not committed "
                         f"({', '.join(missing[:10])}); run the batch again to finish them")
    entries = [output.read_json(join("shards", s["id"], "shard.json")) for s in plan["shards"]]
    totals = {k: sum(e[k] for e in entries) for k in ("rows", "predicted", "rejected", "truncated")}
    manifest = {"input": plan["input"], "output": output.uri, "model": plan["model"], "variant": entries[0]["variant"],
                "kernels": entries[0].get("kernels", ""),
                "fingerprint": plan["fingerprint"], "totals": totals, "shards": entries,
                "predictions": [output.url(join("shards", e["id"], "predictions.parquet")) for e in entries],
                "rejects": [output.url(join("shards", e["id"], "rejects.parquet")) for e in entries if e["rejected"]]}
    manifest["drift"] = batch_drift(plan, entries, output, settings)
    manifest["drifted"] = manifest["drift"].get("drifted")
    output.write_json(MANIFEST, manifest)
    log(STEP, f"{totals['rows']} rows: {totals['predicted']} predicted, {totals['rejected']} rejected, "
              f"{totals['truncated']} truncated; manifest {output.url(MANIFEST)}")
    return manifest


def batch_drift(plan: dict, entries: list[dict], output: Store, settings: S3Settings | None) -> dict:
    """The batch's drift report against the model version's reference profile: the shards' profiles
    merged, written as <output>/drift.json and drift.html. {"drifted": None, "skipped": why} for a
    version published before profiles existed, or shards scored before they were kept."""
    from kubetune.monitoring import drift
    from kubetune.monitoring.report import drift_html

    version = open_store(plan["model"]["uri"], settings)
    if not version.exists(PROFILE):
        return {"drifted": None, "skipped": f"{plan['model']['name']} {plan['model']['version']} has no reference profile"}
    shards = [e for e in entries if PROFILE in e["files"] and e["predicted"]]
    if not shards:
        return {"drifted": None, "skipped": "no shard holds a profile (scored before profiles were kept, or no valid rows)"}
    current = profile.merge([output.read_json(join("shards", e["id"], PROFILE)) for e in shards])
    rep = drift.report(version.read_json(PROFILE), current, drift.Thresholds(),
                       {"model": f"{plan['model']['name']}/{plan['model']['version']}", "input": plan["input"]})
    output.write_json(DRIFT_JSON, rep)
    output.write_text(DRIFT_HTML, drift_html(rep))
    log(STEP, f"drift: {'DRIFTED (' + ', '.join(rep['drifted_signals']) + ')' if rep['drifted'] else 'none'}; "
              f"report {output.url(DRIFT_HTML)}")
    return {"drifted": rep["drifted"], "drifted_signals": rep["drifted_signals"], "report": output.url(DRIFT_JSON),
            "html": output.url(DRIFT_HTML)}


def open_stores(store_uri: str, model_ref: str, output_uri: str, settings: S3Settings | None) -> tuple[Store, Store]:
    """(model store, output store): the store must exist and the reference resolve
    before the output is opened, so a bad --store or --model leaves no empty --output folder behind."""
    store = open_store(store_uri, settings, create=False)
    registry.resolve(store, model_ref)
    return store, open_store(output_uri, settings)


def run_batch(store_uri: str, model_ref: str, input_uri: str, output_uri: str, cfg: BatchConfig) -> dict:
    """plan -> score every shard (committed ones skipped) -> collect, in this process."""
    with step_context(STEP) as ctx:
        store, output = open_stores(store_uri, model_ref, output_uri, ctx.settings)
        plan = make_plan(store, model_ref, input_uri, output, cfg, ctx.settings, ctx.tmp("plan"))
        scorer = ShardScorer(plan, output, ctx.settings, ctx.tmp("score"))
        todo = [s for s in plan["shards"] if not output.is_published(join("shards", s["id"]))]
        if len(todo) < len(plan["shards"]):
            log(STEP, f"{len(plan['shards']) - len(todo)} of {len(plan['shards'])} shards already committed: skipped")
        progress = Progress(STEP, sum(s["stop"] - s["start"] for s in todo), "rows")
        t0 = time.perf_counter()
        for shard in todo:
            scorer.score(shard["id"], progress)
        manifest = collect(plan, output, ctx.settings)
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    return manifest


# ---- the pipeline's steps (one task each; S3 settings from the pod's environment) ------------------


def plan_step(*, store_uri: str, model_ref: str, input_uri: str, output_uri: str, cfg: BatchConfig) -> list[str]:
    with step_context("batch-plan") as ctx:
        store, output = open_stores(store_uri, model_ref, output_uri, ctx.settings)
        plan = make_plan(store, model_ref, input_uri, output, cfg, ctx.settings, ctx.scratch)
    return [s["id"] for s in plan["shards"]]


def score_step(*, output_uri: str, shard_id: str) -> str:
    with step_context("batch-score") as ctx:
        output = open_store(output_uri, ctx.settings)
        ShardScorer(output.read_json(PLAN), output, ctx.settings, ctx.scratch).score(shard_id)
    return shard_id


def collect_step(*, output_uri: str, html_path: Path | None = None, log_metric=None) -> tuple[str, bool]:
    """(the manifest's URI, whether the batch drifted: false when it could not be checked, see
    manifest.json). `html_path` gets a copy of drift.html and `log_metric(name, value)` the drift
    scalars (the pipeline's HTML and Metrics artifacts)."""
    from kubetune.monitoring import drift
    from kubetune.monitoring.report import page

    with step_context("batch-collect") as ctx:
        output = open_store(output_uri, ctx.settings)
        manifest = collect(output.read_json(PLAN), output, ctx.settings)
        checked = manifest["drifted"] is not None
        if html_path is not None:
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(output.read_bytes(DRIFT_HTML).decode() if checked else
                                 page("Drift report", [f"<p>Not checked: {manifest['drift']['skipped']}.</p>"]))
        if log_metric is not None and checked:
            for key, value in drift.kfp_metrics(output.read_json(DRIFT_JSON)).items():
                log_metric(key, value)
    return output.url(MANIFEST), bool(manifest["drifted"])


def add_batch_args(p) -> None:
    add_store_arg(p, help="the model registry")
    p.add_argument("--model", required=True, help=f"registry model: {registry.REF_FORMS} (NAME: its production alias)")
    p.add_argument("--input", required=True, help="a file, folder or s3:// prefix of CSV/TSV/JSONL/Parquet files")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the predictions (re-use it to resume)")
    add_config_args(p, BatchConfig)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kubetune.steps.batch_infer", description=__doc__.strip().split("\n\n")[0])
    add_batch_args(p)
    a = p.parse_args(argv)
    return run_main(lambda: run_batch(a.store, a.model, a.input, a.output, config_from_args(BatchConfig, a)))


if __name__ == "__main__":
    sys.exit(main())
