"""Multiple choice: a question and 2 to 16 candidate answers, the model picks one (exam-style QA).

Everything particular to the task lives here; the steps call it through the Task interface
(kubetune.tasks.base). Data: JSONL `{"question": ..., "choices": [...], "answer": ...}`, or
CSV/TSV/Parquet with a list column or `choice_0 .. choice_N` columns; `answer` is the 0-based index,
the letter (A, B, ...) or the choice's text. Columns: --text-column (the question; `question` when
left at its default), --choices-column, --label-column (`answer` when left at its default), and an
optional --context-column (a passage shared by the choices, read before the question). Checks:
2 to 16 choices, none empty, no duplicates in a row, the answer among them, the same count in every
row unless --allow-mixed-choices (absent choices are then masked), plus the table checks on the
question + choices as one key, and a warning when the answers sit mostly at one position.

A row is encoded as one (context + question, choice) pair per choice, with the pair rules of
kubetune.tasks.encoding (longer side cut first, segment ids where the model has them), so a row is
`choices` sequences: kubetune.storage.shards keeps them together and pads them to
[batch, choices, sequence]; an absent choice is an empty sequence. Model:
AutoModelForMultipleChoice's class for the checkpoint, scoring each choice by the cosine of the
question and the choice encoded apart within the joint sequence, so that it starts at the base
model's own similarity (kubetune.training.choice_head says why); a softmax over the choices;
absent choices get no probability. Labels are the positions (A, B, ...), so the classification metrics apply:
accuracy (the gate's default), per-position accuracy (each position's recall) and the predicted
positions, which expose a model that always answers "A".

Predictions: {"answer": index, "letter": "B", "choice": text, "score": p, "scores": [p per choice]};
batch columns answer, letter, choice, score and prob_<letter>.
"""

from __future__ import annotations

import json
import string
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from kubetune.errors import InputError
from kubetune.monitoring.profile import CONFIDENCE_EDGES
from kubetune.storage import assets, formats
from kubetune.storage.contracts import ModelInputs
from kubetune.storage.shards import ABSENT
from kubetune.tasks import base, encoding
from kubetune.tasks.metrics import classification_metrics
from kubetune.tasks.predictor import softmax
from kubetune.tasks.sequence import SequenceClassification
from kubetune.validation import splits, tables
from kubetune.validation.report import EXAMPLES, Check, Report

MIN_CHOICES, MAX_CHOICES = 2, 16
LETTERS = string.ascii_uppercase[:MAX_CHOICES]
WIDE = "choice_"  # choice_0 .. choice_N columns, when the table has no list column
KEY_JOIN = "\n\u241e\n"  # joins question and choices into the key duplicates and leakage are checked on
DEFAULT_COLUMNS = {"text": ("text", "question"), "label": ("label", "answer")}  # (the flag's default, what this task reads then)


def column(cfg, role: str) -> str:
    """The user's column for `role`: the flag's value, or this task's name when the flag is at its default."""
    given = getattr(cfg, f"{role}_column")
    default, ours = DEFAULT_COLUMNS[role]
    return ours if given == default else given


def first_text(question: str, context) -> str:
    """What each choice is paired with: the shared passage (if any), then the question."""
    return f"{context}\n{question}" if isinstance(context, str) and context.strip() else question


