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

Fan-out (large data): the pipeline tokenizes a dataset of more than `fanout_rows` rows as parallel
tasks (dsl.ParallelFor), each a piece: a run of one split's token shards (`plan_pieces`, called when
validate ends). A piece task (`piece_step`) writes its shards and its tally (rows, truncation counts,
length histogram, coverage) to <store>/runs/<run>/pieces/tokenize/<cache key>/<piece>/; this step
then merges them in order (`run_step(pieces=...)`): the shards and meta.json are those of one task.
A smaller dataset is one piece, `whole`, which this step tokenizes itself.

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
from kubetune.core.fanout import MAX_PIECES, WHOLE, Piece, check_count, in_order, parse_pieces, pieces_prefix
from kubetune.core.progress import Progress, log
from kubetune.core.system import return_freed_memory
from kubetune.errors import ConfigError, InputError
from kubetune.monitoring.features import Coverage
from kubetune.storage import formats
from kubetune.storage.contracts import META, TOKENS_FORMAT, DatasetMeta, ModelInputs, TokensMeta
from kubetune.storage.shards import save_split
from kubetune.storage.store import Store, StoreError, join
from kubetune.tasks.encoding import TRUNCATIONS, per_input
from kubetune.training.modeling import resolve_model_dir

STEP = "tokenize"
SPLITS = ("train", "eval", "test")
PIECE_STATE = "piece.json"


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
    fanout_rows: int = param(1_000_000, "Large data: a dataset of more rows than this is tokenized by parallel tasks "
                                        "(dsl.ParallelFor) of about this many rows each, whole token shards; 0: always one task.")

    def check(self) -> None:
        if self.fanout_rows < 0 or self.shard_rows < 1:
            raise ConfigError(f"fanout_rows={self.fanout_rows}, shard_rows={self.shard_rows}: use fanout_rows >= 0 (0: one task) "
                              "and shard_rows >= 1")
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


