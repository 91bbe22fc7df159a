"""Token-tagged sentences (NER data): reading them (CoNLL columns or JSONL, through
kubetune.storage.formats), checking them and writing the dataset folder, for the token
classification task (kubetune.tasks.token; its module docstring has the commands).

Files: CoNLL-style (.conll .txt .iob .bio ...), one token per line, whitespace-separated columns,
the token in `token_column` (default 0) and its tag in `tag_column` (default -1: the last); a blank
line ends a sentence; `-DOCSTART-` lines are skipped. Or JSONL: one sentence per line,
{"tokens": [...], "tags": [...]} (field names configurable). A folder or prefix of such files is one split.

Checks, per input file (critical ones stop the run with exit code 2, warnings go to the report):
  critical  every sentence has as many tags as tokens; no token is empty or whitespace
  critical  every tag is O, B-<type> or I-<type> (IOB2)
  critical  an I-<type> follows a B-/I- of the same type (with repair_tags=true it becomes B-<type>
            instead, counted as a warning: IOB1 data and sloppy annotation tools produce these)
  critical  eval/test tags are a subset of the train tags (the model cannot predict an unseen tag)
  critical  train has at least one entity
  warning   empty sentences (dropped, counted), sentences longer than max_sentence_words (they will
            be truncated by tokenize, which reports how many words are lost)

Outputs the same dataset folder as the sequence task: train/eval/test.parquet (columns tokens,
tags: lists of strings; source_row: the sentence's first line), labels.json (the tag set, O first,
then B-/I- per type), meta.json (task, counts per tag, fingerprints).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kubetune.errors import InputError
from kubetune.storage import assets, formats
from kubetune.storage.contracts import DatasetMeta
from kubetune.storage.store import S3Settings
from kubetune.tasks.metrics import entity_spans
from kubetune.validation.report import EXAMPLES, SPLITS, Check, Report
from kubetune.validation.splits import fingerprint

FORMATS = ("conll", "jsonl")


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    line: int  # first line of the sentence in its file (offset by the files before it in a folder split)


def _strings(value, uri: str, n: int, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{uri}: line {n}: field {field!r} must be a list of strings, got {json.dumps(value)[:80]}")
    return value


def read_sentences(uri: str, *, split: str = "train", token_column: int = 0, tag_column: int = -1, tokens_field: str = "tokens",
                   tags_field: str = "tags", settings: S3Settings | None = None,
                   workdir: Path | None = None) -> tuple[list[Sentence], str, list[tuple[str, int]]]:
    """(sentences, format, files) of one split: a file, a folder/prefix of files, or a `builtin:`
    dataset (its `split` file when it has official splits). Problems that make a file unreadable (a
    line with too few columns, invalid JSON, a field that is not a list of strings) raise an InputError
    naming the file, line and fix; problems of the content are `check_sentences`'."""
    if assets.is_builtin(uri):
        path, asset = assets.resolve(uri, split)
        fmt, token_column, tag_column = "conll", asset.reader["token_column"], asset.reader["tag_column"]
        files = [(uri, path)]
    else:
        uris, fmt = formats.split_files(uri, settings, FORMATS)
        files = formats.local_files(uris, settings, workdir or Path("."))
    sentences: list[Sentence] = []
    located, offset = [], 0
    for file_uri, path in files:
        located.append((file_uri, offset))
        if fmt == "jsonl":
            rows = ((r.row, _strings(r.fields[tokens_field], file_uri, r.row, tokens_field),
                     _strings(r.fields[tags_field], file_uri, r.row, tags_field))
                    for r in formats.read_records(path, file_uri, "jsonl", columns=(tokens_field, tags_field)))
        else:
            rows = formats.read_conll(path, file_uri, token_column, tag_column)
        last = 0
        for line, tokens, tags in rows:
            sentences.append(Sentence(tokens, tags, offset + line))
            last = line
        offset += last + 1
    if not sentences:
        raise InputError(f"{uri}: file is empty (no sentences)")
    return sentences, fmt, located


def tag_order(tags: set[str]) -> list[str]:
    """O first, then B-/I- of each type, types alphabetically: a stable, readable label order."""
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in types for p in "BI" if f"{p}-{k}" in tags]


