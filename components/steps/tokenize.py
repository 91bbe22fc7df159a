"""Step 2 - tokenize: the model's fast tokenizer over every split, truncated, unpadded, cached.

    python -m kubetune.steps.tokenize --dataset /tmp/kt/dataset --model builtin:all-minilm-l6-v2 \
        --out /tmp/kt/tokens --store ./kubetune-store --run-id dev

Output folder: `<split>-NNNNN.npz` token shards (see kubetune.storage.shards), `tokenizer/` (the files
that travel with the model) and meta.json (label set, max_length, length statistics, how many rows
were truncated and how many tokens that cost, and the vocabulary coverage: the unknown-token share).

Coverage: when more than `max_unknown_share` of a split's tokens are the tokenizer's unknown token
(e.g. Chinese text and an English-vocabulary model), the step warns with the share, examples and
the fix; `fail_on_unknown` makes that an input error (exit 2).

Memory: each split is read, tokenized and written `shard_rows` rows at a time (one Parquet record
batch, one shard), so the step's memory holds one shard's rows whatever the split's size; the
statistics are gathered as it goes (length percentiles from a histogram: exact).

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

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args, opt, param
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import Progress, log
from kubetune.core.system import return_freed_memory
from kubetune.errors import ConfigError, InputError
from kubetune.monitoring.features import Coverage
from kubetune.storage import formats
from kubetune.storage.contracts import META, TOKENS_FORMAT, DatasetMeta, ModelInputs, TokensMeta
from kubetune.storage.shards import save_split
from kubetune.storage.store import Store, join
from kubetune.tasks.encoding import TRUNCATIONS, per_input
from kubetune.training.modeling import resolve_model_dir

STEP = "tokenize"
SPLITS = ("train", "eval", "test")


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = param(128, "Truncate texts to this many tokens.")
    truncation: str = param("head", "Which tokens of a longer text are kept: head, tail, or head+tail (the first quarter of "
                                    "max_length from the start, the rest from the end). Stored with the model; batch inference "
                                    "and serving cut the same way.", choices=TRUNCATIONS)
    max_unknown_share: float = param(0.05, "Warn when more than this share of a split's tokens are the tokenizer's unknown token "
                                     "(its vocabulary does not cover the text's script).")
    fail_on_unknown: bool = param(False, "Fail (exit 2) instead of warning when a split exceeds max_unknown_share.")
    batch_size: int = opt(1000, "Texts (NER: sentences; pairs: text pairs) per tokenizer call.")
    shard_rows: int = opt(50_000, "Rows per token shard file (<split>-NNNNN.npz); part of the tokenization cache key.")

    def check(self) -> None:
        if not 8 <= self.max_length <= 8192:
            raise ConfigError(f"max_length={self.max_length}: use a value between 8 and 8192 tokens")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation={self.truncation!r}: use one of {', '.join(TRUNCATIONS)}")
        if not 0 <= self.max_unknown_share <= 1:
            raise ConfigError(f"max_unknown_share={self.max_unknown_share}: use a share between 0 and 1 (0.05 = 5% of tokens)")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises OSError/ValueError/... for a broken folder
        raise InputError(f"model {model_dir}: cannot load its tokenizer ({e})") from None
    if not tokenizer.is_fast:
        raise InputError(f"model {model_dir}: has no fast (Rust) tokenizer; kubetune needs tokenizer.json")
    return tokenizer


def cache_key(meta: DatasetMeta, tokenizer, cfg: TokenizeConfig) -> str:
    spec = {
        "format": TOKENS_FORMAT,
        "task": meta.task,
        "data": {s: meta.splits[s]["fingerprint"] for s in SPLITS},
        "labels": meta.labels,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "truncation_side": tokenizer.truncation_side,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "shard_rows": cfg.shard_rows,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def tokenize(dataset_dir: Path, model_dir: Path, out_dir: Path, cfg: TokenizeConfig, store: Store | None) -> dict:
    """Write the tokens folder for a validated dataset (from the cache when possible)."""
    cfg.check()
    meta = DatasetMeta.read(dataset_dir)
    tokenizer = load_tokenizer(model_dir)
    key = cache_key(meta, tokenizer, cfg)
    cache_prefix = join("cache", STEP, key)
    if store is not None and store.is_published(cache_prefix):
        cached = TokensMeta.from_json(store.read_json(join(cache_prefix, META)))
        check_coverage(cached.splits, cfg, model_dir)  # before anything is written
        store.download_dir(cache_prefix, out_dir)
        log(STEP, f"cache hit: {store.url(cache_prefix)} (same data, tokenizer and max_length)")
        return {**cached.to_json(), "cache": "hit"}

    task = tasks.get(meta.task)
    if cfg.truncation not in task.truncations:
        raise ConfigError(f"truncation={cfg.truncation!r}: a {task.name} model supports {', '.join(task.truncations)}")
    label_ids = {label: i for i, label in enumerate(meta.labels)}
    progress = Progress(STEP, sum(meta.splits[s]["rows"] for s in SPLITS), task.row_unit, every_s=2.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    # text pairs: segment ids are derived from where [SEP] sits (kubetune.storage.shards.token_types)
    inputs = ModelInputs(max_length=cfg.max_length, truncation=cfg.truncation, input_names=tuple(tokenizer.model_input_names),
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id if task.segments == 2 else None)
    info = TokensMeta(key, task.name, meta.labels, inputs, meta.fingerprints(), splits={})
    before = set(out_dir.glob("*.npz"))
    try:
        for split in SPLITS:
            info.splits[split] = tokenize_split(task, tokenizer, dataset_dir / f"{split}.parquet", split, label_ids, cfg, progress,
                                                out_dir)
            for note in task.tokenize_notes(split, info.splits[split], info.splits[split]["rows"], cfg.max_length):
                log(STEP, f"{note}, keeping the {cfg.truncation}")
        check_coverage(info.splits, cfg, model_dir)
    except BaseException:  # nothing half-written: the shards this call wrote go, whatever stopped it (re-raised)
        for path in set(out_dir.glob("*.npz")) - before:
            path.unlink(missing_ok=True)
        raise
    tokenizer.save_pretrained(out_dir / "tokenizer")
    info.write(out_dir)
    if store is not None and store.publish_dir(out_dir, cache_prefix):
        log(STEP, f"cached as {store.url(cache_prefix)}")
    return {**info.to_json(), "cache": "miss"}


def tokenize_split(task, tokenizer, path: Path, split: str, label_ids: dict, cfg: TokenizeConfig, progress, out_dir: Path) -> dict:
    """The tokens meta of one split, written shard by shard: each record batch of `shard_rows` rows
    of the validated Parquet file is tokenized and saved before the next is read."""
    import pyarrow.parquet as pq

    shards: list[str] = []
    rows, stats, histogram, coverage = 0, {}, np.zeros(cfg.max_length + 1, dtype=np.int64), Coverage(tokenizer)
    for batch in formats.parquet_batches(pq.ParquetFile(path), cfg.shard_rows):
        frame = batch.to_pandas()
        t = task.tokenize(tokenizer, frame, label_ids, cfg, progress)
        shards += save_split(out_dir, split, t.rows, t.labels, cfg.shard_rows, t.token_labels, t.choices, first=len(shards))
        rows += len(t.labels)
        stats = {k: stats.get(k, 0) + v for k, v in t.stats.items()}
        lengths = np.fromiter((len(r) for r in t.rows if r), dtype=np.int64)  # per sequence (a multiple-choice row has several)
        counts = np.bincount(lengths, minlength=len(histogram))
        histogram = np.pad(histogram, (0, len(counts) - len(histogram))) + counts
        coverage.add(task.profile_texts(frame), per_input(t.rows, t.choices))
    if not shards:  # no rows: one empty shard, as for a split tokenized at once
        shards = save_split(out_dir, split, [], np.zeros(0, dtype=np.int64), cfg.shard_rows)
    return {"rows": rows, "shards": shards, "tokens": int(histogram @ np.arange(len(histogram))), "length": length_stats(histogram),
            **stats, "coverage": coverage.result()}


def length_stats(histogram: np.ndarray) -> dict:
    """Mean, p50, p95 and max of the lengths counted in `histogram` (index = length), the
    percentiles interpolated as numpy's default does on the sorted lengths."""
    n = int(histogram.sum())
    if not n:
        return {"mean": float("nan"), "p50": 0, "p95": 0, "max": 0}
    ends = np.cumsum(histogram)  # the sorted lengths: value v fills positions ends[v-1] .. ends[v]-1

    def at(k: int) -> int:
        return int(np.searchsorted(ends, k, side="right"))

    def percentile(q: float) -> int:
        pos = (n - 1) * (q / 100)
        low = int(np.floor(pos))
        a, b, t = at(low), at(min(low + 1, n - 1)), pos - low
        return int(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)  # numpy's linear interpolation, same rounding

    return {"mean": round(float(histogram @ np.arange(len(histogram)) / n), 2), "p50": percentile(50), "p95": percentile(95),
            "max": int(np.nonzero(histogram)[0][-1])}


