"""Sequence classification: one label per text (spam/ham, sentiment, topic, intent, ...).

Everything that is particular to the task lives here; the steps call it through the Task interface
(kubetune.tasks.base). Data: CSV/TSV/JSONL/Parquet tables with a text and a label column, checked
with great-expectations (kubetune.validation.tables). Model: AutoModelForSequenceClassification,
cross-entropy per row. Metrics: accuracy, macro/weighted F1, macro precision/recall, per-class
scores and the confusion matrix; the gate defaults to macro-F1. Predictions:
{"label", "score", "probabilities": {label: p}} per text; batch columns label, score, prob_<label>.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kubetune.monitoring.profile import CONFIDENCE_EDGES
from kubetune.storage import formats
from kubetune.storage.contracts import ModelInputs
from kubetune.tasks import base, encoding
from kubetune.tasks.metrics import CLASSIFICATION_METRICS, classification_metrics
from kubetune.tasks.predictor import softmax
from kubetune.validation import splits, tables
from kubetune.validation.report import SPLITS, Report


class SequenceClassification:
    name = "sequence-classification"
    summary = "a label per text"
    formats = formats.TABLES
    default_data = "builtin:sms-spam"
    row_unit = "rows"
    metrics = CLASSIFICATION_METRICS
    gate_only_metrics = ()
    default_metric = "macro_f1"
    headline = ("accuracy", "macro_f1")  # logs, the epoch history, step outputs, commit messages
    summary_metrics = ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix")
    peft_task_type = "SEQ_CLS"
    head_modules = ()
    input_axes = ("batch", "sequence")
    per_token = False  # one logit row per text
    segments = 1  # one text per row
    input_fields = ("text",)
    list_fields: tuple[str, ...] = ()  # input fields holding a list of texts (multiple choice's choices)
    optional_fields: tuple[str, ...] = ()  # input fields that may be absent
    # --epochs 0: at least 100 optimizer steps, at most 10 epochs. Warm-up and linear decay over a dozen
    # steps teach nothing (a 500-row SMS sample trained 13 steps and predicted one class); early stopping
    # waits for 50 steps: a 300-row sample scored "always ham" for its first 2 epochs (16 steps)
    auto_min_steps = 100
    auto_max_epochs = 10

    # ---- validate ------------------------------------------------------------------------------
    def sources(self, train: str, eval_: str, test: str) -> dict[str, str]:
        return base.given_sources(train, eval_, test)

    fans_out = True  # large inputs: its rows are checked by parallel tasks over the files (kubetune.steps.validate)

    def load(self, split: str, uri: str, cfg, settings, workdir: Path, part: list[str] | None = None):
        """The split's table as a source of record batches (read by check, and again by prepare);
        `part`: only these of its files (a fan-out piece)."""
        source, fmt = tables.table_source(uri, columns={"text": cfg.text_column, "label": cfg.label_column}, header=cfg.header,
                                          settings=settings, workdir=workdir, part=part)
        return source, fmt, []

    def view(self, source):
        """The rows as the table checks see them (a pair: joined into one key)."""
        return source

    def row_checks(self, cfg) -> tuple:
        """Its own row-level rules beside the expectations (kubetune.validation.tables.RowCheck)."""
        return ()

    def check_piece(self, source, split: str, cfg) -> tables.SplitPass:
        """The row-level pass over a fan-out piece's files (merged by `check` through `passes`)."""
        return tables.check_pass(self.view(source), split, cfg, self.row_checks(cfg))

    def check(self, data: dict, sources: dict, formats_: dict, files: dict, cfg, passes: dict | None = None) -> tuple[Report, dict]:
        report, indexes = tables.check_tables({s: self.view(src) for s, src in data.items()}, sources, formats_, cfg, files,
                                              self.row_checks(cfg), passes)
        return report, {s: splits.CheckedTable(data[s], indexes[s]) for s in data}

    columns = ("text", "label")  # what a split's Parquet file holds (with source_row) and its fingerprint covers

    def prepare(self, usable: dict, sources: dict, cfg, out_dir: Path) -> dict:
        """Subsample, split (stratified, seeded, grouped by text) and write the dataset folder, a
        record batch at a time (kubetune.validation.splits)."""
        plan = splits.plan_tables(usable, cfg)
        meta = base.new_meta(self, plan.labels, sources, plan.missing, cfg)
        meta["splits"] = splits.write_tables(self, usable, plan, out_dir)
        base.write_meta(out_dir, meta)
        return meta

    def split_counts(self, frame) -> dict:
        """Counts a split's meta carries beside its rows and classes (none for single texts). `frame`:
        the split's grouping texts ("text", as 8-byte hashes)."""
        return {}

    def describe_splits(self, meta: dict) -> str:
        return ", ".join(f"{s} {meta['splits'][s]['rows']}" for s in SPLITS) + f"; labels {meta['labels']}"

    # ---- tokenize ------------------------------------------------------------------------------
    def tokenize(self, tokenizer, frame, label_ids: dict, cfg, progress) -> base.Tokenized:
        """Token ids per text, truncated to max_length; the rows truncated and the tokens that cost."""
        texts = frame["text"].tolist()
        rows: list[list[int]] = []
        truncated = lost = 0
        for start in range(0, len(texts), cfg.batch_size):
            batch = texts[start:start + cfg.batch_size]
            # the one encoder (kubetune.tasks.encoding), so serving and batch inference cut as training did
            ids, cut, dropped = encoding.encode_texts(tokenizer, batch, cfg.max_length, cfg.truncation)
            rows += ids
            truncated += int(cut.sum())
            lost += dropped
            progress.update(len(batch))
        labels = frame["label"].map(label_ids).to_numpy(dtype=np.int64)
        return base.Tokenized(rows, labels, None, {"truncated_rows": truncated, "truncated_tokens": lost})

    def tokenize_notes(self, split: str, stats: dict, rows: int, max_length: int) -> list[str]:
        if not stats["truncated_rows"]:
            return []
        return [f"{split}: {stats['truncated_rows']} of {rows} texts truncated to {max_length} tokens "
                f"({stats['truncated_tokens']} tokens dropped)"]

    # ---- monitor (kubetune.monitoring) ---------------------------------------------------------
    def profile_texts(self, frame) -> list[str]:
        """The texts of a dataset split as the model reads them (coverage check, reference profile)."""
        return frame["text"].astype(str).tolist()

    def profile_outputs(self, predictions: list[dict], labels: list[str]) -> dict:
        """The profile's prediction signals: predicted-label counts and the top-label confidence."""
        counts = dict.fromkeys(labels, 0)
        for p in predictions:
            counts[p["label"]] += 1
        return {"distributions": {"predicted_label": counts},
                "histograms": {"confidence": ([p["score"] for p in predictions], CONFIDENCE_EDGES)}}

    def profile_gold(self, frame, labels: list[str]) -> dict:
        counts = frame["label"].value_counts()
        return {"label": {k: int(counts.get(k, 0)) for k in labels}}

    # ---- model ---------------------------------------------------------------------------------
    def model_class(self):
        import transformers

        return transformers.AutoModelForSequenceClassification

    model_purpose = "classify sequences"

    truncations = encoding.TRUNCATIONS

    def loss(self, logits, target, inputs=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), target)

    def targets(self, split) -> np.ndarray:
        """The gold label of each logit row (`predict_logits`' rows)."""
        return split.labels

    def scores(self, logits: np.ndarray, split, labels: list[str]) -> dict:
        """Metrics of row logits against the split's labels (best-epoch selection, variant checks)."""
        return classification_metrics(split.labels, logits.argmax(-1), labels)

    # ---- evaluate ------------------------------------------------------------------------------
    def test_metrics(self, logits: np.ndarray, split, frame, labels: list[str], settings: dict) -> tuple[dict, list, object]:
        """(test metrics, the rows a champion is re-scored on, their gold labels); `settings`: validate's
        configuration as the dataset's meta.json records it."""
        return self.scores(logits, split, labels), frame["text"].tolist(), split.labels

    def champion_metrics(self, predictor, rows: list, gold, labels: list[str]) -> dict:
        index = {label: k for k, label in enumerate(labels)}
        predicted = np.array([index[p["label"]] for p in predictor.predict(rows)], dtype=np.int64)
        return classification_metrics(gold, predicted, labels)

    def describe_test(self, m: dict) -> str:
        """One line of test figures, from the run summary's metrics (summary_metrics)."""
        return (f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} ("
                + ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in m["per_class"].items()) + ")")

    def kfp_metrics(self, m: dict) -> dict[str, float]:
        """Scalars for the Kubeflow UI's Metrics table."""
        out = {k: m[k] for k in self.metrics}
        return {**out, **{f"f1_{label}": s["f1"] for label, s in m["per_class"].items()}}

    def card(self, evaluation: dict) -> tuple[str, str, str]:
        """(what the model is, the headline figures, the per-class table) for the model card."""
        m = evaluation["metrics"]
        table = "| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n" + "\n".join(
            f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |" for k, v in m["per_class"].items())
        return (f"Sequence classifier ({', '.join(evaluation['labels'])})",
                f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, weighted F1 {m['weighted_f1']:.4f}", table)

    # ---- predict -------------------------------------------------------------------------------
    def encode(self, tokenizer, inputs: ModelInputs, texts: list) -> encoding.Encoded:
        rows, truncated, _ = encoding.encode_texts(tokenizer, texts, inputs.max_length, inputs.truncation)
        return encoding.Encoded(rows, truncated)

    def input_problem(self, item) -> str:
        """Why a prediction input cannot be scored beyond its texts' own checks, or "" (none for texts)."""
        return ""

    def decode(self, encoded: encoding.Encoded, logits: np.ndarray, labels: list[str]) -> list[dict]:
        """Per input: the top label, its probability and every class probability ({label: p})."""
        probs = softmax(logits.astype(np.float64))
        return [{"label": labels[k], "score": float(p[k]), "probabilities": dict(zip(labels, map(float, p)))}
                for k, p in zip(probs.argmax(-1), probs)]

    def output_columns(self, predictions: list[dict], labels: list[str]) -> dict:
        """Batch inference columns: label, score and prob_<label> for every class."""
        out = {"label": [p["label"] for p in predictions], "score": np.array([p["score"] for p in predictions], dtype=np.float64)}
        for label in labels:
            out[f"prob_{label}"] = np.array([p["probabilities"][label] for p in predictions], dtype=np.float64)
        return out

    def output_types(self, labels: list[str]) -> list[dict]:
        """The v2 (Open Inference Protocol) outputs, for the model metadata endpoint."""
        return [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(labels)]}]


TASK = SequenceClassification()
