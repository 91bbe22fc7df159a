"""Step 2 - tokenize: the model's fast tokenizer over every split, truncated, unpadded, cached.

    python -m kubetune.steps.tokenize --dataset /tmp/kt/dataset --model builtin:all-minilm-l6-v2 \
        --out /tmp/kt/tokens --store ./kubetune-store --run-id dev

Output folder: `<split>-NNNNN.npz` token shards (see kubetune.storage.shards), `tokenizer/` (the files
that travel with the model) and meta.json (label set, max_length, length statistics, how many rows
were truncated and how many tokens that cost).

Cache: the result is keyed by the content of the data (validate's fingerprints), the tokenizer's
full definition (its tokenizer.json), max_length and the shard format, and published to
<store>/cache/tokenize/<key>/. A re-run with the same inputs copies the cached folder instead of
tokenizing again, also on another machine sharing the store.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kubetune.core.entry import add_config_args, config_from_args, run_main, step_parser
from kubetune.errors import ConfigError, InputError
from kubetune.tasks.metrics import SEQUENCE, TOKEN
from kubetune.training.modeling import resolve_model_dir
from kubetune.core.progress import Progress, log
from kubetune.storage.records import open_run, scratch
from kubetune.storage.shards import IGNORE, save_split
from kubetune.storage.store import S3Settings, Store, join

STEP = "tokenize"
SPLITS = ("train", "eval", "test")
FORMAT = 2  # bump when the shard layout changes: old cache entries stop matching


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 128
    batch_size: int = 1000  # texts per tokenizer call
    shard_rows: int = 50_000

    def check(self) -> None:
        if not 8 <= self.max_length <= 8192:
            raise ConfigError(f"max_length={self.max_length}: use a value between 8 and 8192 tokens")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises OSError/ValueError/... for a broken folder
        raise InputError(f"model {model_dir}: cannot load its tokenizer ({e})") from None
    if not tokenizer.is_fast:
        raise InputError(f"model {model_dir}: has no fast (Rust) tokenizer; kubetune needs tokenizer.json")
    return tokenizer


def cache_key(meta: dict, tokenizer, cfg: TokenizeConfig) -> str:
    spec = {
        "format": FORMAT,
        "task": meta.get("task", SEQUENCE),
        "data": {s: meta["splits"][s]["fingerprint"] for s in SPLITS},
        "labels": meta["labels"],
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "truncation_side": tokenizer.truncation_side,
        "max_length": cfg.max_length,
        "shard_rows": cfg.shard_rows,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_texts(tokenizer, texts: list[str], cfg: TokenizeConfig, progress: Progress) -> tuple[list[list[int]], int, int]:
    """Token ids per text, truncated to max_length; also (rows truncated, tokens cut off)."""
    rows: list[list[int]] = []
    truncated = lost = 0
    for start in range(0, len(texts), cfg.batch_size):
        batch = texts[start:start + cfg.batch_size]
        # tokenize untruncated first, to count what truncation drops; redo only the long rows
        full = tokenizer(batch, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        long = [i for i, ids in enumerate(full) if len(ids) > cfg.max_length]
        if long:
            cut = tokenizer([batch[i] for i in long], add_special_tokens=True, truncation=True, max_length=cfg.max_length)["input_ids"]
            for i, ids in zip(long, cut):
                lost += len(full[i]) - len(ids)
                full[i] = ids
            truncated += len(long)
        rows += full
        progress.update(len(batch))
    return rows, truncated, lost


def align_labels(word_ids: list[int | None], tag_ids: list[int]) -> list[int]:
    """Per sub-token label: the word's tag on its first sub-token, IGNORE on the word's other
    sub-tokens and on special tokens (they are neither trained on nor scored)."""
    out, prev = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == prev else tag_ids[w])
        prev = w
    return out


def tokenize_words(tokenizer, sentences: list[list[str]], tags: list[list[int]], cfg: TokenizeConfig,
                   progress: Progress) -> tuple[list[list[int]], list[list[int]], dict]:
    """Token ids and aligned token labels per pre-split sentence, truncated to max_length; also the
    counts of what truncation cost (sentences, sub-tokens, words) and of words the tokenizer turned
    into nothing (replaced by its unknown token, so every word keeps a position and a label)."""
    rows, labels = [], []
    stats = {"truncated_rows": 0, "truncated_tokens": 0, "truncated_words": 0, "empty_words": 0}
    for start in range(0, len(sentences), cfg.batch_size):
        words = [list(s) for s in sentences[start:start + cfg.batch_size]]
        full = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=False, verbose=False)
        for j in range(len(words)):
            seen = {w for w in full.word_ids(j) if w is not None}
            if len(seen) < len(words[j]):  # e.g. a lone control or zero-width character
                stats["empty_words"] += len(words[j]) - len(seen)
                words[j] = [w if i in seen else tokenizer.unk_token for i, w in enumerate(words[j])]
                full["input_ids"][j] = tokenizer(words[j], is_split_into_words=True, add_special_tokens=True)["input_ids"]
        # the untruncated pass counts what truncation drops; the truncated one is what is kept
        cut = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=True, max_length=cfg.max_length)
        for j in range(len(words)):
            ids, word_ids = cut["input_ids"][j], cut.word_ids(j)
            if len(full["input_ids"][j]) > len(ids):
                stats["truncated_rows"] += 1
                stats["truncated_tokens"] += len(full["input_ids"][j]) - len(ids)
                stats["truncated_words"] += len(words[j]) - len({w for w in word_ids if w is not None})
            rows.append(ids)
            labels.append(align_labels(word_ids, tags[start + j]))
        progress.update(len(words))
    return rows, labels, stats


def tokenize(dataset_dir: Path, model_dir: Path, out_dir: Path, cfg: TokenizeConfig, store: Store | None) -> dict:
    """Write the tokens folder for a validated dataset (from the cache when possible)."""
    import pandas as pd

    cfg.check()
    meta = json.loads((dataset_dir / "meta.json").read_text())
    tokenizer = load_tokenizer(model_dir)
    key = cache_key(meta, tokenizer, cfg)
    cache_prefix = join("cache", STEP, key)
    if store is not None and store.is_published(cache_prefix):
        store.download_dir(cache_prefix, out_dir)
        out = json.loads((out_dir / "meta.json").read_text())
        log(STEP, f"cache hit: {store.url(cache_prefix)} (same data, tokenizer and max_length)")
        return {**out, "cache": "hit"}

    label_ids = {label: i for i, label in enumerate(meta["labels"])}
    frames = {s: pd.read_parquet(dataset_dir / f"{s}.parquet") for s in SPLITS}
    total = sum(len(f) for f in frames.values())
    progress = Progress(STEP, total, "texts", every_s=2.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "cache_key": key, "labels": meta["labels"], "max_length": cfg.max_length,
            "pad_token_id": tokenizer.pad_token_id, "model_input_names": list(tokenizer.model_input_names),
            "data_fingerprints": {s: meta["splits"][s]["fingerprint"] for s in SPLITS}, "splits": {}}
    task = meta.get("task", SEQUENCE)
    info["task"] = task
    for split, frame in frames.items():
        token_labels = None
        if task == TOKEN:
            tag_ids = [[label_ids[t] for t in tags] for tags in frame["tags"]]
            rows, token_labels, stats = tokenize_words(tokenizer, frame["tokens"].tolist(), tag_ids, cfg, progress)
            labels = np.full(len(rows), IGNORE, dtype=np.int64)
        else:
            rows, truncated, lost = tokenize_texts(tokenizer, frame["text"].tolist(), cfg, progress)
            labels = frame["label"].map(label_ids).to_numpy(dtype=np.int64)
            stats = {"truncated_rows": truncated, "truncated_tokens": lost}
        lengths = np.array([len(r) for r in rows])
        info["splits"][split] = {
            "rows": len(rows),
            "shards": save_split(out_dir, split, rows, labels, cfg.shard_rows, token_labels),
            "tokens": int(lengths.sum()),
            "length": {"mean": round(float(lengths.mean()), 2), "p50": int(np.percentile(lengths, 50)),
                       "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())},
            **stats,
        }
        if stats["truncated_rows"]:
            words = f", {stats['truncated_words']} words lost" if task == TOKEN else ""
            log(STEP, f"{split}: {stats['truncated_rows']} of {len(rows)} {'sentences' if task == TOKEN else 'texts'} truncated to "
                      f"{cfg.max_length} tokens ({stats['truncated_tokens']} tokens dropped{words})")
        if stats.get("empty_words"):
            log(STEP, f"{split}: {stats['empty_words']} words have no sub-token in this tokenizer; they were given its unknown token")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2))
    if store is not None and store.publish_dir(out_dir, cache_prefix):
        log(STEP, f"cached as {store.url(cache_prefix)}")
    return {**info, "cache": "miss"}


def run_step(*, store_uri: str, run_id: str, dataset_dir: Path, model_uri: str, out_dir: Path, cfg: TokenizeConfig) -> dict:
    record = open_run(store_uri, run_id)
    with record.step(STEP, config={"model": model_uri, **asdict(cfg)}) as rec:
        model_dir = resolve_model_dir(model_uri, S3Settings.from_env(), scratch(STEP))
        info = tokenize(dataset_dir, model_dir, out_dir, cfg, record.store)
        rec["outputs"] = {"cache": info["cache"], "cache_key": info["cache_key"],
                          "splits": {s: {k: v for k, v in d.items() if k != "shards"} for s, d in info["splits"].items()}}
    return info


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.tokenize", __doc__)
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path)
    add_config_args(p, TokenizeConfig)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, dataset_dir=a.dataset, model_uri=a.model,
                                     out_dir=a.out, cfg=config_from_args(TokenizeConfig, a)))


if __name__ == "__main__":
    sys.exit(main())
