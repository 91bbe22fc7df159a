"""Subsamples, seeded stratified splits, content fingerprints, and the dataset folder's writer.

Without eval/test files the splits are made here: stratified by label, seeded, and grouped by text
so that duplicates never straddle two splits. Both are decided on per-row arrays (labels, 8-byte
text hashes: kubetune.validation.tables.SplitIndex) and the rows are then written a record batch at
a time (`prepare_tables`), so a split of millions of rows is never held in memory; the result is the
same as deciding on the rows themselves (`split_frame`, `subsample`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kubetune.errors import InputError
from kubetune.storage import formats
from kubetune.validation.report import SPLITS


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


def sample_mask(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Which rows a seeded sample of `limit` rows stratified by label keeps (all when limit is 0).
    `labels`: per row, a label or a code standing for one (codes: ordered as the labels' names)."""
    keep = np.ones(len(labels), dtype=bool)
    if not limit or len(labels) <= limit:
        return keep
    keep[:] = False
    rng = np.random.default_rng(seed)
    take = _allocate(pd.Series(labels).value_counts(), limit)
    for label in sorted(take):
        rows = np.flatnonzero(labels == label)
        keep[rows[np.sort(rng.choice(len(rows), size=take[label], replace=False))]] = True
    return keep


def split_codes(groups: np.ndarray, labels: np.ndarray, fractions: dict[str, float], seed: int,
                rank: np.ndarray | None = None) -> np.ndarray:
    """Per row: 0 for train, k for the k-th of `fractions`. Stratified by each group's first label,
    seeded; rows of one group (identical texts, or one question's candidates) share a split. `labels`:
    per row a label, or a code with `rank` giving each code's place in the sorted names."""
    rng = np.random.default_rng(seed)
    codes, first = _first_seen_ids(groups)
    first_label = labels[first] if rank is None else rank[labels[first]]
    del first
    group_split = np.zeros(len(first_label), dtype=np.int8)
    for label in sorted(set(first_label.tolist())):
        texts = np.flatnonzero(first_label == label)
        texts = texts[rng.permutation(len(texts))]
        start = 0
        for k, frac in enumerate(fractions.values(), start=1):
            n = int(round(len(texts) * frac))
            if frac > 0 and len(texts) >= 3:
                n = max(n, 1)  # every class appears in every split it can
            group_split[texts[start:start + n]] = k
            start += n
    return group_split[codes]


def _first_seen_ids(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row's group id, numbered in order of first appearance; each group's first row), as
    pandas.factorize would number them, by a stable sort instead of a hash table: ~28 bytes a row at
    the peak rather than ~50 (this runs over every row of a split of millions)."""
    n = len(groups)
    if groups.dtype == object:  # texts (in-memory frames): their hashes group them the same
        from kubetune.validation.tables import text_hashes

        groups = text_hashes(groups)
    order = np.argsort(groups, kind="stable")  # equal groups together, each in row order
    sorted_groups = groups[order]
    new = np.ones(n, dtype=bool)
    np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=new[1:])
    del sorted_groups
    first = order[new]  # a group's first row (the sort is stable)
    sorted_id = np.cumsum(new, dtype=np.int32) - 1
    del new
    ids = np.empty(n, dtype=np.int32)
    ids[order] = sorted_id
    del order, sorted_id
    by_first = np.argsort(first, kind="stable")
    rank = np.empty(len(first), dtype=np.int32)
    rank[by_first] = np.arange(len(first), dtype=np.int32)
    return rank[ids], first[by_first]


def subsample(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    return frame[sample_mask(frame["label"].to_numpy(dtype=object), limit, seed)]


def split_frame(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Stratified, seeded split of `frame` into 'train' and the named fractions. Identical texts are
    one group, so a duplicate never lands in two splits."""
    codes = split_codes(frame["text"].to_numpy(dtype=object), frame["label"].to_numpy(dtype=object), fractions, seed)
    return {name: frame[codes == k] for k, name in enumerate(["train", *fractions])}


def fingerprint(frame: pd.DataFrame, columns: tuple[str, ...] = ("text", "label")) -> str:
    """sha256 over the rows' values in order: equal iff the split has the same rows in the same order."""
    h = hashlib.sha256()
    _feed(h, frame, columns)
    return h.hexdigest()


