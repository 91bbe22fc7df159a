"""Baselines shared by the benchmarks that score a text against candidates (benchmarks/pairs.py,
benchmarks/choice.py): no fine-tuning, so they say what fine-tuning must beat.

  tfidf_cosine(fit, a, b)     cosine of TF-IDF vectors (fitted on `fit`) between a[i] and b[i]
  embedding_cosine(model, a, b)  cosine of the base model's mean-pooled last hidden states (the
                              zero-shot bi-encoder: all-MiniLM-L6-v2 is a sentence-embedding model,
                              so this is the strongest thing it does without training)
"""

from __future__ import annotations

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