def answer_index(answer, choices: list[str]) -> int | None:
    """The 0-based position `answer` names (an index, a letter or a choice's text), or None."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, np.integer)) or (isinstance(answer, float) and answer.is_integer()):
        k = int(answer)
        return k if 0 <= k < len(choices) else None
    text = str(answer).strip()
    if text.isdigit():
        return answer_index(int(text), choices)
    if len(text) == 1 and text.upper() in LETTERS[:len(choices)]:
        return LETTERS.index(text.upper())
    stripped = [c.strip() for c in choices]  # the text as written, give or take surrounding spaces
    return stripped.index(text) if text in stripped else None


class MultipleChoice(SequenceClassification):
    """Classification over positions: the sequence classifier's metrics, splits and gate, with a
    row of choices as the input and the multiple-choice head."""

    name = "multiple-choice"
    summary = "a question and 2-16 candidate answers; the model picks one (exam-style QA)"
    default_data = "builtin:newsgroups-choice"
    row_unit = "questions"
    default_metric = "accuracy"
    headline = ("accuracy",)
    summary_metrics = ("accuracy", "macro_f1", "per_class", "confusion_matrix", "per_position_accuracy", "predicted_positions",
                       "mean_confidence")
    peft_task_type = ""  # peft has no multiple-choice task type: the head is kept trainable by name
    head_modules = ("pooler", "classifier", "choice_scale")
    segments = 2  # [CLS] context + question [SEP] choice [SEP]
    input_fields = ("question", "choices", "context")  # a prediction input: (question, tuple of choices, context or None)
    list_fields = ("choices",)  # input fields that hold a list of texts
    optional_fields = ("context",)  # input fields that may be left out (None)
    input_axes = ("batch", "choices", "sequence")
    truncations = ("head",)  # the tokenizer cuts the longer side of each pair first
    columns = ("text", "context", "choices", "label")
    model_purpose = "answer multiple-choice questions"

    fans_out = False  # its rows hold lists of choices: checked and split in memory

    # ---- validate ------------------------------------------------------------------------------
    def load(self, split: str, uri: str, cfg, settings, workdir: Path):
        """(frame of text, context, choices, answer, source_row; format; files): the choices of a list
        column or of choice_0 .. choice_N columns (trailing empty cells are absent choices)."""
        text_col, label_col = column(cfg, "text"), column(cfg, "label")
        wanted = (text_col, label_col) + ((cfg.context_column,) if cfg.context_column else ())
        flags = {text_col: "--text-column", label_col: "--label-column", cfg.context_column: "--context-column"}
        if assets.is_builtin(uri):
            path, asset = assets.materialize(uri, workdir), assets.resolve(uri)[1]
            files, fmt = [(uri, path)], asset.reader["format"]
        else:
            uris, fmt = formats.split_files(uri, settings)
            files = formats.local_files(uris, settings, workdir)
        rows, located, offset = [], [], 0
        for file_uri, path in files:
            located.append((file_uri, offset))
            last = 0
            # Parquet: every column is read (the choices may be choice_0 .. choice_N), the wanted ones checked here
            for rec in formats.read_records(path, file_uri, fmt, columns=() if fmt == "parquet" else wanted, flags=flags, strict=True):
                if fmt == "parquet" and (err := formats.missing_columns(file_uri, wanted, list(rec.fields), flags)):
                    raise err
                question, context = rec.fields[text_col], rec.fields.get(cfg.context_column) if cfg.context_column else None
                for col, value in ((text_col, question), (cfg.context_column, context)):
                    if value is not None and not isinstance(value, str):
                        raise InputError(f"{file_uri}: {formats.unit(fmt)} {rec.row}: column {col!r} must hold text, "
                                         f"got {type(value).__name__} {value!r}")
                try:
                    choices = choices_of(rec.fields, cfg.choices_column)
                except ValueError as e:
                    raise InputError(f"{file_uri}: {formats.unit(fmt)} {rec.row}: {e}") from None
                rows.append((question, context, choices, rec.fields[label_col], offset + rec.row))
                last = rec.row
            offset += last
        if not rows:
            raise InputError(f"{uri}: the files hold no data rows")
        frame = pd.DataFrame(rows, columns=["text", "context", "choices", "answer", "source_row"])
        frame["source_row"] = frame["source_row"].astype("int64")
        return frame, fmt, located

    def check(self, data: dict, sources: dict, formats_: dict, files: dict, cfg) -> tuple[Report, dict]:
        """The choice checks (critical: count, empty, duplicate, answer; mixed counts without the
        option), then the table checks on question + choices with the answer's letter as the label."""
        checks, usable = [], {}
        counts = {s: f["choices"].map(len) for s, f in data.items()}
        common = pd.concat(counts.values()).mode().iloc[0]
        for split, frame in data.items():
            labelled = frame.assign(label=[_letter(a, c) for a, c in zip(frame["answer"], frame["choices"])])
            checks += _choice_checks(split, labelled, counts[split], common, cfg)
            usable[split] = labelled.drop(columns="answer")
        # checked on question + choices (+ context); a question's rows split together
        keyed = {s: f.assign(group=f["text"], text=[_key(q, c, x) for q, c, x in zip(f["text"], f["choices"], f["context"])])
                 for s, f in usable.items()}
        named = replace(cfg, text_column=column(cfg, "text"), label_column=column(cfg, "label"))  # messages name the user's columns
        report, _ = tables.check_tables(keyed, sources, formats_, named, files)
        # the position balance replaces the class checks' imbalance wording; answer_among_choices says
        # more than a null label (an answer that names no choice has none)
        report.checks = [c for c in report.checks if c.name != "class_balance" and not (c.column == named.label_column and "null" in c.name)]
        report.checks.append(_position_balance(usable["train"], cfg))
        report.checks += checks
        return report, usable

    def prepare(self, usable: dict, sources: dict, cfg, out_dir: Path) -> dict:
        """As sequence classification's, on the frames in memory (rows hold lists of choices)."""
        frames, missing = splits.split_frames(usable, cfg)
        meta = base.new_meta(self, self.label_set(frames), sources, missing, cfg)
        meta["splits"] = splits.write_frames(self, frames, out_dir)
        base.write_meta(out_dir, meta)
        return meta

    def label_set(self, frames: dict) -> list[str]:
        """The positions of the widest row anywhere (a position no train answer uses still gets a letter)."""
        return list(LETTERS[:max(int(f["choices"].map(len).max()) for f in frames.values())])

    def split_counts(self, frame) -> dict:
        return {"choices": sorted({int(n) for n in frame["choices"].map(len)})}

    def describe_splits(self, meta: dict) -> str:
        return (", ".join(f"{s} {meta['splits'][s]['rows']}" for s in meta["splits"])
                + f" questions; {'/'.join(map(str, meta['splits']['train']['choices']))} choices")

    # ---- tokenize ------------------------------------------------------------------------------
    def tokenize(self, tokenizer, frame, label_ids: dict, cfg, progress) -> base.Tokenized:
        """`choices` sequences per question (one per position of the widest row; empty where a row
        has fewer), each (context + question, choice) cut to max_length longer side first."""
        width = len(label_ids)
        rows: list[list[int]] = []
        stats = {"truncated_rows": 0, "truncated_tokens": 0, "truncated_text_tokens": 0, "truncated_pair_tokens": 0}
        items = self.profile_texts(frame)
        for start in range(0, len(items), cfg.batch_size):
            batch = items[start:start + cfg.batch_size]
            encoded, counts = _encode(tokenizer, batch, cfg.max_length, width)
            rows += encoded.rows
            stats = {k: stats[k] + counts[k] for k in stats}
            progress.update(len(batch))
        labels = frame["label"].map(label_ids).to_numpy(dtype=np.int64)
        return base.Tokenized(rows, labels, None, stats, choices=width)

    def tokenize_notes(self, split: str, stats: dict, rows: int, max_length: int) -> list[str]:
        if not stats["truncated_rows"]:
            return []
        return [f"{split}: {stats['truncated_rows']} of {rows} questions had a (question, choice) pair truncated to {max_length} "
                f"tokens, longer side first ({stats['truncated_text_tokens']} tokens dropped from the questions, "
                f"{stats['truncated_pair_tokens']} from the choices)"]

    # ---- model ---------------------------------------------------------------------------------
    def model_class(self):
        from kubetune.training.choice_head import ChoiceModel  # scores from the base model's own similarity on

        return ChoiceModel

    def loss(self, logits, target, inputs=None):
        """Cross-entropy over each question's choices; an absent choice (no real token) takes no part."""
        import torch.nn.functional as F

        present = inputs["attention_mask"][..., 0] > 0
        return F.cross_entropy(logits.float().masked_fill(~present, ABSENT), target)

    def scores(self, logits: np.ndarray, split, labels: list[str]) -> dict:
        """Accuracy and the position figures of [questions, choices] logits (absent choices: ABSENT) against the answers."""
        return position_metrics(split.labels, softmax(logits.astype(np.float64)), labels)

    # ---- evaluate ------------------------------------------------------------------------------
    def test_metrics(self, logits: np.ndarray, split, frame, labels: list[str], settings: dict) -> tuple[dict, list, object]:
        return self.scores(logits, split, labels), self.profile_texts(frame), split.labels

    def champion_metrics(self, predictor, rows: list, gold, labels: list[str]) -> dict:
        predictions = predictor.predict(rows)
        probs = np.zeros((len(predictions), len(labels)))
        for i, p in enumerate(predictions):
            probs[i, :len(p["scores"])] = p["scores"][:len(labels)]
        return position_metrics(np.asarray(gold), probs, labels)

    def describe_test(self, m: dict) -> str:
        return (f"accuracy {m['accuracy']:.4f}; per position " + ", ".join(f"{k} {v:.4f}" for k, v in m["per_position_accuracy"].items())
                + "; predicted " + ", ".join(f"{k} {v}" for k, v in m["predicted_positions"].items()))

    def kfp_metrics(self, m: dict) -> dict[str, float]:
        out = {k: m[k] for k in self.metrics}
        return {**out, "mean_confidence": m["mean_confidence"], **{f"accuracy_{k}": v for k, v in m["per_position_accuracy"].items()}}

    def card(self, evaluation: dict) -> tuple[str, str, str]:
        m = evaluation["metrics"]
        total = max(sum(m["predicted_positions"].values()), 1)
        table = "| position | accuracy (answer here) | answers here | predicted here |\n|---|---|---|---|\n" + "\n".join(
            f"| {k} | {m['per_position_accuracy'][k]:.4f} | {m['per_class'][k]['support']} | "
            f"{m['predicted_positions'][k]} ({100 * m['predicted_positions'][k] / total:.0f}%) |" for k in m["per_position_accuracy"])
        return (f"Multiple-choice answerer ({len(evaluation['labels'])} choices)",
                f"accuracy {m['accuracy']:.4f}, mean confidence {m['mean_confidence']:.4f}", table)

    # ---- predict -------------------------------------------------------------------------------
    def encode(self, tokenizer, inputs: ModelInputs, texts: list) -> encoding.Encoded:
        """(question, choices, context) inputs: as many sequences per input as the widest input has choices."""
        return _encode(tokenizer, texts, inputs.max_length, max((len(t[1]) for t in texts), default=MIN_CHOICES))[0]

    def decode(self, encoded: encoding.Encoded, logits: np.ndarray, labels: list[str]) -> list[dict]:
        """Per input: the chosen position, its letter and text, its probability, every choice's probability."""
        probs = softmax(logits.astype(np.float64))  # absent choices come as ABSENT (kubetune.storage.shards.place_logits)
        out = []
        for p, choices in zip(probs, encoded.extra):
            k = int(p.argmax())
            out.append({"answer": k, "letter": LETTERS[k], "choice": choices[k], "score": float(p[k]),
                        "scores": [float(x) for x in p[:len(choices)]]})
        return out

    def output_columns(self, predictions: list[dict], labels: list[str]) -> dict:
        """Batch inference columns: answer, letter, choice, score and prob_<letter> (empty past a row's choices)."""
        out = {"answer": np.array([p["answer"] for p in predictions], dtype=np.int64), "letter": [p["letter"] for p in predictions],
               "choice": [p["choice"] for p in predictions], "score": np.array([p["score"] for p in predictions], dtype=np.float64)}
        width = max([len(labels)] + [len(p["scores"]) for p in predictions])
        for k in range(width):
            out[f"prob_{LETTERS[k]}"] = np.array([p["scores"][k] if k < len(p["scores"]) else np.nan for p in predictions])
        return out

    def output_types(self, labels: list[str]) -> list[dict]:
        return [{"name": "answer", "datatype": "FP64", "shape": [-1]}, {"name": "letter", "datatype": "BYTES", "shape": [-1]},
                {"name": "choice", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP64", "shape": [-1]},
                {"name": "scores", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "application/json"}}]

    def input_problem(self, item) -> str:
        return input_problem(item)

    # ---- monitor -------------------------------------------------------------------------------
    def profile_texts(self, frame) -> list[tuple]:
        """(question, choices, context) per row: what predict takes."""
        contexts = frame["context"] if "context" in frame else [None] * len(frame)
        return [(q, tuple(str(c) for c in cs), x if isinstance(x, str) else None)
                for q, cs, x in zip(frame["text"].astype(str), frame["choices"], contexts)]

    def profile_outputs(self, predictions: list[dict], labels: list[str]) -> dict:
        """The predicted positions, the choice counts and the chosen answer's probability."""
        positions, counts = dict.fromkeys(labels, 0), {}
        for p in predictions:
            positions[p["letter"]] = positions.get(p["letter"], 0) + 1
            counts[str(len(p["scores"]))] = counts.get(str(len(p["scores"])), 0) + 1
        return {"distributions": {"predicted_position": positions, "choice_count": counts},
                "histograms": {"confidence": ([p["score"] for p in predictions], CONFIDENCE_EDGES)}}


