"""Baselines shared by the benchmarks that score a text against candidates (benchmarks/pairs.py,
benchmarks/choice.py): no fine-tuning, so they say what fine-tuning must beat.

  tfidf_cosine(fit, a, b)     cosine of TF-IDF vectors (fitted on `fit`) between a[i] and b[i]
  embedding_cosine(model, a, b)  cosine of the base model's mean-pooled last hidden states (the
                              zero-shot bi-encoder: all-MiniLM-L6-v2 is a sentence-embedding model,
                              so this is the strongest thing it does without training)

and `run_steps`, what they are compared with: kubetune's own steps in one process (validate ->
tokenize -> finetune -> test scoring, as `kubetune run` runs them) on work/train.parquet and
work/test.parquet.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def tfidf_cosine(fit: list[str], a: list[str], b: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, min_df=1, stop_words="english").fit(fit)
    return np.asarray(vec.transform(a).multiply(vec.transform(b)).sum(axis=1)).ravel()


def embed(model_dir: Path, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings [texts, hidden] of the base model (no head, no training)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    unique = list(dict.fromkeys(texts))
    out = {}
    with torch.inference_mode():
        for start in range(0, len(unique), batch_size):
            batch = unique[start:start + batch_size]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            out.update(zip(batch, pooled.numpy()))
    return np.stack([out[t] for t in texts])


def embedding_cosine(model_dir: Path, a: list[str], b: list[str], max_length: int) -> np.ndarray:
    ea, eb = embed(model_dir, a, max_length), embed(model_dir, b, max_length)
    return (ea * eb).sum(-1)


def run_steps(task: str, work: Path, model_dir: Path, a, timings: dict, truncation: str = "head",
              seed: int = 0) -> tuple[dict, dict, dict]:
    """(dataset meta, training result, test metrics) of kubetune on the benchmark's split; `a`: the
    benchmark's arguments (epochs, batch_size, learning_rate, max_length, device); `truncation` and
    `seed` (the fine-tune's: the head's init, dropout, batch order; the eval split stays validate's
    seed 0) as the pipeline parameters; seconds per phase go to `timings`. Exits 2 when validation
    rejects the data."""
    from kubetune.steps.evaluate import GateConfig, score_test
    from kubetune.steps.finetune import FinetuneConfig, finetune
    from kubetune.steps.tokenize import TokenizeConfig, tokenize
    from kubetune.steps.validate import ValidateConfig, validate
    from kubetune.storage.contracts import TokensMeta

    t0 = time.perf_counter()
    report, meta = validate(str(work / "train.parquet"), "", str(work / "test.parquet"), ValidateConfig(task=task), work / "dataset")
    if not report.passed:
        print(report.error_message())
        raise SystemExit(2)
    tokenize(work / "dataset", model_dir, work / "tokens", TokenizeConfig(max_length=a.max_length, truncation=truncation), store=None)
    timings["validate+tokenize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    training = finetune(work / "tokens", model_dir, work / "model", FinetuneConfig(epochs=a.epochs, batch_size=a.batch_size,
                                                                                  learning_rate=a.learning_rate, device=a.device,
                                                                                  seed=seed))
    timings["finetune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics, _, _, _ = score_test(work / "model", work / "tokens", work / "dataset", TokensMeta.read(work / "tokens"),
                                  GateConfig(device=a.device))
    timings["test"] = time.perf_counter() - t0
    return meta, training, metrics