def check_coverage(splits: dict, cfg: TokenizeConfig, model_dir: Path) -> None:
    """Warn (or, with fail_on_unknown, fail) when a split's unknown-token share exceeds the
    threshold (`splits`: the tokens meta's): the model would be trained on [UNK]s and nothing else would say why it is poor."""
    problems = []
    for split, d in splits.items():
        c = d.get("coverage")  # absent in cache entries written before the check existed
        if c is None or c["unknown_share"] <= cfg.max_unknown_share:
            continue
        examples = "; ".join(f"{e['text']!r} ({100 * e['unknown_share']:.0f}% unknown)" for e in c["examples"])
        problems.append(f"{split}: {100 * c['unknown_share']:.1f}% of {c['content_tokens']} tokens are the tokenizer's unknown token "
                        f"(threshold {100 * cfg.max_unknown_share:g}%); the text is {100 * c['main_script_share']:.0f}% "
                        f"{c['main_script']} script; e.g. {examples}")
    if not problems:
        return
    fix = (f"the tokenizer of the model ({model_dir}) does not cover this text's script, so the model cannot read it: use --model "
           "with a model whose vocabulary covers it (e.g. a multilingual or a language-specific model), or raise "
           "--max-unknown-share if the unknown tokens are expected")
    if cfg.fail_on_unknown:
        raise InputError("vocabulary coverage: " + " | ".join(problems) + f". Fix: {fix}")
    for problem in problems:
        log(STEP, f"WARNING vocabulary coverage: {problem}")
    log(STEP, f"WARNING fix: {fix} (--fail-on-unknown makes this an error)")


def run_step(*, store_uri: str, run_id: str, dataset_dir: Path, model_uri: str, out_dir: Path, cfg: TokenizeConfig) -> dict:
    return_freed_memory()  # RSS follows what the step holds (it streams the data)
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config={"model": model_uri, **asdict(cfg)}) as ctx:
        model_dir = resolve_model_dir(model_uri, ctx.settings, ctx.scratch)
        info = tokenize(dataset_dir, model_dir, out_dir, cfg, ctx.store)
        ctx.outputs.update(cache=info["cache"], cache_key=info["cache_key"], truncation=info["truncation"],
                           splits={s: {k: v for k, v in d.items() if k != "shards"} for s, d in info["splits"].items()})
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
