"""Token shards: variable-length token ids stored without padding, and the batches made from them.

A split is a list of `<split>-NNNNN.npz` files, each holding `ids` (all rows' token ids end to end,
int32), `offsets` (row i is ids[offsets[i]:offsets[i+1]]) and `labels` (int64). Token-classification
shards also hold `token_labels` (int32, aligned with `ids` through the same offsets: the word's tag
id on its first sub-token, IGNORE (-100) on the others and on special tokens); their `labels` are
IGNORE (a sentence has no single label). Multiple-choice shards hold `choices` (C) too: a row is then
C sequences in a row (one per (question, choice) pair; an absent choice of a question with fewer is an
empty sequence), and `offsets` index sequences; `pad_batch` is the one place where such rows become
`[batch, choices, sequence]` arrays. Padding happens per batch, at collate time, to the longest row
of the batch: rows of similar length are batched together, so little compute goes to pad tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kubetune.storage.space import writing

IGNORE = -100  # torch cross_entropy's ignore_index: positions that carry no label
ABSENT = -1e9  # the logit of an absent choice (multiple choice): no probability after a softmax


@dataclass
class TokenizedSplit:
    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    token_labels: np.ndarray | None = None  # token classification only, aligned with ids
    choices: int = 1  # sequences per row (multiple choice: one per choice); offsets index sequences

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def seq_lengths(self) -> np.ndarray:
        """Tokens per sequence: [rows], or [rows, choices] for multiple choice (0: an absent choice)."""
        lengths = np.diff(self.offsets)
        return lengths if self.choices == 1 else lengths.reshape(-1, self.choices)

    @property
    def lengths(self) -> np.ndarray:
        """The padded width each row needs: its (longest) sequence's length."""
        lengths = self.seq_lengths
        return lengths if self.choices == 1 else lengths.max(axis=1, initial=0)

    @property
    def tokens(self) -> np.ndarray:
        """Real tokens per row (all its choices')."""
        lengths = self.seq_lengths
        return lengths if self.choices == 1 else lengths.sum(axis=1)

    def sequences(self, index: np.ndarray) -> np.ndarray:
        """The sequence numbers of rows `index`, choices of one row together."""
        index = np.asarray(index, dtype=np.int64)
        return index if self.choices == 1 else (index[:, None] * self.choices + np.arange(self.choices)).ravel()

    def row(self, i: int) -> np.ndarray:
        """Sequence i's token ids (row i unless the split has choices)."""
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def row_labels(self, i: int) -> np.ndarray:
        return self.token_labels[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_rows(cls, rows: list[list[int]], labels: np.ndarray | None = None, choices: int = 1) -> "TokenizedSplit":
        """A split of `rows` (token id lists; `choices` consecutive ones per row for multiple choice),
        e.g. inputs encoded for inference (labels: zeros)."""
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        ids = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, dtype=np.int32)
        return cls(ids, offsets, np.zeros(len(rows) // choices, dtype=np.int64) if labels is None else labels, choices=choices)

    def take(self, index: np.ndarray) -> "TokenizedSplit":
        index = np.asarray(index, dtype=np.int64)
        seqs = self.sequences(index)
        rows = [self.row(i) for i in seqs]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
        token_labels = None
        if self.token_labels is not None:
            token_labels = np.concatenate([self.row_labels(i) for i in seqs]) if rows else np.zeros(0, dtype=np.int32)
        return TokenizedSplit(ids, offsets, self.labels[index], token_labels, self.choices)


def logit_rows(split: TokenizedSplit, per_token: bool) -> int:
    """How many logit rows a split has: one per row, or with `per_token` one per real token."""
    return int(split.offsets[-1]) if per_token else len(split)


def logit_width(split: TokenizedSplit, num_labels: int) -> int:
    """Logits per row: one per label, or for multiple choice one per choice."""
    return split.choices if split.choices > 1 else num_labels


def place_logits(out: np.ndarray, split: TokenizedSplit, index: np.ndarray, logits: np.ndarray, per_token: bool) -> None:
    """Put a batch's logits (rows `index`, padded) into `out` in the split's order: a row each, or
    with `per_token` each row's real tokens at split.offsets[i]:split.offsets[i + 1]."""
    if not per_token:
        # an absent choice (an empty sequence) scores ABSENT whatever the model made of its padding
        out[index] = logits if split.choices == 1 else np.where(split.seq_lengths[index] > 0, logits, ABSENT)
        return
    for j, i in enumerate(index):
        out[split.offsets[i]:split.offsets[i + 1]] = logits[j, : split.lengths[i]]


def _concat(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter((t for r in rows for t in r), dtype=np.int32, count=total)


def save_split(out_dir: Path, split: str, rows: list[list[int]], labels: np.ndarray, shard_rows: int,
               token_labels: list[list[int]] | None = None, choices: int = 1, first: int = 0) -> list[str]:
    """`rows`: token ids per sequence (`choices` consecutive sequences per row); `labels`: one per row;
    a shard holds `shard_rows` rows, never part of one; shards are numbered from `first` (a split
    written a chunk at a time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    shard_rows *= choices  # counted in sequences below
    for n, start in enumerate(range(0, max(len(rows), 1), shard_rows)):
        chunk = rows[start:start + shard_rows]
        offsets = np.zeros(len(chunk) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in chunk], out=offsets[1:])
        arrays = {"ids": _concat(chunk, int(offsets[-1])), "offsets": offsets,
                  "labels": np.asarray(labels[start // choices:(start + shard_rows) // choices], dtype=np.int64)}
        if token_labels is not None:
            arrays["token_labels"] = _concat(token_labels[start:start + shard_rows], int(offsets[-1]))
        if choices > 1:
            arrays["choices"] = np.int64(choices)
        name = f"{split}-{first + n:05d}.npz"
        with writing(out_dir / name, f"the token shard {name}", sum(a.nbytes for a in arrays.values())):
            np.savez(out_dir / name, **arrays)
        names.append(name)
    return names


def load_split(tokens_dir: Path, split: str, mmap_bytes: int | None = None) -> TokenizedSplit:
    """A split's shards as one TokenizedSplit. Offsets and labels (16 bytes a row) are read into
    memory; the token ids (and per-token labels) too while they take at most `mmap_bytes` (default
    MMAP_BYTES), else they are copied shard by shard into an unlinked temporary file (`DiskArray`), so
    memory stays flat in the split's tokens: a batch reads only its rows, and nothing is left behind
    on disk when the process ends, however it ends."""
    files = sorted(tokens_dir.glob(f"{split}-*.npz"))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {tokens_dir}")
    offsets, labels, base, choices, token_level = [np.zeros(1, dtype=np.int64)], [], 0, 1, False
    for f in files:
        with np.load(f) as z:
            choices = int(z["choices"]) if "choices" in z else 1
            token_level = "token_labels" in z
            offsets.append(z["offsets"][1:] + base)
            labels.append(z["labels"])
            base += int(z["offsets"][-1])
    in_memory = base * 4 * (2 if token_level else 1) <= (MMAP_BYTES if mmap_bytes is None else mmap_bytes)
    ids = _joined(files, "ids", base, in_memory)
    token_labels = _joined(files, "token_labels", base, in_memory) if token_level else None
    return TokenizedSplit(ids, np.concatenate(offsets), np.concatenate(labels), token_labels, choices)


MMAP_BYTES = 32 << 20  # token ids held in memory up to this size (~250k texts); a bigger split's are read from disk


class DiskArray:
    """An int32 array in an unlinked temporary file, read a slice at a time (pread): a batch's rows
    cost their own bytes only. (A memory map costs more: each page fault maps the whole page-cache
    folio around it, up to 2 MB, so the resident memory grows with the rows touched.) Anything but a
    plain slice, and numpy's np.asarray, read the whole array."""

    dtype = np.dtype(np.int32)

    def __init__(self, file, size: int):
        self._file, self.shape = file, (size,)  # the open file keeps the unlinked data alive

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            out = np.empty(max(stop - start, 0), dtype=np.int32)
            view, done = memoryview(out).cast("B"), 0
            while done < len(view):  # one pread returns at most ~2 GB (Linux): read on until all of it is there
                got = os.preadv(self._file.fileno(), [view[done:]], start * 4 + done)
                if not got:
                    raise EOFError(f"token file ended at byte {start * 4 + done}")
                done += got
            return out
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        whole = self[0:len(self)]
        return whole.astype(dtype) if dtype is not None else whole


def _joined(files: list[Path], name: str, total: int, in_memory: bool):
    """One int32 array of every shard's `name`, end to end: in memory, or a DiskArray in an unlinked
    temporary file (the OS reclaims it with the process, however it ends)."""
    import tempfile

    if in_memory or not total:
        parts = []
        for f in files:
            with np.load(f) as z:
                parts.append(z[name])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    out = tempfile.TemporaryFile(prefix="kubetune-tokens-")
    with writing(Path(tempfile.gettempdir()), f"the {name} of {len(files)} token shards (spilled to a temporary file)", total * 4):
        for f in files:
            with np.load(f) as z:
                out.write(np.ascontiguousarray(z[name], dtype=np.int32).tobytes())
        out.flush()
    return DiskArray(out, total)


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
    return ((np.cumsum(sep, axis=-1) - sep) > 0).astype(input_ids.dtype) * mask


def pad_batch(split: TokenizedSplit, index: np.ndarray, pad_id: int, multiple: int = 8,
              width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 arrays for rows `index`, padded on the right to `width`, by
    default the batch's longest row rounded up to `multiple` (fewer distinct shapes, friendlier to
    GPU kernels): [batch, sequence], or [batch, choices, sequence] for a split with choices."""
    seqs = split.sequences(index)
    width = width or batch_width(np.maximum(split.lengths[index], 1), multiple)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for j, i in enumerate(seqs):
        row = split.row(i)
        input_ids[j, : len(row)] = row
        mask[j, : len(row)] = 1
    if split.choices > 1:
        return input_ids.reshape(len(index), split.choices, width), mask.reshape(len(index), split.choices, width)
    return input_ids, mask
