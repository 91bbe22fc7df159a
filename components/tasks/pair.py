"""Sentence-pair classification: a label per (text, text_pair): answer selection (is this passage an
answer to the question?), NLI / entailment, paraphrase and duplicate detection, query-document relevance.

Everything particular to the task lives here; the steps call it through the Task interface
(kubetune.tasks.base). Data: CSV/TSV/JSONL/Parquet tables with a text, a text-pair and a label
column (--text-column, --text-pair-column, --label-column), checked like sequence-classification
tables (kubetune.validation.tables) with the pair as the unit of duplicates, conflicts and leakage,
plus a check that every row has its second text. Splits made here keep every row of one `text`
(a question and all its candidates) in one split, so ranking metrics see whole candidate lists.

Tokenized as pairs ([CLS] text [SEP] text_pair [SEP]); truncation cuts the longer side first
(`longest_first`) and the tokens dropped are reported per side. Models with token_type_ids (BERT)
get segment 1 on the second text (kubetune.storage.shards.token_types).

Metrics: those of sequence classification; the test metrics add ranking metrics when a `text`
has several candidates of which at least one is positive (answer selection): MRR and accuracy@1
over those questions, ranking candidates by P(positive); the gate may use them (--gate-metric mrr or
accuracy_at_1; best-epoch selection may not: the eval split is scored without its texts). The positive
label is --positive-label, else the one named 1/true/yes/positive/relevant/entailment/duplicate/
paraphrase/match/answer, else the last in sorted order.
Predictions: as sequence classification, for inputs (text, text_pair); serving takes
{"text": ..., "text_pair": ...} objects (v2: BYTES inputs "text" and "text_pair").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kubetune.storage.contracts import ModelInputs
from kubetune.tasks import base, encoding
from kubetune.tasks.metrics import classification_metrics
from kubetune.tasks.predictor import softmax
from kubetune.tasks.sequence import SequenceClassification
from kubetune.validation import tables
from kubetune.validation.report import SPLITS, Check, Report

POSITIVE_NAMES = ("1", "true", "yes", "positive", "relevant", "entailment", "duplicate", "paraphrase", "match", "answer")
PAIR_JOIN = "\n\u241e\n"  # joins the two texts into the key duplicates, conflicts and leakage are checked on


def positive_label(labels: list[str], configured: str = "") -> str:
    """The label whose probability ranks candidates: `configured` (--positive-label) when given, else
    guessed by name (see the module docstring)."""
    if configured:
        return configured
    return next((lab for lab in labels if lab.strip().lower() in POSITIVE_NAMES), sorted(labels)[-1])


def ranking_metrics(groups: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> dict:
    """MRR and accuracy@1 over the groups (questions) with >= 2 candidates and >= 1 positive. The
    best positive's rank counts every negative scored at least as high (ties go against the model,
    so a constant score earns nothing)."""
    frame = pd.DataFrame({"g": groups, "s": scores, "p": positive})
    rr, top = [], []
    for _, g in frame.groupby("g", sort=False):
        p, s = g["p"].to_numpy(), g["s"].to_numpy()
        if len(g) < 2 or not p.any() or p.all():
            continue
        rank = 1 + int((s[~p] >= s[p].max()).sum())
        rr.append(1.0 / rank)
        top.append(float(rank == 1))
    return {"ranked_questions": len(rr), "mrr": float(np.mean(rr)) if rr else None,
            "accuracy_at_1": float(np.mean(top)) if top else None}


class PairClassification(SequenceClassification):
    """Sequence classification of (text, text_pair): what differs is declared here, the rest is inherited
    (formats, metrics, the gate's default metric, the headline, the PEFT task type, row logits)."""

    name = "pair-classification"
    summary = "a label per text pair (answer selection, NLI, paraphrase, relevance)"
    default_data = "builtin:newsgroups-answers"
    row_unit = "pairs"
    gate_only_metrics = ("mrr", "accuracy_at_1")  # ranking needs a text's candidates together: the test split has them
    summary_metrics = SequenceClassification.summary_metrics + ("mrr", "accuracy_at_1", "ranked_questions", "positive_label")
    segments = 2  # [CLS] text [SEP] text_pair [SEP]
    input_fields = ("text", "text_pair")
    truncations = ("head",)  # the tokenizer cuts the longer text of the pair first

    # ---- validate ------------------------------------------------------------------------------
    def load(self, split: str, uri: str, cfg, settings, workdir: Path, part: list[str] | None = None):
        source, fmt = tables.table_source(uri, columns={"text": cfg.text_column, "text_pair": cfg.text_pair_column,
                                                        "label": cfg.label_column}, header=cfg.header, settings=settings, workdir=workdir,
                                          part=part)
        return source, fmt, []

    def view(self, source):
        """The pair as the checked text (joined), the first text as the split group."""
        return tables.MappedSource(source, _keyed)

    def row_checks(self, cfg) -> tuple:
        return (_pair_present(cfg),)  # every row has a non-empty second text

    def check(self, data: dict, sources: dict, formats_: dict, files: dict, cfg, passes: dict | None = None) -> tuple[Report, dict]:
        """The table checks on the pair, plus: the positive label is one of train's."""
        report, usable = super().check(data, sources, formats_, files, cfg, passes)
        if cfg.positive_label:
            report.checks.append(_positive_known(usable["train"].index, cfg))
        return report, usable

    # prepare (the subclassed one) splits grouped by text: every row of one question lands in one split
    columns = ("text", "text_pair", "label")

    def split_counts(self, frame) -> dict:
        return {"questions": int(frame["text"].nunique())}

    def describe_splits(self, meta: dict) -> str:
        return (", ".join(f"{s} {meta['splits'][s]['rows']} ({meta['splits'][s]['questions']} texts)" for s in SPLITS)
                + f"; labels {meta['labels']}")

    # ---- tokenize ------------------------------------------------------------------------------
    def tokenize(self, tokenizer, frame, label_ids: dict, cfg, progress) -> base.Tokenized:
        """Token ids per pair, truncated to max_length cutting the longer side first; the pairs
        truncated and the tokens that cost on each side."""
        texts, pairs = frame["text"].tolist(), frame["text_pair"].tolist()
        rows: list[list[int]] = []
        stats = {"truncated_rows": 0, "truncated_tokens": 0, "truncated_text_tokens": 0, "truncated_pair_tokens": 0}
        for start in range(0, len(texts), cfg.batch_size):
            a, b = texts[start:start + cfg.batch_size], pairs[start:start + cfg.batch_size]
            ids, _, counts = encoding.encode_pairs(tokenizer, a, b, cfg.max_length)  # the one encoder, as predictors use it
            rows += ids
            stats = {k: stats[k] + counts[k] for k in stats}
            progress.update(len(a))
        labels = frame["label"].map(label_ids).to_numpy(dtype=np.int64)
        return base.Tokenized(rows, labels, None, stats)

    def tokenize_notes(self, split: str, stats: dict, rows: int, max_length: int) -> list[str]:
        if not stats["truncated_rows"]:
            return []
        return [f"{split}: {stats['truncated_rows']} of {rows} pairs truncated to {max_length} tokens, longer side first "
                f"({stats['truncated_tokens']} tokens dropped: {stats['truncated_text_tokens']} from the text, "
                f"{stats['truncated_pair_tokens']} from the text pair)"]

    # ---- predict -------------------------------------------------------------------------------
    def encode(self, tokenizer, inputs: ModelInputs, texts: list) -> encoding.Encoded:
        """(text, text_pair) inputs, cut longer side first; decode and output_columns are sequence classification's."""
        rows, truncated, _ = encoding.encode_pairs(tokenizer, [t for t, _ in texts], [p for _, p in texts], inputs.max_length)
        return encoding.Encoded(rows, truncated)

    # ---- evaluate ------------------------------------------------------------------------------
    def profile_texts(self, frame) -> list[tuple[str, str]]:
        """(text, text_pair) per row: what predict takes (coverage check, reference profile)."""
        return list(zip(frame["text"].astype(str), frame["text_pair"].astype(str)))

    def test_metrics(self, logits: np.ndarray, split, frame, labels: list[str], settings: dict) -> tuple[dict, list, object]:
        """Classification metrics plus ranking metrics per `text` (answer selection); the champion is
        re-scored on the same pairs and ranked by the same positive label."""
        positive = labels.index(positive_label(labels, settings.get("positive_label", "")))
        probs = softmax(logits.astype(np.float64))
        metrics = {**self.scores(logits, split, labels), **_ranked(frame["text"].to_numpy(), probs, split.labels, positive),
                   "positive_label": labels[positive]}
        return metrics, list(zip(frame["text"], frame["text_pair"])), (split.labels, positive)

    def champion_metrics(self, predictor, rows: list, gold, labels: list[str]) -> dict:
        gold, positive = gold
        probs = np.array([[p["probabilities"][lab] for lab in labels] for p in predictor.predict(rows)], dtype=np.float64)
        texts = np.array([t for t, _ in rows], dtype=object)
        return {**classification_metrics(gold, probs.argmax(-1), labels), **_ranked(texts, probs, gold, positive)}

    def describe_test(self, m: dict) -> str:
        line = super().describe_test(m)
        if m.get("mrr") is not None:
            line += f"; ranking over {m['ranked_questions']} texts: MRR {m['mrr']:.4f}, accuracy@1 {m['accuracy_at_1']:.4f}"
        return line

    def kfp_metrics(self, m: dict) -> dict[str, float]:
        out = super().kfp_metrics(m)
        return {**out, **{k: m[k] for k in ("mrr", "accuracy_at_1") if m.get(k) is not None}}

    def card(self, evaluation: dict) -> tuple[str, str, str]:
        what, figures, table = super().card(evaluation)
        m = evaluation["metrics"]
        if m.get("mrr") is not None:
            figures += f"; MRR {m['mrr']:.4f}, accuracy@1 {m['accuracy_at_1']:.4f} over {m['ranked_questions']} texts"
        return f"Sentence-pair classifier ({', '.join(evaluation['labels'])})", figures, table


def _ranked(texts: np.ndarray, probs: np.ndarray, gold: np.ndarray, positive: int) -> dict:
    """Ranking metrics of each text's candidates by P(positive) (`probs`: [rows, labels])."""
    return ranking_metrics(texts, probs[:, positive], gold == positive)


def _positive_known(train, cfg) -> Check:
    labels = sorted(map(str, train.class_counts().index))
    known = cfg.positive_label in labels
    return Check("train", "positive_label_known", cfg.label_column, "critical", known,
                 f"have labels {labels}, none of them the --positive-label {cfg.positive_label!r}; name one of them "
                 "(or leave it empty to take the label named 1/true/yes/relevant/...)",
                 unexpected_count=0 if known else len(train), element_count=len(train))


def _key(text, pair):
    """The pair as one string for the table checks; a blank first text stays blank (so the
    empty-text check names it) and a missing second text is checked by _pair_present."""
    if not isinstance(text, str) or not text.strip():
        return text
    return text + PAIR_JOIN + (pair if isinstance(pair, str) else "")


def _keyed(batch: pd.DataFrame) -> pd.DataFrame:
    """A batch as the table checks see it: the pair as the text, the first text as the split group."""
    return batch.assign(group=batch["text"], text=[_key(t, p) for t, p in zip(batch["text"], batch["text_pair"])])


def _pair_present(cfg) -> tables.RowCheck:
    return tables.RowCheck("text_pair_present", cfg.text_pair_column,
                           "have no second text (null, empty or whitespace); fill it in or drop those rows",
                           lambda batch: np.array([not (isinstance(p, str) and p.strip()) for p in batch["text_pair"]], dtype=bool),
                           "text_pair")


TASK = PairClassification()
