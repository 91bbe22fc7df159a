"""What a task family is, and the helpers the task modules share.

A task module (sequence.py, token.py, ...) defines one class with the attributes and methods of
`Task` below and an instance `TASK`; kubetune.tasks registers it by name. The steps call only this
interface, so they never branch on a task's name: adding a task family is a new module plus one
registry line. Heavy imports (torch, transformers) stay inside the methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kubetune.storage.contracts import DatasetMeta, ModelInputs
from kubetune.tasks import encoding


@dataclass
class Tokenized:
    """One split after tokenization: token ids per row, a label per row (IGNORE when the labels
    are per token), per-token labels aligned with the ids (or None), and truncation counts."""

    rows: list[list[int]]
    labels: np.ndarray
    token_labels: list[list[int]] | None
    stats: dict
    choices: int = 1  # sequences per row (multiple choice), consecutive in `rows`


class TaskData(Protocol):
    """Its data: read each split, check them all, write the dataset folder (validate)."""

    name: str  # the --task value
    summary: str  # one line for --help
    formats: tuple[str, ...]  # input formats it reads (kubetune.storage.formats)
    default_data: str  # what `kubetune run --task NAME` trains on without --train
    row_unit: str  # what a row of its data is called in messages ("rows", "sentences")
    # large inputs are checked by parallel tasks over their files (kubetune.steps.validate): then
    # load(..., part=files) reads some files, check_piece(source, split, cfg) makes a piece's
    # tables.SplitPass and check(..., passes=...) takes the merged passes in place of reading the rows
    fans_out: bool

    def sources(self, train: str, eval_: str, test: str) -> dict[str, str]: ...
    def load(self, split: str, uri: str, cfg, settings, workdir: Path) -> tuple[object, str, list]: ...
    def check(self, data: dict, sources: dict, formats_: dict, files: dict, cfg) -> tuple[object, dict]: ...
    def prepare(self, usable: dict, sources: dict, cfg, out_dir: Path) -> dict: ...
    def describe_splits(self, meta: dict) -> str: ...


class TaskInputs(Protocol):
    """How its rows and prediction inputs become token ids (tokenize, and kubetune.tasks.encoding)."""

    truncations: tuple[str, ...]  # which of encoding.TRUNCATIONS its tokenize supports
    segments: int  # texts per row the model reads joined by [SEP]: 1, or 2 for text pairs (token_type_ids)
    input_fields: tuple[str, ...]  # what one prediction input holds: ("text",), ("text", "text_pair"): serving and batch
    list_fields: tuple[str, ...]  # of those, the ones holding a list of texts (multiple choice: "choices")
    optional_fields: tuple[str, ...]  # of those, the ones a request may leave out (None)

    def tokenize(self, tokenizer, frame, label_ids: dict, cfg, progress) -> Tokenized: ...
    def tokenize_notes(self, split: str, stats: dict, rows: int, max_length: int) -> list[str]: ...
    def encode(self, tokenizer, inputs: ModelInputs, texts: list) -> encoding.Encoded: ...
    def input_problem(self, item) -> str: ...  # why an input cannot be scored beyond its texts' checks, or ""


class TaskHead(Protocol):
    """Its model head and loss (finetune)."""

    peft_task_type: str  # peft.TaskType member for --peft lora; empty: none fits, `head_modules` stay trainable
    head_modules: tuple[str, ...]  # without a peft task type: the modules LoRA keeps trainable (the new head)
    input_axes: tuple[str, ...]  # the model inputs' axes: ("batch", "sequence"), or with "choices" between
    per_token: bool  # logits per token ([batch, sequence, labels]) rather than per row
    model_purpose: str  # "classify sequences": for the error when a model folder cannot
    # --epochs 0 (kubetune.steps.finetune.auto_epochs): a small split gets enough epochs for this many
    # optimizer steps, at most auto_max_epochs; early stopping waits for half of them
    auto_min_steps: int
    auto_max_epochs: int

    def model_class(self): ...
    def loss(self, logits, target, inputs=None): ...
    def targets(self, split) -> np.ndarray: ...


class TaskMetrics(Protocol):
    """How it is scored and reported (finetune's selection, evaluate's gate, the run summary, the card)."""

    metrics: tuple[str, ...]  # metrics a gate or the best-epoch selection may use (higher is better)
    gate_only_metrics: tuple[str, ...]  # test metrics a gate may also use that the eval split does not give
    default_metric: str
    headline: tuple[str, ...]  # the metrics shown in logs, epoch history and step outputs
    summary_metrics: tuple[str, ...]  # what the run summary keeps of the test metrics

    def scores(self, logits: np.ndarray, split, labels: list[str]) -> dict: ...
    def test_metrics(self, logits: np.ndarray, split, frame, labels: list[str], settings: dict) -> tuple[dict, list, object]: ...
    def champion_metrics(self, predictor, rows: list, gold, labels: list[str]) -> dict: ...
    def describe_test(self, metrics: dict) -> str: ...
    def kfp_metrics(self, metrics: dict) -> dict[str, float]: ...
    def card(self, evaluation: dict) -> tuple[str, str, str]: ...


class TaskOutputs(Protocol):
    """What its logits mean (kubetune.tasks.predictor: serving, batch inference, champion scoring, profiles)."""

    def decode(self, encoded: encoding.Encoded, logits, labels: list[str]) -> list[dict]: ...
    def output_columns(self, predictions: list[dict], labels: list[str]) -> dict: ...
    def output_types(self, labels: list[str]) -> list[dict]: ...


class TaskMonitoring(Protocol):
    """What its profiles read (kubetune.monitoring): coverage check, reference profile, drift."""

    def profile_texts(self, frame) -> list[str]: ...
    def profile_outputs(self, predictions: list[dict], labels: list[str]) -> dict: ...
    def profile_gold(self, frame, labels: list[str]) -> dict: ...


class Task(TaskData, TaskInputs, TaskHead, TaskMetrics, TaskOutputs, TaskMonitoring, Protocol):
    """A task family: the six roles above. A family that is another one plus a difference subclasses
    it and declares only the difference (pair-classification is sequence-classification of pairs)."""


def given_sources(train: str, eval_: str, test: str) -> dict[str, str]:
    """The splits the user gave files for (the rest are split off train by validate)."""
    return {s: u for s, u in zip(("train", "eval", "test"), (train, eval_, test)) if u}


def new_meta(task: Task, labels: list[str], sources: dict, made_here: dict, cfg) -> dict:
    """The start of a dataset folder's meta.json; the task fills in "splits"."""
    return {"task": task.name, "labels": labels, "sources": sources, "split_made_here": sorted(made_here), "config": asdict(cfg),
            "splits": {}}


def write_meta(out_dir: Path, meta: dict) -> None:
    """The dataset folder's meta.json and labels.json (kubetune.storage.contracts.DatasetMeta)."""
    DatasetMeta(**meta).write(out_dir)
