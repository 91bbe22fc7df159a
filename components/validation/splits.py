"""Subsamples, seeded stratified splits and content fingerprints of validated tables.

Without eval/test files the splits are made here: stratified by label, seeded, and grouped by text
so that duplicates never straddle two splits.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd


def _allocate(counts: pd.Series, total: int) -> dict:
    """Largest-remainder allocation of `total` rows over classes, at least one per class."""
    exact = counts / counts.sum() * total
    alloc = np.maximum(np.floor(exact).astype(int), 1).clip(upper=counts)
    order = (exact - np.floor(exact)).sort_values(ascending=False).index
    i = 0
    while alloc.sum() < min(total, counts.sum()):
        label = order[i % len(order)]
        if alloc[label] < counts[label]:
            alloc[label] += 1
        i += 1
    return alloc.to_dict()


def subsample(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    if not limit or len(frame) <= limit:
        return frame
    rng = np.random.default_rng(seed)
    take = _allocate(frame["label"].value_counts(), limit)
    parts = [
        group.iloc[np.sort(rng.choice(len(group), size=take[label], replace=False))]
        for label, group in frame.groupby("label", sort=True)
    ]
    return pd.concat(parts).sort_values("source_row")


def split_frame(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Stratified, seeded split of `frame` into 'train' and the named fractions. Identical texts are
    one group, so a duplicate never lands in two splits."""
    rng = np.random.default_rng(seed)
    first_label = frame.groupby("text", sort=False)["label"].first()
    assignment: dict[str, str] = {}
    for label in sorted(first_label.unique()):
        texts = first_label[first_label == label].index.to_numpy()
        texts = texts[rng.permutation(len(texts))]
        start = 0
        for name, frac in fractions.items():
            n = int(round(len(texts) * frac))
            if frac > 0 and len(texts) >= 3:
                n = max(n, 1)  # every class appears in every split it can
            for t in texts[start:start + n]:
                assignment[t] = name
            start += n
    which = frame["text"].map(lambda t: assignment.get(t, "train"))
    return {name: frame[which == name] for name in ["train", *fractions]}


def fingerprint(frame: pd.DataFrame, columns: tuple[str, ...] = ("text", "label")) -> str:
    """sha256 over the rows' values in order: equal iff the split has the same rows in the same order."""
    h = hashlib.sha256()
    for row in zip(*(frame[c] for c in columns)):
        h.update(json.dumps(list(row), ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


