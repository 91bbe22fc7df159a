"""What a task family is, and the helpers the task modules share.

A task module (sequence.py, token.py, ...) defines one class with the attributes and methods of
`Task` below and an instance `TASK`; kubetune.tasks registers it by name. The steps call only this
interface, so they never branch on a task's name: adding a task family is a new module plus one
registry line. Heavy imports (torch, transformers) stay inside the methods.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np


@dataclass
class Tokenized:
    """One split after tokenization: token ids per row, a label per row (IGNORE when the labels
    are per token), per-token labels aligned with the ids (or None), and truncation counts."""

    rows: list[list[int]]
    labels: np.ndarray
    token_labels: list[list[int]] | None
    stats: dict


TRUNCATIONS = ("head", "tail", "head+tail")  # which tokens of a long text are kept (see cut_ids)


def special_edges(tokenizer) -> tuple[int, int]:
    """(leading, trailing) special tokens the tokenizer adds to one sequence: (1, 1) for BERT's
    [CLS] ... [SEP] and RoBERTa's <s> ... </s>; found by comparing one word with and without them."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for lead in range(len(with_special) - len(plain) + 1):
        if with_special[lead:lead + len(plain)] == plain:
            return lead, len(with_special) - lead - len(plain)
    return 0, 0


def cut_ids(ids: list[int], max_length: int, mode: str, edges: tuple[int, int]) -> list[int]:
    """`ids` (with the special tokens) cut to `max_length`, keeping the special tokens and the text's
    head, tail, or head+tail (the first quarter of the budget from the start, the rest from the end,
    as in Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?"). `head` equals the
    tokenizer's own truncation=True."""
    if len(ids) <= max_length:
        return ids
    lead, trail = edges
    body, budget = ids[lead:len(ids) - trail], max_length - lead - trail
    if mode == "head":
        kept = body[:budget]
    elif mode == "tail":
        kept = body[len(body) - budget:]
    else:
        head = budget // 4
        kept = body[:head] + body[len(body) - (budget - head):]
    return ids[:lead] + kept + ids[len(ids) - trail:]


class Task(Protocol):
    name: str  # the --task value
    summary: str  # one line for --help
    formats: tuple[str, ...]  # input formats it reads (kubetune.storage.formats)
    default_data: str  # what `kubetune run --task NAME` trains on without --train
    row_unit: str  # what a row of its data is called in messages ("rows", "sentences")
    metrics: tuple[str, ...]  # metrics a gate or the best-epoch selection may use (higher is better)
    default_metric: str
    headline: tuple[str, ...]  # the metrics shown in logs, epoch history and step outputs
    summary_metrics: tuple[str, ...]  # what the run summary keeps of the test metrics
    peft_task_type: str  # peft.TaskType member for --peft lora
    per_token: bool  # logits per token ([batch, sequence, labels]) rather than per row
    model_purpose: str  # "classify sequences": for the error when a model folder cannot
    truncations: tuple[str, ...]  # the TRUNCATIONS its tokenize supports
    segments: int  # texts per row the model reads joined by [SEP]: 1, or 2 for text pairs (token_type_ids)
    input_fields: tuple[str, ...]  # what one prediction input holds: ("text",), ("text", "text_pair"): serving and batch

    # validate: read each split, check them all, write the dataset folder
    def sources(self, train: str, eval_: str, test: str) -> dict[str, str]: ...
    def load(self, split: str, uri: str, cfg, settings, workdir: Path) -> tuple[object, str, list]: ...
    def check(self, data: dict, sources: dict, formats_: dict, files: dict, cfg) -> tuple[object, dict]: ...
    def prepare(self, usable: dict, sources: dict, cfg, out_dir: Path) -> dict: ...
    def describe_splits(self, meta: dict) -> str: ...
    # tokenize
    def tokenize(self, tokenizer, frame, label_ids: dict, cfg, progress) -> Tokenized: ...
    def tokenize_notes(self, split: str, stats: dict, rows: int, max_length: int) -> list[str]: ...
    # monitor (kubetune.monitoring): coverage check, reference profile, drift
    def profile_texts(self, frame) -> list[str]: ...
    def profile_outputs(self, predictions: list[dict], labels: list[str]) -> dict: ...
    def profile_gold(self, frame, labels: list[str]) -> dict: ...
    def column_predictions(self, columns: dict) -> list[dict]: ...
    # train and score
    def model_class(self): ...
    def loss(self, logits, target): ...
    def targets(self, split) -> np.ndarray: ...
    def scores(self, logits: np.ndarray, split, labels: list[str]) -> dict: ...
    def test_metrics(self, logits: np.ndarray, split, frame, labels: list[str]) -> tuple[dict, list, object]: ...
    def champion_metrics(self, clf, rows: list, gold, labels: list[str]) -> dict: ...
    # report
    def describe_test(self, metrics: dict) -> str: ...
    def kfp_metrics(self, metrics: dict) -> dict[str, float]: ...
    def card(self, evaluation: dict) -> tuple[str, str, str]: ...
    # predict (batch inference and serving)
    def predict(self, clf, texts: list[str], batch_size: int) -> list[dict]: ...
    def batch_columns(self, clf, texts: list[str], batch_size: int, on_batch=None) -> tuple[dict, np.ndarray]: ...
    def output_types(self, labels: list[str]) -> list[dict]: ...


def given_sources(train: str, eval_: str, test: str) -> dict[str, str]:
    """The splits the user gave files for (the rest are split off train by validate)."""
    return {s: u for s, u in zip(("train", "eval", "test"), (train, eval_, test)) if u}


def new_meta(task: Task, labels: list[str], sources: dict, made_here: dict, cfg) -> dict:
    """The start of a dataset folder's meta.json; the task fills in "splits"."""
    return {"task": task.name, "labels": labels, "sources": sources, "split_made_here": sorted(made_here), "config": asdict(cfg),
            "splits": {}}


def write_meta(out_dir: Path, meta: dict) -> None:
    (out_dir / "labels.json").write_text(json.dumps({"labels": meta["labels"]}, indent=2))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def text_chars(item) -> int:
    """Characters of one prediction input: a text, or a tuple of texts (a pair)."""
    return len(item) if isinstance(item, str) else sum(len(t) for t in item)


def score_texts(clf, texts: list[str], batch_size: int,
                on_batch: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, classes], truncated [n]) for `texts`, in their order, from row logits.
    Rows are batched by length (little padding); the next batch is tokenized in a thread while ONNX
    Runtime runs the current one (both release the GIL). `on_batch(rows, seconds)` after each batch."""
    probs = np.zeros((len(texts), len(clf.labels)), dtype=np.float64)
    truncated = np.zeros(len(texts), dtype=bool)
    order = np.argsort(np.fromiter((text_chars(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
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
            probs[index] = clf.probabilities(clf.logits(split, batch_size=len(index)))
            truncated[index] = cut
            if on_batch:
                on_batch(len(index), time.perf_counter() - t0)
    return probs, truncated