def _feed(h, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    for row in zip(*(frame[c] for c in columns)):
        h.update(json.dumps(list(row), ensure_ascii=False).encode())
        h.update(b"\n")


# ---------------------------------------------------------------------------------------------
# the dataset folder


@dataclass
class CheckedTable:
    """A split that passed the checks: its rows (a source of record batches) and its index."""

    source: object  # .batches() -> frames
    index: object  # kubetune.validation.tables.SplitIndex


class _SplitWriter:
    """One split's Parquet file, written in row groups of formats.SPLIT_ROW_GROUP rows as rows arrive,
    with its fingerprint and class counts: to a hidden partial file, renamed into place by `publish`
    (an input that is the output, a dataset validated again in place, is read to its end first)."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        import pyarrow as pa

        self.path, self.partial, self.columns = path, path.with_name(f".{path.name}.partial"), (*columns, "source_row")
        self.schema = pa.schema([(c, pa.string()) for c in columns] + [("source_row", pa.int64())])
        self.writer, self.pending, self.rows = None, [], 0
        self.hash, self.classes = hashlib.sha256(), Counter()

    def add(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa

        if frame.empty:
            return
        frame = frame[list(self.columns)]
        _feed(self.hash, frame, self.columns[:-1])
        self.classes.update(frame["label"])
        self.rows += len(frame)
        # held as Arrow until a row group is full: rows kept as Python strings would pin the memory of
        # the whole batches they came from
        self.pending.append(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        if sum(t.num_rows for t in self.pending) >= formats.SPLIT_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            # texts are nearly all distinct: a dictionary for them costs memory and saves nothing
            self.writer = pq.ParquetWriter(self.partial, self.schema, use_dictionary=["label"])
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=formats.SPLIT_ROW_GROUP)
        self.pending = []

    def close(self) -> dict:
        self._flush()
        self.writer.close()
        return {"rows": self.rows, "class_counts": dict(sorted(self.classes.items())), "fingerprint": self.hash.hexdigest()}

    def publish(self) -> None:
        self.partial.replace(self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.partial.unlink(missing_ok=True)


@dataclass
class Plan:
    """Where each row goes: per input split and row, the index in SPLITS of its split (-1: left out
    by the sample); the splits made here and the model's labels (the train split's, sorted)."""

    targets: dict
    missing: dict
    labels: list


def plan_tables(usable: dict[str, CheckedTable], cfg) -> Plan:
    """Subsample and split (stratified, seeded, grouped) on the splits' indexes alone."""
    missing = {s: getattr(cfg, f"{s}_fraction") for s in ("eval", "test") if s not in usable}
    targets = {}
    for split, table in usable.items():
        index, rank = table.index, _rank(table.index)
        keep = sample_mask(rank[index.label], cfg.limit, cfg.seed) if cfg.limit and len(index) > cfg.limit else None
        target = np.full(len(index), SPLITS.index(split) if keep is None else -1, dtype=np.int8)
        if keep is not None:
            target[keep] = SPLITS.index(split)
        if split == "train" and missing:
            # the whole split when nothing is sampled away: no copies of its per-row arrays
            groups, labels = (index.group, index.label) if keep is None else (index.group[keep], index.label[keep])
            codes = split_codes(groups, labels, missing, cfg.seed, rank)
            names = np.array([SPLITS.index(n) for n in ("train", *missing)], dtype=np.int8)
            if keep is None:
                target = names[codes]
            else:
                target[keep] = names[codes]
        targets[split] = target
    for k, split in enumerate(SPLITS):
        if not any((t == k).any() for t in targets.values()):
            raise InputError(f"the {split} split is empty; give more data or a {split} file")
    train = usable["train"].index
    labels = sorted(train.labels[c] for c in np.unique(train.label[targets["train"] == 0]))
    return Plan(targets, missing, labels)


def _rank(index) -> np.ndarray:
    """Each label code's place among the label names sorted (codes are numbered as first seen)."""
    return np.argsort(np.argsort(np.array(index.labels, dtype=object))).astype(np.int32)


def write_tables(task, usable: dict[str, CheckedTable], plan: Plan, out_dir: Path) -> dict:
    """Write train/eval/test.parquet as `plan` says, reading the inputs again a batch at a time;
    returns each split's meta (rows, the task's split_counts, class counts, fingerprint)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out_dir / f"{s}.parquet", task.columns) for s in SPLITS}
    try:
        for split, table in usable.items():
            start = 0
            for batch in table.source.batches():
                target = plan.targets[split][start:start + len(batch)]
                start += len(batch)
                for k in np.unique(target[target >= 0]):
                    writers[SPLITS[k]].add(batch[target == k])
        out = {}
        for k, split in enumerate(SPLITS):
            source_split = split if split in usable else "train"
            index, rows = usable[source_split].index, plan.targets[source_split] == k
            # the task's counts see the split's group texts as 8-byte hashes (kubetune.tasks: split_counts)
            counts = task.split_counts(pd.DataFrame({"text": index.group[rows]}))
            written = writers[split].close()
            out[split] = {"rows": written["rows"], **counts, "class_counts": written["class_counts"],
                          "fingerprint": written["fingerprint"]}
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    for writer in writers.values():  # every split written: only now do they replace anything
        writer.publish()
    return out


def split_frames(frames: dict[str, pd.DataFrame], cfg) -> tuple[dict[str, pd.DataFrame], dict]:
    """The same for frames held in memory (rows with lists, e.g. multiple choice's choices)."""
    frames = {s: subsample(f, cfg.limit, cfg.seed) for s, f in frames.items()}
    missing = {s: getattr(cfg, f"{s}_fraction") for s in ("eval", "test") if s not in frames}
    if missing:
        frames = {**frames, **split_frame(frames["train"], missing, cfg.seed)}
    for split in SPLITS:
        if frames[split].empty:
            raise InputError(f"the {split} split is empty; give more data or a {split} file")
    return frames, missing


def write_frames(task, frames: dict[str, pd.DataFrame], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in SPLITS:
        frame = frames[split]
        frame[[*task.columns, "source_row"]].reset_index(drop=True).to_parquet(out_dir / f"{split}.parquet", index=False,
                                                                          row_group_size=formats.SPLIT_ROW_GROUP)
        out[split] = {
            "rows": len(frame), **task.split_counts(frame),
            "class_counts": {k: int(v) for k, v in frame["label"].value_counts().sort_index().items()},
            "fingerprint": fingerprint(frame, task.columns),
        }
    return out
