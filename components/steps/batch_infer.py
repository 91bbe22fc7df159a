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
  score    one shard: read its rows, reject bad ones with a reason (kubetune.storage.batch_input), sort
           the rest by length, tokenize the next batch in a thread while ONNX Runtime runs this
           one (all cores), and commit <output>/shards/<id>/ atomically: predictions.parquet,
           rejects.parquet, shard.json (the shard's manifest entry), sealed by _MANIFEST.json.
           A shard already committed is skipped: re-running after a crash redoes only the rest.
  collect  check every shard is committed and write <output>/manifest.json (files, totals, model).

predictions.parquet: id, source_file, source_row, label, score, prob_<label> for every class,
truncated (the text was longer than the model's max_length tokens). For a token-classification
(NER) model: id, source_file, source_row, entities (a JSON list of {"text", "type", "start", "end",
"score"}, character offsets into the input text), entity_count, truncated. Predictions come from
OnnxClassifier, the same code the online server answers with.
rejects.parquet: id, source_file, source_row, reason, text_head (the first 200 characters).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kubetune.release import registry
from kubetune.storage.batch_input import Row, list_inputs, read_rows
from kubetune.core.entry import config_from_args, run_main
from kubetune.errors import ConfigError, InputError
from kubetune.tasks.metrics import TOKEN
from kubetune.onnx.model import VARIANTS, OnnxClassifier
from kubetune.core.progress import Progress, log
from kubetune.storage.records import scratch
from kubetune.storage.store import NotFound, S3Settings, Store, fetch, join, open_store

STEP = "infer"
PLAN, MANIFEST = "plan.json", "manifest.json"


@dataclass(frozen=True)
class BatchConfig:
    text_column: str = "text"
    id_column: str = ""  # empty: ids are <file>:<row>
    variant: str = "auto"  # auto: the best accepted variant for the device (CPU: optimized, fp32); int8 on request
    shard_rows: int = 50_000
    batch_size: int = 64
    max_chars: int = 100_000  # longer texts are rejected; texts over max_length tokens are truncated
    device: str = "cpu"
    threads: int = 0  # ONNX Runtime intra-op threads; 0: every core this process may use

    def check(self) -> None:
        if self.variant != "auto" and self.variant not in VARIANTS:
            raise ConfigError(f"variant {self.variant!r}: use auto or one of {', '.join(VARIANTS)}")
        if self.shard_rows < 1 or self.batch_size < 1 or self.max_chars < 1:
            raise ConfigError("shard_rows, batch_size and max_chars must be >= 1")
        if not self.text_column:
            raise ConfigError("text_column must not be empty")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- plan ----------------------------------------------------------------------------------------


def make_plan(store: Store, model_ref: str, input_uri: str, output: Store, cfg: BatchConfig, settings: S3Settings | None) -> dict:
    """Shards for every input file, the pinned model version; reused when the output already has
    the same plan (a re-run), refused when it has a different one."""
    cfg.check()
    name, version = registry.resolve(store, model_ref)
    work = scratch(STEP)
    shards = []
    for uri in list_inputs(input_uri, settings):
        rows = len(read_rows(fetch(uri, settings, work), uri, cfg.text_column, cfg.id_column, cfg.max_chars))
        for start in range(0, rows, cfg.shard_rows):
            shards.append({"id": f"{len(shards):05d}", "file": uri, "start": start, "stop": min(start + cfg.shard_rows, rows)})
    if not shards:
        raise InputError(f"{input_uri}: the input files hold no data rows")
    plan = {"input": input_uri, "model_ref": model_ref, "config": asdict(cfg), "shards": shards}
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


# ---- score ---------------------------------------------------------------------------------------


def score_texts(clf: OnnxClassifier, texts: list[str], batch_size: int,
                on_batch: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, classes], truncated [n]) for `texts`, in their order. Rows are batched by
    length (little padding); the next batch is tokenized in a thread while ONNX Runtime runs the
    current one (both release the GIL). `on_batch(rows, seconds)` after each batch."""
    probs = np.zeros((len(texts), len(clf.labels)), dtype=np.float64)
    truncated = np.zeros(len(texts), dtype=bool)
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if not batches:
        return probs, truncated
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        pending = pool.submit(clf.encode, [texts[i] for i in batches[0]])
        for k, index in enumerate(batches):
            t0 = time.perf_counter()
            split, cut = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(clf.encode, [texts[i] for i in batches[k + 1]])
            probs[index] = clf.probabilities(clf.logits_for_tokens(split, batch_size=len(index)))
            truncated[index] = cut
            if on_batch:
                on_batch(len(index), time.perf_counter() - t0)
    return probs, truncated


def class_columns(clf: OnnxClassifier, probs: np.ndarray) -> dict:
    """Sequence classification: label, score and prob_<label> for every class."""
    top = probs.argmax(-1) if len(probs) else np.zeros(0, dtype=np.int64)
    out = {"label": [clf.labels[k] for k in top], "score": probs[np.arange(len(probs)), top] if len(probs) else np.zeros(0)}
    for j, label in enumerate(clf.labels):
        out[f"prob_{label}"] = probs[:, j]
    return out


def entity_columns(clf: OnnxClassifier, texts: list[str], batch_size: int) -> dict:
    """Token classification: the entities of each text (OnnxClassifier.entities, as serving returns)."""
    found = clf.entities(texts, batch_size)
    return {"entities": [json.dumps(e, ensure_ascii=False) for e in found], "entity_count": np.array([len(e) for e in found], dtype=np.int64)}


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
    """Scores the shards of one plan; loads the model once and keeps the last input file parsed
    (consecutive shards usually share a file)."""

    def __init__(self, plan: dict, output: Store, settings: S3Settings | None):
        self.plan, self.output, self.settings = plan, output, settings
        self.cfg = BatchConfig(**plan["config"])
        self.work = scratch(STEP)
        self._clf: OnnxClassifier | None = None
        self._file: tuple[str, list[Row]] | None = None

    @property
    def clf(self) -> OnnxClassifier:
        if self._clf is None:
            model_dir = fetch(self.plan["model"]["uri"], self.settings, self.work)
            self._clf = OnnxClassifier(model_dir, device=self.cfg.device, threads=self.cfg.threads or cores(), variant=self.cfg.variant)
            log(STEP, f"model {self.plan['model']['name']} {self.plan['model']['version']}, variant {self._clf.variant}, "
                      f"{self._clf.session.get_providers()[0]}, {self.cfg.threads or cores()} threads")
        return self._clf

    def rows(self, file: str) -> list[Row]:
        if self._file is None or self._file[0] != file:
            path = fetch(file, self.settings, self.work)
            self._file = (file, read_rows(path, file, self.cfg.text_column, self.cfg.id_column, self.cfg.max_chars))
        return self._file[1]

    def score(self, shard_id: str, progress: Progress | None = None) -> dict:
        prefix = join("shards", shard_id)
        if self.output.is_published(prefix):
            log(STEP, f"shard {shard_id}: already committed, skipped")
            return self.output.read_json(join(prefix, "shard.json"))
        shard = next((s for s in self.plan["shards"] if s["id"] == shard_id), None)
        if shard is None:
            raise InputError(f"shard {shard_id!r} is not in {self.output.url(PLAN)}")
        t0 = time.perf_counter()
        rows = self.rows(shard["file"])[shard["start"]:shard["stop"]]
        texts = [r.text for r in rows if r.text is not None]
        progress = progress or Progress(STEP, len(rows), "rows", label=f"shard {shard_id}")
        progress.update(len(rows) - len(texts))  # rejects are done too
        if self.clf.task == TOKEN:
            columns, truncated = entity_columns(self.clf, texts, self.cfg.batch_size), self.clf.encode(texts)[1]
            progress.update(len(texts))
        else:
            probs, truncated = score_texts(self.clf, texts, self.cfg.batch_size, lambda n, _s: progress.update(n))
            columns = class_columns(self.clf, probs)
        predictions, rejects = _frames(rows, shard["file"], columns, truncated)
        seconds = time.perf_counter() - t0
        entry = {**shard, "rows": len(rows), "predicted": len(predictions), "rejected": len(rejects), "truncated": int(truncated.sum()),
                 "seconds": round(seconds, 3), "rows_per_s": round(len(rows) / seconds, 1) if seconds else None,
                 "model_version": self.plan["model"]["version"], "variant": self.clf.variant,
                 "files": ["predictions.parquet"] + (["rejects.parquet"] if len(rejects) else [])}
        staging = self.work / f"shard-{shard_id}"
        staging.mkdir(parents=True, exist_ok=True)
        predictions.to_parquet(staging / "predictions.parquet", index=False)
        if len(rejects):
            rejects.to_parquet(staging / "rejects.parquet", index=False)
        (staging / "shard.json").write_text(json.dumps(entry, indent=2))
        self.output.publish_dir(staging, prefix)  # the commit: all of the shard or nothing
        log(STEP, f"shard {shard_id}: {len(predictions)} predicted, {len(rejects)} rejected, {entry['truncated']} truncated "
                  f"in {seconds:.1f}s ({entry['rows_per_s']} rows/s)")
        return entry


# ---- collect -------------------------------------------------------------------------------------


def collect(plan: dict, output: Store) -> dict:
    """Check every shard is committed and write the batch manifest."""
    missing = [s["id"] for s in plan["shards"] if not output.is_published(join("shards", s["id"]))]
    if missing:
        raise InputError(f"{output.uri}: {len(missing)} of {len(plan['shards'])} shards are not committed "
                         f"({', '.join(missing[:10])}); run the batch again to finish them")
    entries = [output.read_json(join("shards", s["id"], "shard.json")) for s in plan["shards"]]
    totals = {k: sum(e[k] for e in entries) for k in ("rows", "predicted", "rejected", "truncated")}
    manifest = {"input": plan["input"], "output": output.uri, "model": plan["model"], "variant": entries[0]["variant"],
                "fingerprint": plan["fingerprint"], "totals": totals, "shards": entries,
                "predictions": [output.url(join("shards", e["id"], "predictions.parquet")) for e in entries],
                "rejects": [output.url(join("shards", e["id"], "rejects.parquet")) for e in entries if e["rejected"]]}
    output.write_json(MANIFEST, manifest)
    log(STEP, f"{totals['rows']} rows: {totals['predicted']} predicted, {totals['rejected']} rejected, "
              f"{totals['truncated']} truncated; manifest {output.url(MANIFEST)}")
    return manifest


def run_batch(store_uri: str, model_ref: str, input_uri: str, output_uri: str, cfg: BatchConfig, settings: S3Settings | None) -> dict:
    """plan -> score every shard (committed ones skipped) -> collect, in this process."""
    store, output = open_store(store_uri, settings), open_store(output_uri, settings)
    plan = make_plan(store, model_ref, input_uri, output, cfg, settings)
    scorer = ShardScorer(plan, output, settings)
    todo = [s for s in plan["shards"] if not output.is_published(join("shards", s["id"]))]
    if len(todo) < len(plan["shards"]):
        log(STEP, f"{len(plan['shards']) - len(todo)} of {len(plan['shards'])} shards already committed: skipped")
    progress = Progress(STEP, sum(s["stop"] - s["start"] for s in todo), "rows")
    t0 = time.perf_counter()
    for shard in todo:
        scorer.score(shard["id"], progress)
    manifest = collect(plan, output)
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    return manifest


# ---- the pipeline's steps (one task each; S3 settings from the pod's environment) ------------------


def plan_step(*, store_uri: str, model_ref: str, input_uri: str, output_uri: str, cfg: BatchConfig) -> list[str]:
    settings = S3Settings.from_env()
    plan = make_plan(open_store(store_uri, settings), model_ref, input_uri, open_store(output_uri, settings), cfg, settings)
    return [s["id"] for s in plan["shards"]]


def score_step(*, output_uri: str, shard_id: str) -> str:
    settings = S3Settings.from_env()
    output = open_store(output_uri, settings)
    ShardScorer(output.read_json(PLAN), output, settings).score(shard_id)
    return shard_id


def collect_step(*, output_uri: str) -> str:
    output = open_store(output_uri, S3Settings.from_env())
    collect(output.read_json(PLAN), output)
    return output.url(MANIFEST)


def add_batch_args(p) -> None:
    p.add_argument("--store", default="./kubetune-store", help="store holding the model registry (local folder or s3://bucket/prefix)")
    p.add_argument("--model", required=True, help="models/<name>/<alias or version>, or <name> for its production alias")
    p.add_argument("--input", required=True, help="a file, folder or s3:// prefix of CSV/TSV/JSONL/Parquet files")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the predictions (re-use it to resume)")
    d = BatchConfig
    p.add_argument("--text-column", default=d.text_column, help="column (JSONL: field) holding the text")
    p.add_argument("--id-column", default=d.id_column, help="column copied to the predictions' id; empty: <file>:<row>")
    p.add_argument("--variant", default=d.variant, help="ONNX variant: auto (CPU: optimized > fp32), or int8 (fastest on CPU), fp32, ...")
    p.add_argument("--shard-rows", type=int, default=d.shard_rows, help="rows per shard (one commit, one pod in the pipeline)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per ONNX Runtime batch (sorted by length first)")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="longer texts are rejected; over max_length tokens they are truncated")
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"), help="ONNX Runtime provider (cuda never falls back silently)")
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime threads; 0: every core this process may use")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kubetune.steps.batch_infer", description=__doc__.strip().split("\n\n")[0])
    add_batch_args(p)
    a = p.parse_args(argv)
    return run_main(lambda: run_batch(a.store, a.model, a.input, a.output, config_from_args(BatchConfig, a), S3Settings.from_env()))


if __name__ == "__main__":
    sys.exit(main())