def _is_tag(tag: str) -> bool:
    return tag == "O" or (len(tag) > 2 and tag[:2] in ("B-", "I-"))


def scheme_problems(s: Sentence) -> tuple[list[int], list[int], list[int]]:
    """Word positions with (a) a tag that is not IOB2, (b) an I-X that continues nothing, (c) an
    empty or whitespace token."""
    bad, orphan, blank = [], [], []
    prev = "O"
    for i, (tok, tag) in enumerate(zip(s.tokens, s.tags)):
        if not tok.strip():
            blank.append(i)
        if not _is_tag(tag):
            bad.append(i)
        elif tag.startswith("I-") and prev[2:] != tag[2:]:
            orphan.append(i)
        prev = tag if _is_tag(tag) else "O"
    return bad, orphan, blank


def repair(tags: list[str]) -> list[str]:
    """I-X that continues nothing -> B-X (IOB1 -> IOB2)."""
    out, prev = [], "O"
    for tag in tags:
        fixed = "B-" + tag[2:] if tag.startswith("I-") and prev[2:] != tag[2:] else tag
        out.append(fixed)
        prev = fixed
    return out


class Problems:
    """Failures of one kind in one file: counted, with the first few quoted by line."""

    def __init__(self):
        self.items: dict[tuple[str, str], dict] = {}

    def add(self, split: str, name: str, severity: str, description: str, line: int, example: str, column: str = "tags"):
        entry = self.items.setdefault((split, name), {"severity": severity, "description": description, "column": column,
                                                      "count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES:
            entry["examples"].append((line, example))


def _check_file(split: str, sentences: list[Sentence], train_tags: set[str] | None, cfg, problems: Problems) -> list[Sentence]:
    """Adds this file's problems; returns its usable sentences (empty ones dropped, tags repaired
    when asked)."""
    kept = []
    for s in sentences:
        if len(s.tokens) != len(s.tags):
            problems.add(split, "tokens_tags_same_length", "critical",
                         "have a different number of tokens and tags; every token needs exactly one tag",
                         s.line, f"{len(s.tokens)} tokens, {len(s.tags)} tags")
            continue
        if not s.tokens:
            problems.add(split, "no_empty_sentences", "warning", "are empty (no tokens) and were dropped", s.line, "[]", "tokens")
            continue
        bad, orphan, blank = scheme_problems(s)
        for i in blank:
            problems.add(split, "no_blank_tokens", "critical", "have an empty or whitespace-only token; remove or replace it",
                         s.line, f"token {i + 1}: {s.tokens[i]!r}", "tokens")
        for i in bad:
            problems.add(split, "iob2_tags", "critical", "have a tag that is not IOB2 (O, B-<type> or I-<type>); "
                         "convert IOBES/BILOU tags or fix the tag column", s.line, f"token {i + 1} {s.tokens[i]!r}: tag {s.tags[i]!r}")
        for i in orphan:
            prev = s.tags[i - 1] if i else "(sentence start)"
            if cfg.repair_tags:
                problems.add(split, "iob2_sequence_repaired", "warning", "had an I- tag that continues nothing; "
                             "repaired to B- (repair_tags=true)", s.line, f"token {i + 1} {s.tokens[i]!r}: {prev} -> {s.tags[i]}")
            else:
                problems.add(split, "iob2_sequence", "critical", "have an I-<type> tag that does not follow B-/I- of the same type; "
                             "fix the annotation, or pass --repair-tags to turn it into B-<type> (e.g. IOB1 data)",
                             s.line, f"token {i + 1} {s.tokens[i]!r}: {prev} -> {s.tags[i]}")
        tags = repair(s.tags) if cfg.repair_tags and orphan else s.tags
        if train_tags is not None:
            for i, tag in enumerate(tags):
                if _is_tag(tag) and tag not in train_tags:
                    problems.add(split, "tags_in_train", "critical", "have a tag that never occurs in the train file "
                                 "(the model cannot predict it); fix the tag or add training examples of it",
                                 s.line, f"token {i + 1} {s.tokens[i]!r}: tag {tag!r}")
        if len(s.tokens) > cfg.max_sentence_words:
            problems.add(split, "sentence_length", "warning", f"have more than {cfg.max_sentence_words} words (tokenize truncates "
                         "to max_length tokens and reports the words lost)", s.line, f"{len(s.tokens)} words", "tokens")
        kept.append(Sentence(s.tokens, tags, s.line))
    return kept


def check_sentences(sentences: dict[str, list[Sentence]], sources: dict[str, str], cfg, formats_: dict[str, str],
                    files: dict | None = None):
    """Returns (Report, usable sentences per split)."""
    problems = Problems()
    usable = {"train": _check_file("train", sentences["train"], None, cfg, problems)}
    train_tags = {t for s in usable["train"] for t in s.tags}
    for split in SPLITS[1:]:
        if split in sentences:
            usable[split] = _check_file(split, sentences[split], train_tags, cfg, problems)
    checks = []
    for (split, name), e in problems.items.items():
        checks.append(Check(split, name, e["column"], e["severity"], False, e["description"], e["count"],
                            len(sentences[split]), e["examples"], unit="sentences"))
    if not any(e[0] for s in usable["train"] for e in entity_spans(s.tags)):
        checks.append(Check("train", "has_entities", "tags", "critical", False,
                            "contains no entity (only O tags): there is nothing to learn; check the tag column"))
    for split in sentences:
        if not any(c.split == split for c in checks):
            checks.append(Check(split, "all_checks", "tokens/tags", "critical", True, "", 0, len(sentences[split]), unit="sentences"))
    return Report(sources=sources, formats=formats_, checks=checks, files=files or {}), usable


def _sample(sentences: list[Sentence], n: int, rng: np.random.Generator) -> list[Sentence]:
    if not n or len(sentences) <= n:
        return sentences
    return [sentences[i] for i in np.sort(rng.choice(len(sentences), size=n, replace=False))]


def prepare_sentences(usable: dict[str, list[Sentence]], sources: dict[str, str], cfg, out_dir: Path, task: str) -> dict:
    """Subsample, split (seeded, when no eval/test file) and write the dataset folder."""
    rng = np.random.default_rng(cfg.seed)
    splits = {s: _sample(v, cfg.limit, rng) for s, v in usable.items()}
    missing = {s: getattr(cfg, f"{s}_fraction") for s in ("eval", "test") if s not in splits}
    if missing:
        order = rng.permutation(len(splits["train"]))
        start, rest = 0, splits["train"]
        for name, frac in missing.items():
            n = max(1, int(round(len(rest) * frac)))
            splits[name] = [rest[i] for i in sorted(order[start:start + n])]
            start += n
        splits["train"] = [rest[i] for i in sorted(order[start:])]
    labels = tag_order({t for s in splits["train"] for t in s.tags})
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"task": task, "labels": labels, "sources": sources, "split_made_here": sorted(missing),
            "config": asdict(cfg), "splits": {}}
    for split in SPLITS:
        rows = splits[split]
        if not rows:
            raise InputError(f"the {split} split is empty; give more data or a {split} file")
        pd.DataFrame({"tokens": [s.tokens for s in rows], "tags": [s.tags for s in rows],
                      "source_row": [s.line for s in rows]}).to_parquet(out_dir / f"{split}.parquet", index=False,
                                                                        row_group_size=formats.SPLIT_ROW_GROUP)
        counts = pd.Series([t for s in rows for t in s.tags]).value_counts()
        meta["splits"][split] = {
            "rows": len(rows),
            "words": int(sum(len(s.tokens) for s in rows)),
            "entities": {k: int(v) for k, v in pd.Series([e[0] for s in rows for e in entity_spans(s.tags)]).value_counts().sort_index().items()},
            "class_counts": {k: int(counts.get(k, 0)) for k in labels},
            "fingerprint": fingerprint(pd.DataFrame({"tokens": [r.tokens for r in rows], "tags": [r.tags for r in rows]}), ("tokens", "tags")),
        }
    DatasetMeta(**meta).write(out_dir)
    return meta


def sources_for(train_uri: str, eval_uri: str, test_uri: str) -> dict[str, str]:
    """Which file feeds each split: given files, else a builtin's official eval/test splits."""
    sources = {"train": train_uri, "eval": eval_uri, "test": test_uri}
    if assets.is_builtin(train_uri) and assets.resolve(train_uri)[1].splits:
        sources = {s: u or train_uri for s, u in sources.items()}
    return {s: u for s, u in sources.items() if u}
