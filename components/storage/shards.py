"""Token shards: variable-length token ids stored without padding, and the batches made from them.

A split is a list of `<split>-NNNNN.npz` files, each holding `ids` (all rows' token ids end to end,
int32), `offsets` (row i is ids[offsets[i]:offsets[i+1]]) and `labels` (int64). Token-classification
shards also hold `token_labels` (int32, aligned with `ids` through the same offsets: the word's tag
id on its first sub-token, IGNORE (-100) on the others and on special tokens); their `labels` are
IGNORE (a sentence has no single label). Padding happens per
batch, at collate time, to the longest row of the batch: rows of similar length are batched together,
so little compute goes to pad tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = -100  # torch cross_entropy's ignore_index: positions that carry no label


@dataclass
class TokenizedSplit:
    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    token_labels: np.ndarray | None = None  # token classification only, aligned with ids

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def row_labels(self, i: int) -> np.ndarray:
        return self.token_labels[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_rows(cls, rows: list[list[int]], labels: np.ndarray | None = None) -> "TokenizedSplit":
        """A split of `rows` (token id lists), e.g. texts tokenized for inference (labels: zeros)."""
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        ids = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, dtype=np.int32)
        return cls(ids, offsets, np.zeros(len(rows), dtype=np.int64) if labels is None else labels)

    def take(self, index: np.ndarray) -> "TokenizedSplit":
        rows = [self.row(i) for i in index]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
        token_labels = None
        if self.token_labels is not None:
            token_labels = np.concatenate([self.row_labels(i) for i in index]) if rows else np.zeros(0, dtype=np.int32)
        return TokenizedSplit(ids, offsets, self.labels[index], token_labels)


def logit_rows(split: TokenizedSplit, per_token: bool) -> int:
    """How many logit rows a split has: one per row, or with `per_token` one per real token."""
    return int(split.offsets[-1]) if per_token else len(split)


def place_logits(out: np.ndarray, split: TokenizedSplit, index: np.ndarray, logits: np.ndarray, per_token: bool) -> None:
    """Put a batch's logits (rows `index`, padded) into `out` in the split's order: a row each, or
    with `per_token` each row's real tokens at split.offsets[i]:split.offsets[i + 1]."""
    if not per_token:
        out[index] = logits
        return
    for j, i in enumerate(index):
        out[split.offsets[i]:split.offsets[i + 1]] = logits[j, : split.lengths[i]]


def _concat(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter((t for r in rows for t in r), dtype=np.int32, count=total)


def save_split(out_dir: Path, split: str, rows: list[list[int]], labels: np.ndarray, shard_rows: int,
               token_labels: list[list[int]] | None = None) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for n, start in enumerate(range(0, max(len(rows), 1), shard_rows)):
        chunk = rows[start:start + shard_rows]
        offsets = np.zeros(len(chunk) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in chunk], out=offsets[1:])
        arrays = {"ids": _concat(chunk, int(offsets[-1])), "offsets": offsets,
                  "labels": np.asarray(labels[start:start + shard_rows], dtype=np.int64)}
        if token_labels is not None:
            arrays["token_labels"] = _concat(token_labels[start:start + shard_rows], int(offsets[-1]))
        name = f"{split}-{n:05d}.npz"
        np.savez(out_dir / name, **arrays)
        names.append(name)
    return names


def load_split(tokens_dir: Path, split: str) -> TokenizedSplit:
    files = sorted(tokens_dir.glob(f"{split}-*.npz"))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {tokens_dir}")
    ids, offsets, labels, token_labels, base = [], [np.zeros(1, dtype=np.int64)], [], [], 0
    for f in files:
        with np.load(f) as z:
            ids.append(z["ids"])
            offsets.append(z["offsets"][1:] + base)
            labels.append(z["labels"])
            if "token_labels" in z:
                token_labels.append(z["token_labels"])
            base += int(z["offsets"][-1])
    return TokenizedSplit(np.concatenate(ids), np.concatenate(offsets), np.concatenate(labels),
                          np.concatenate(token_labels) if token_labels else None)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: int = 50) -> list[np.ndarray]:
    """Training batches: shuffle, cut into groups of `group` batches, sort each group by length,
    cut into batches, shuffle the batch order. Similar lengths share a batch (little padding) while
    the order stays random from epoch to epoch."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = order[start:start + batch_size * group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Inference batches: all rows sorted by length (results are put back in row order by the caller)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_width(lengths: np.ndarray, multiple: int = 8) -> int:
    return int(-(-lengths.max() // multiple) * multiple)


def token_types(input_ids: np.ndarray, mask: np.ndarray, sep_id: int | None) -> np.ndarray:
    """BERT segment ids for padded rows: 0 up to and including the first [SEP], 1 after it (a text
    pair's second text); all zeros without `sep_id` (single-text tasks). Derived from the ids, so the
    shards and the ONNX inputs need no third array: the segment is where the tokenizer put [SEP]."""
    if sep_id is None:
        return np.zeros_like(input_ids)
    sep = input_ids == sep_id
    return ((np.cumsum(sep, axis=1) - sep) > 0).astype(input_ids.dtype) * mask


def pad_batch(split: TokenizedSplit, index: np.ndarray, pad_id: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 arrays for rows `index`, padded on the right to the batch's
    longest row rounded up to `multiple` (fewer distinct shapes, friendlier to GPU kernels)."""
    lengths = split.lengths[index]
    width = batch_width(lengths, multiple)
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for j, i in enumerate(index):
        row = split.row(i)
        input_ids[j, : len(row)] = row
        mask[j, : len(row)] = 1
    return input_ids, mask