def position_metrics(gold: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Classification metrics over positions, plus per-position accuracy (the recall of the answers
    at each position), how often each position was predicted, and the mean top probability."""
    predicted = probs.argmax(-1)
    m = classification_metrics(gold, predicted, labels)
    counts = np.bincount(predicted, minlength=len(labels))
    m.update(per_position_accuracy={k: v["recall"] for k, v in m["per_class"].items()},
             predicted_positions={k: int(counts[i]) for i, k in enumerate(labels)},
             mean_confidence=float(probs.max(-1).mean()) if len(probs) else 0.0)
    return m


def _encode(tokenizer, items: list, max_length: int, width: int) -> tuple[encoding.Encoded, dict]:
    """`width` sequences per (question, choices, context) item, empty past its choices; truncated: per item."""
    firsts, seconds, slots = [], [], []
    for i, (question, choices, context) in enumerate(items):
        first = first_text(question, context)
        for k, choice in enumerate(choices):
            firsts.append(first)
            seconds.append(choice)
            slots.append(i * width + k)
    ids, cut, stats = encoding.encode_pairs(tokenizer, firsts, seconds, max_length) if firsts else ([], np.zeros(0, bool), {})
    rows: list[list[int]] = [[] for _ in range(len(items) * width)]
    truncated = np.zeros(len(items), dtype=bool)
    for slot, r, c in zip(slots, ids, cut):
        rows[slot] = r
        truncated[slot // width] |= bool(c)
    stats = {**stats, "truncated_rows": int(truncated.sum())} if stats else stats
    return encoding.Encoded(rows, truncated, extra=[list(t[1]) for t in items], choices=width), stats


def choices_of(fields: dict, name: str) -> list:
    """One record's choices: its list column `name` (JSONL/Parquet lists; a JSON list in a CSV cell),
    or its choice_0 .. choice_N cells with the trailing empty ones dropped. A ValueError says what is
    wrong (the caller adds where)."""
    if name in fields:
        value = fields[name]
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"column {name!r} is not a JSON list ({e.msg})") from None
        if hasattr(value, "tolist"):
            value = value.tolist()
        if not isinstance(value, list):
            raise ValueError(f"column {name!r} must hold a list of choices, got {type(value).__name__}")
        return [c if isinstance(c, str) else None if c is None else str(c) for c in value]
    wide = sorted((int(k[len(WIDE):]), k) for k in fields if isinstance(k, str) and k.startswith(WIDE) and k[len(WIDE):].isdigit())
    if not wide:
        raise ValueError(f"no choices: no column {name!r} and no {WIDE}0 .. {WIDE}N columns; columns are: "
                         f"{', '.join(map(str, fields))}. Name the list column with --choices-column")
    cells = [fields[k] for _, k in wide]
    while cells and (cells[-1] is None or (isinstance(cells[-1], str) and not cells[-1].strip())):
        cells.pop()
    return [c if isinstance(c, str) else None if c is None else str(c) for c in cells]


def input_problem(item) -> str:
    """Why a (question, choices, context) prediction input cannot be scored, or "" (serving, batch inference)."""
    question, choices, context = item
    if not isinstance(choices, (list, tuple)) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        n = len(choices) if isinstance(choices, (list, tuple)) else 0
        return f"has {n} choices; give {MIN_CHOICES} to {MAX_CHOICES}"
    if any(not (isinstance(c, str) and c.strip()) for c in choices):
        return "has an empty choice (null, empty or whitespace)"
    return ""


def _letter(answer, choices: list) -> str | None:
    k = answer_index(answer, [c if isinstance(c, str) else "" for c in choices]) if choices else None
    return LETTERS[k] if k is not None and k < len(LETTERS) else None


def _key(question, choices, context):
    """The row as one string for the table checks (a blank question stays blank, so its check names it)."""
    if not isinstance(question, str) or not question.strip():
        return question
    return KEY_JOIN.join([first_text(question, context), *[c or "" for c in choices]])


def _choice_checks(split: str, frame: pd.DataFrame, counts: pd.Series, common: int, cfg) -> list[Check]:
    rows = frame["source_row"].to_numpy()

    def check(name: str, bad: np.ndarray, what: str, column: str, values) -> Check:
        return Check(split, name, column, "critical", not bad.any(), what, unexpected_count=int(bad.sum()), element_count=len(frame),
                     unit="questions", examples=[(r, v) for r, v, b in zip(rows, values, bad) if b][:EXAMPLES])

    n = counts.to_numpy()
    choices = frame["choices"].tolist()
    empty = np.array([any(not (isinstance(c, str) and c.strip()) for c in cs) for cs in choices], dtype=bool)
    dupes = np.array([len({c.strip().lower() for c in cs if isinstance(c, str)}) < len(cs) for cs in choices], dtype=bool) & ~empty
    no_answer = frame["label"].isna().to_numpy() & (n >= MIN_CHOICES)
    out = [
        check("choice_count", (n < MIN_CHOICES) | (n > MAX_CHOICES),
              f"have fewer than {MIN_CHOICES} or more than {MAX_CHOICES} choices; give each question {MIN_CHOICES}-{MAX_CHOICES} "
              "candidate answers", cfg.choices_column, [f"{k} choices" for k in n]),
        check("choices_not_empty", empty, "have an empty choice (null or whitespace); fill it in or drop it", cfg.choices_column,
              choices),
        check("choices_distinct", dupes, "repeat a choice; each candidate answer must differ", cfg.choices_column, choices),
        check("answer_among_choices", no_answer, "have an answer that is not one of the choices: give its 0-based index, its letter "
              "(A, B, ...) or its exact text", column(cfg, "label"), frame["answer"].tolist()),
    ]
    if not cfg.allow_mixed_choices:
        out.append(check("same_choice_count", n != common,
                         f"have a choice count other than {common} (the most common); give every question {common} choices, or "
                         "set --allow-mixed-choices true (absent choices are then masked)", cfg.choices_column,
                         [f"{k} choices" for k in n]))
    return out


def _position_balance(train: pd.DataFrame, cfg) -> Check:
    """Warn when the answers sit mostly at one position: a model can then score by position alone."""
    counts = train["label"].value_counts()
    width = int(train["choices"].map(len).max())
    top, share = (counts.idxmax(), counts.max() / max(counts.sum(), 1)) if len(counts) else ("A", 0.0)
    return Check("train", "answer_position_balance", column(cfg, "label"), "warning", share <= min(1.0, 1.5 / width),
                 f"put {100 * share:.0f}% of the answers at position {top} (chance is {100 / width:.0f}%): a model can learn the "
                 "position instead of the answer; shuffle each question's choices", unit="questions")


TASK = MultipleChoice()
