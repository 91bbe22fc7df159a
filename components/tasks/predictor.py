"""The one prediction path: inputs -> the encoder (kubetune.tasks.encoding, the task's `encode`) ->
logits from a backend (an ONNX Runtime session, kubetune.onnx.model; or a torch model,
kubetune.training.modeling.TorchBackend) -> the task's `decode` into its outputs. Serving, batch
inference, the gate's champion scoring and the reference profile all predict through `Predictor.score`,
so they see the same inputs and the same outputs.

    predictor = OnnxClassifier(Path("model"))              # a Predictor over an exported folder
    predictor.predict(["WINNER! Claim your prize"])        # [{"label": "spam", "score": ..., ...}]
    scored = predictor.score(texts, batch_size=64)         # per input: prediction, token ids, truncated

`score` keeps the token ids of each input with its prediction, so what else reads them (serving's
metrics and request log, the drift profile) never tokenizes the input again.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from kubetune.storage.contracts import ModelInputs
from kubetune.storage.shards import TokenizedSplit
from kubetune.tasks.encoding import Encoded


class Backend(Protocol):
    def logits(self, split: TokenizedSplit, batch_size: int, per_token: bool) -> np.ndarray:
        """Logits in row order, [rows, labels]; `per_token`: every real token's, end to end, [tokens, labels]."""


@dataclass(slots=True)
class Scored:
    """One input through the prediction path: the task's prediction, the token ids the model read, and
    whether truncation cut the input."""

    prediction: dict
    ids: list[int]
    truncated: bool


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def input_chars(item) -> int:
    """Characters of one prediction input: a text, or a tuple of texts (a pair; a question, its choices, a context)."""
    if isinstance(item, str):
        return len(item)
    return sum(input_chars(t) for t in item if t is not None)


class Predictor:
    """A task's model behind one interface: `encode`, `logits`, `score`, `predict`."""

    def __init__(self, task, tokenizer, labels: list[str], inputs: ModelInputs, backend: Backend):
        self.task, self.tokenizer, self.labels, self.inputs, self.backend = task, tokenizer, list(labels), inputs, backend

    @property
    def max_length(self) -> int:
        return self.inputs.max_length

    @property
    def truncation(self) -> str:
        return self.inputs.truncation

    def encode(self, texts: list) -> Encoded:
        return self.task.encode(self.tokenizer, self.inputs, texts)

    def logits(self, split: TokenizedSplit, batch_size: int = 64, per_token: bool | None = None) -> np.ndarray:
        return self.backend.logits(split, batch_size, self.task.per_token if per_token is None else per_token)

    def decode(self, encoded: Encoded, batch_size: int = 64) -> list[dict]:
        """The task's predictions for encoded inputs (per-token logits are handed over per row)."""
        split = encoded.split
        logits = self.logits(split, batch_size)
        if self.task.per_token:
            logits = [logits[split.offsets[i]:split.offsets[i + 1]] for i in range(len(split))]
        return self.task.decode(encoded, logits, self.labels)

    def predict(self, texts: list, batch_size: int = 64) -> list[dict]:
        """One prediction dict per input, shaped by the task (kubetune.tasks)."""
        return [s.prediction for s in self.score(texts, batch_size, chunk=0)]

    def score(self, texts: list, batch_size: int = 64, on_batch: Callable[[int, float], None] | None = None,
              chunk: int | None = None) -> list[Scored]:
        """Every input through the path, in input order. Inputs are taken in chunks of similar length
        (`chunk` inputs, default `batch_size`; 0: all at once, as serving runs a micro-batch), each
        encoded in one tokenizer call and run `batch_size` rows at a time sorted by token length
        (little padding). The next chunk is encoded in a thread while the backend runs the current
        one (tokenizers and ONNX Runtime both release the GIL). `on_batch(inputs, seconds)` after each chunk."""
        if not texts:
            return []
        order = np.argsort(np.fromiter((input_chars(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
        step = (chunk if chunk is not None else batch_size) or len(texts)
        chunks = [order[i:i + step] for i in range(0, len(order), step)]
        out: list[Scored | None] = [None] * len(texts)
        if len(chunks) == 1:  # one chunk (a serving micro-batch): no thread to hand it to
            self._run(chunks[0], self.encode([texts[i] for i in chunks[0]]), batch_size, out, on_batch, time.perf_counter())
            return out
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
            pending = pool.submit(self.encode, [texts[i] for i in chunks[0]])
            for k, index in enumerate(chunks):
                t0 = time.perf_counter()
                encoded = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(self.encode, [texts[i] for i in chunks[k + 1]])
                self._run(index, encoded, batch_size, out, on_batch, t0)
        return out

    def _run(self, index: np.ndarray, encoded: Encoded, batch_size: int, out: list, on_batch, t0: float) -> None:
        for i, p, ids, cut in zip(index, self.decode(encoded, batch_size), encoded.input_ids(), encoded.truncated):
            out[i] = Scored(p, ids, bool(cut))
        if on_batch:
            on_batch(len(index), time.perf_counter() - t0)