def plan_pieces(meta: dict, cfg: TokenizeConfig) -> list[str]:
    """The pieces tokenize fans out over for a validated dataset (`meta`: validate's): [WHOLE] when it
    has at most `fanout_rows` rows in all (or fanout_rows is 0); else each split's token shards in runs
    of about fanout_rows rows."""
    rows = {s: meta["splits"][s]["rows"] for s in SPLITS}
    if not cfg.fanout_rows or sum(rows.values()) <= cfg.fanout_rows:
        return [WHOLE]
    per = -(-cfg.fanout_rows // cfg.shard_rows)  # whole shards, so the shards are those of one task
    pieces = []
    for split in SPLITS:
        shards = max(-(-rows[split] // cfg.shard_rows), 1)
        pieces += [str(Piece(split, first, min(per, shards - first))) for first in range(0, shards, per)]
    total = sum(rows.values())
    return check_count(pieces, f"fanout_rows={cfg.fanout_rows}: {total} rows", f"raise fanout_rows to {-(-total // MAX_PIECES)} or more")


def _sum_counts(a: dict, b: dict) -> dict:
    """Counts summed key by key, in the order the keys first appear (meta.json's order stays the same run to run)."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*a, *b])}


class _Tally:
    """A split's tokens meta, summed as its shards are tokenized, or merged from pieces tokenized
    elsewhere (in order): either way the result equals one pass over the split."""

    def __init__(self, tokenizer, max_length: int):
        self.rows, self.stats, self.shards = 0, {}, []
        self.histogram = np.zeros(max_length + 1, dtype=np.int64)  # index = a sequence's length
        self.coverage = Coverage(tokenizer)

    def add(self, t, texts: list, shards: list[str]) -> None:
        self.shards += shards
        self.rows += len(t.labels)
        self.stats = _sum_counts(self.stats, t.stats)
        lengths = np.fromiter((len(r) for r in t.rows if r), dtype=np.int64)  # per sequence (a multiple-choice row has several)
        self._count(np.bincount(lengths))
        self.coverage.add(texts, per_input(t.rows, t.choices))

    def _count(self, counts: np.ndarray) -> None:
        n = max(len(counts), len(self.histogram))
        self.histogram = np.pad(self.histogram, (0, n - len(self.histogram))) + np.pad(counts, (0, n - len(counts)))

    def state(self) -> dict:
        return {"rows": self.rows, "stats": self.stats, "shards": self.shards, "histogram": self.histogram.tolist(),
                "coverage": self.coverage.state()}

    def merge(self, state: dict) -> None:
        self.shards += state["shards"]
        self.rows += state["rows"]
        self.stats = _sum_counts(self.stats, state["stats"])
        self._count(np.asarray(state["histogram"], dtype=np.int64))
        self.coverage.merge(state["coverage"])

    def result(self, out_dir: Path, split: str, cfg: TokenizeConfig) -> dict:
        if not self.shards:  # no rows: one empty shard, as for a split tokenized at once
            self.shards = save_split(out_dir, split, [], np.zeros(0, dtype=np.int64), cfg.shard_rows)
        h = self.histogram
        return {"rows": self.rows, "shards": self.shards, "tokens": int(h @ np.arange(len(h))), "length": length_stats(h),
                **self.stats, "coverage": self.coverage.result()}


@dataclass
class _Setup:
    meta: DatasetMeta
    tokenizer: object
    key: str
    task: object
    label_ids: dict

    @property
    def cache_prefix(self) -> str:
        return join("cache", STEP, self.key)


def _setup(dataset_dir: Path, model_dir: Path, cfg: TokenizeConfig) -> _Setup:
    cfg.check()
    meta = DatasetMeta.read(dataset_dir)
    tokenizer = load_tokenizer(model_dir)
    task = tasks.get(meta.task)
    if cfg.truncation not in task.truncations:
        raise ConfigError(f"truncation={cfg.truncation!r}: a {task.name} model supports {', '.join(task.truncations)}")
    return _Setup(meta, tokenizer, cache_key(meta, tokenizer, cfg), task, {label: i for i, label in enumerate(meta.labels)})


def tokenize(dataset_dir: Path, model_dir: Path, out_dir: Path, cfg: TokenizeConfig, store: Store | None,
             pieces: tuple["Piece", ...] = (), pieces_prefix: str = "") -> dict:
    """Write the tokens folder for a validated dataset (from the cache when possible); with `pieces`,
    merged from the pieces the fan-out tasks published under `pieces_prefix` instead of tokenized here."""
    setup = _setup(dataset_dir, model_dir, cfg)
    meta, tokenizer, task = setup.meta, setup.tokenizer, setup.task
    if store is not None and store.is_published(setup.cache_prefix):
        cached = TokensMeta.from_json(store.read_json(join(setup.cache_prefix, META)))
        check_coverage(cached.splits, cfg, model_dir)  # before anything is written
        store.download_dir(setup.cache_prefix, out_dir)
        log(STEP, f"cache hit: {store.url(setup.cache_prefix)} (same data, tokenizer and max_length)")
        return {**cached.to_json(), "cache": "hit"}

    progress = Progress(STEP, sum(meta.splits[s]["rows"] for s in SPLITS), task.row_unit, every_s=2.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    # text pairs: segment ids are derived from where [SEP] sits (kubetune.storage.shards.token_types)
    inputs = ModelInputs(max_length=cfg.max_length, truncation=cfg.truncation, input_names=tuple(tokenizer.model_input_names),
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id if task.segments == 2 else None)
    info = TokensMeta(setup.key, task.name, meta.labels, inputs, meta.fingerprints(), splits={})
    before = set(out_dir.glob("*.npz"))
    try:
        for split in SPLITS:
            if pieces:
                tally = _merge_pieces(store, join(pieces_prefix, setup.key), split, pieces, meta.splits[split]["rows"], out_dir,
                                      _Tally(tokenizer, cfg.max_length))
            else:
                tally = tokenize_split(setup, dataset_dir / f"{split}.parquet", split, cfg, progress, out_dir)
            info.splits[split] = tally.result(out_dir, split, cfg)
            for note in task.tokenize_notes(split, info.splits[split], info.splits[split]["rows"], cfg.max_length):
                log(STEP, f"{note}, keeping the {cfg.truncation}")
        check_coverage(info.splits, cfg, model_dir)
    except BaseException:  # nothing half-written: the shards this call wrote go, whatever stopped it (re-raised)
        for path in set(out_dir.glob("*.npz")) - before:
            path.unlink(missing_ok=True)
        raise
    tokenizer.save_pretrained(out_dir / "tokenizer")
    info.write(out_dir)
    if store is not None and store.publish_dir(out_dir, setup.cache_prefix):
        log(STEP, f"cached as {store.url(setup.cache_prefix)}")
    return {**info.to_json(), "cache": "miss"}


def tokenize_split(setup: _Setup, path: Path, split: str, cfg: TokenizeConfig, progress, out_dir: Path,
                   piece: Piece | None = None) -> _Tally:
    """The tally of one split (or of one piece of it), written shard by shard: each record batch of
    `shard_rows` rows of the validated Parquet file is tokenized and saved before the next is read."""
    import pyarrow.parquet as pq

    start, stop = _rows(piece, cfg) if piece else (0, None)
    first = piece.first if piece else 0
    tally = _Tally(setup.tokenizer, cfg.max_length)
    for batch in formats.parquet_batches(pq.ParquetFile(path), cfg.shard_rows, start=start, stop=stop):
        frame = batch.to_pandas()
        t = setup.task.tokenize(setup.tokenizer, frame, setup.label_ids, cfg, progress)
        shards = save_split(out_dir, split, t.rows, t.labels, cfg.shard_rows, t.token_labels, t.choices, first=first + len(tally.shards))
        tally.add(t, setup.task.profile_texts(frame), shards)
    return tally


def _rows(piece: Piece, cfg: TokenizeConfig) -> tuple[int, int]:
    """The split's rows [start, stop) in a piece of whole token shards."""
    return piece.first * cfg.shard_rows, (piece.first + piece.count) * cfg.shard_rows


def tokenize_piece(dataset_dir: Path, model_dir: Path, piece: Piece, cfg: TokenizeConfig, store: Store, prefix: str,
                   workdir: Path) -> str:
    """Tokenize one piece and publish its shards and tally under `prefix`/<cache key>/<piece>/ (the
    tokenize step merges them). Nothing to do when the cache already holds the whole result."""
    setup = _setup(dataset_dir, model_dir, cfg)
    if store.is_published(setup.cache_prefix):
        log(STEP, f"{piece}: cache hit ({store.url(setup.cache_prefix)}), nothing to tokenize")
        return "hit"
    start, stop = _rows(piece, cfg)
    rows = max(min(stop, setup.meta.splits[piece.split]["rows"]) - start, 0)
    tally = tokenize_split(setup, dataset_dir / f"{piece.split}.parquet", piece.split, cfg,
                           Progress(STEP, rows, setup.task.row_unit, label=str(piece), every_s=2.0), workdir, piece)
    (workdir / PIECE_STATE).write_text(json.dumps(tally.state()))
    store.publish_dir(workdir, join(prefix, setup.key, str(piece)))  # False: an earlier try published the same piece
    log(STEP, f"{piece}: {tally.rows} {setup.task.row_unit} in {len(tally.shards)} shard(s), published")
    return "miss"


def _merge_pieces(store: Store, prefix: str, split: str, pieces: tuple[Piece, ...], rows: int, out_dir: Path, tally: _Tally) -> _Tally:
    """The split's tally from its pieces, read in shard order; their shards move into `out_dir`."""
    import tempfile

    for piece in in_order(pieces, split):
        if piece.first != len(tally.shards):
            break  # a gap: reported below
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".piece-") as tmp:
            local = store.download_dir(join(prefix, str(piece)), Path(tmp))
            state = json.loads((local / PIECE_STATE).read_text())
            for name in state["shards"]:
                (local / name).replace(out_dir / name)
        tally.merge(state)
    if tally.rows != rows:
        raise StoreError(f"the tokenize pieces of {split} under {store.url(prefix)} hold {tally.rows} of its {rows} rows "
                         f"({len(tally.shards)} shard(s) merged; pieces given: {', '.join(str(p) for p in pieces if p.split == split)}); "
                         "rerun the pipeline so that every piece is tokenized")
    return tally


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


def run_step(*, store_uri: str, run_id: str, dataset_dir: Path, model_uri: str, out_dir: Path, cfg: TokenizeConfig,
             pieces: list[str] | tuple[str, ...] = ()) -> dict:
    """The step as the pipeline runs it. `pieces`: those the fan-out tasks tokenized (`piece_step`),
    merged here; empty or [WHOLE]: tokenized here."""
    return_freed_memory()  # RSS follows what the step holds (it streams the data)
    merged = parse_pieces(pieces)
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config={"model": model_uri, **asdict(cfg)}) as ctx:
        prefix = pieces_prefix(ctx, STEP) if merged else ""
        model_dir = resolve_model_dir(model_uri, ctx.settings, ctx.scratch)
        info = tokenize(dataset_dir, model_dir, out_dir, cfg, ctx.store, merged, prefix)
        if merged:  # the pieces are in the tokens folder (and the cache) now; on failure they stay for a retry of this step
            ctx.store.delete_prefix(prefix)
        ctx.outputs.update(cache=info["cache"], cache_key=info["cache_key"], truncation=info["truncation"], pieces=len(merged) or 1,
                           splits={s: {k: v for k, v in d.items() if k != "shards"} for s, d in info["splits"].items()})
    return info


def piece_step(*, store_uri: str, run_id: str, dataset_dir: Path, model_uri: str, piece: str, cfg: TokenizeConfig) -> str:
    """One fan-out task: tokenize `piece` and publish it for run_step to merge. [WHOLE]: nothing to
    do here (the dataset is small: the tokenize step tokenizes it itself). Returns the piece."""
    if piece == WHOLE:
        return piece
    parsed = Piece.parse(piece)
    with step_context(f"{STEP}-{parsed}", store_uri=store_uri, run_id=run_id, config={"model": model_uri, **asdict(cfg)}) as ctx:
        prefix = pieces_prefix(ctx, STEP)
        model_dir = resolve_model_dir(model_uri, ctx.settings, ctx.scratch)
        ctx.outputs["cache"] = tokenize_piece(dataset_dir, model_dir, parsed, cfg, ctx.store, prefix, ctx.tmp("piece"))
    return piece


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.tokenize", __doc__)
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--model", default="", help="required except with --plan")
    p.add_argument("--out", type=Path, help="tokens folder to write (required except with --plan and --piece)")
    fan = p.add_mutually_exclusive_group()  # the fan-out outside KFP (e.g. Argo, a shell): plan, a task per piece, then merge
    fan.add_argument("--plan", action="store_true", help="print the pieces for the dataset and --fanout-rows as a JSON list (the last line)")
    fan.add_argument("--piece", default="", help="tokenize this piece of the plan and publish it under the run")
    fan.add_argument("--pieces", default="", help="comma-separated: merge these published pieces into --out")
    add_config_args(p, TokenizeConfig)
    a = p.parse_args(argv)
    cfg = config_from_args(TokenizeConfig, a)
    if not a.plan and not a.model:
        p.error("--model is required (except with --plan)")
    if not (a.plan or a.piece or a.out):
        p.error("--out is required (except with --plan and --piece)")
    if a.plan:
        return run_main(lambda: print(json.dumps(plan_pieces({"splits": DatasetMeta.read(a.dataset).splits}, cfg))))
    if a.piece:
        return run_main(lambda: piece_step(store_uri=a.store, run_id=a.run_id, dataset_dir=a.dataset, model_uri=a.model, piece=a.piece,
                                           cfg=cfg))
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, dataset_dir=a.dataset, model_uri=a.model,
                                     out_dir=a.out, cfg=cfg, pieces=[x for x in a.pieces.split(",") if x]))


if __name__ == "__main__":
    sys.exit(main())
