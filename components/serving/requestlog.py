"""Optional sampled request logging: what `kubetune drift` reads to compare served traffic with a
version's reference profile.

    kubetune serve --model sms-spam --request-log features --request-log-rate 0.1

A privacy choice, off by default. `features` stores per text only the profile features a drift
report needs (token length, truncation, unknown/content token counts, letters per script, the
hashed token-id embedding of kubetune.monitoring.features) and the model's prediction, never the
text; `texts` also stores the text. Sampling (--request-log-rate) and a cap (a token bucket of
--request-log-max-per-minute) happen on the request path and cost a random draw; tokenizing and
writing happen on a background thread. A full queue drops texts (counted in
kubetune_serve_request_log_dropped_total{reason}), never slows a request.

Records are JSON lines in part files published atomically (a local store renames a hidden temp
file; an S3 PUT is atomic) under `monitoring/<model>/requests/<yyyymmdd>/part-<hhmmss>-<random>.jsonl`,
every --request-log-flush-s seconds or --request-log-flush-texts texts, and on shutdown.
"""

from __future__ import annotations

import json
import queue
import random
import re
import secrets
import threading
import time
from pathlib import Path

from kubetune.core.progress import log
from kubetune.errors import ConfigError, InputError
from kubetune.release import registry

MODES = ("off", "features", "texts")
FORMAT = 1
_DAY, _PART = re.compile(r"^\d{8}$"), re.compile(r"^part-\d{6}-[0-9a-f]{8}\.jsonl$")


def prefix(model: str) -> str:
    return f"monitoring/{registry.check_name(model)}/requests"


def part_key(model: str, now: float, token: str) -> str:
    """The store key of a part file; every part is checked, since it becomes a path or an S3 key."""
    day, part = time.strftime("%Y%m%d", time.gmtime(now)), f"part-{time.strftime('%H%M%S', time.gmtime(now))}-{token}.jsonl"
    if not (_DAY.match(day) and _PART.match(part)):
        raise ValueError(f"request log key parts {day!r}/{part!r} are malformed")
    return f"{prefix(model)}/{day}/{part}"


def check(mode: str, rate: float, max_per_minute: int, flush_s: float, flush_texts: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"--request-log {mode!r}: use off, features or texts")
    if not 0 < rate <= 1:
        raise ConfigError(f"--request-log-rate {rate}: a fraction of texts in (0, 1]")
    if max_per_minute < 1:
        raise ConfigError(f"--request-log-max-per-minute {max_per_minute}: must be at least 1")
    if not 0.1 <= flush_s <= 3600:
        raise ConfigError(f"--request-log-flush-s {flush_s}: use 0.1 to 3600 seconds")
    if flush_texts < 1:
        raise ConfigError(f"--request-log-flush-texts {flush_texts}: must be at least 1")


class TokenBucket:
    """At most `per_minute` takes a minute on average, bursts up to `per_minute`."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity, self.rate, self.clock = float(per_minute), per_minute / 60.0, clock
        self.tokens, self.last = float(per_minute), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RequestLog:
    """Samples answered texts and writes them (or their features) to `store` from a background thread."""

    def __init__(self, store, model: str, version: str, clf, cfg, counters, seed: int | None = None):
        self.store, self.model, self.version, self.clf, self.mode = store, registry.check_name(model), version, clf, cfg.request_log
        self.rate, self.flush_s, self.flush_texts = cfg.request_log_rate, cfg.request_log_flush_s, cfg.request_log_flush_texts
        self.bucket = TokenBucket(cfg.request_log_max_per_minute)
        self.written, self.dropped = counters  # prometheus counters: texts written; drops by reason (a labelled counter)
        self.random = random.Random(seed)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(4 * cfg.request_log_flush_texts, 1024))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubetune-request-log", daemon=True)
        self._thread.start()

    def offer(self, texts: list, scored: list) -> None:
        """On the request path: sample, rate-limit and queue; never blocks. `scored`: the predictor's
        Scored items (prediction and token ids), so the features need no second tokenizer pass."""
        now = time.time()
        for text, item in zip(texts, scored):
            with self._lock:  # requests run on one event loop, but the lock keeps the bucket right for any caller
                if self.random.random() >= self.rate:
                    continue
                if not self.bucket.take():
                    self.dropped.labels(model_name=self.model, reason="rate_limit").inc()
                    continue
            try:
                self._queue.put_nowait((now, text, item))
            except queue.Full:
                self.dropped.labels(model_name=self.model, reason="queue_full").inc()

    def _run(self) -> None:
        batch, started = [], time.monotonic()
        while True:
            stopping = self._stop.is_set()
            try:
                batch.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                pass
            while stopping and len(batch) < self.flush_texts:  # shutting down: what is queued goes into this part, not a part each
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            due = time.monotonic() - started >= self.flush_s or len(batch) >= self.flush_texts
            if batch and (due or stopping):
                self._write(batch)
                batch, started = [], time.monotonic()
            elif due:
                started = time.monotonic()
            if stopping and self._queue.empty() and not batch:
                return

    def _write(self, batch: list) -> None:
        from kubetune.monitoring.profile import text_features

        texts = [t for _, t, _ in batch]
        try:
            feats = text_features(self.clf.tokenizer, texts, [s for _, _, s in batch])
            lines = []
            for (at, text, scored), f in zip(batch, feats):
                rec = {"format": FORMAT, "time": round(at, 3), "model": self.model, "version": self.version,
                       "features": f, "prediction": scored.prediction}
                if self.mode == "texts":
                    rec["text"] = text if isinstance(text, str) else list(text)
                lines.append(json.dumps(rec, ensure_ascii=False, default=_plain))
            self.store.write_bytes(part_key(self.model, time.time(), secrets.token_hex(4)), ("\n".join(lines) + "\n").encode())
            self.written.inc(len(batch))
        except Exception as e:  # a store outage must not take serving down: count and log the loss, keep serving
            self.dropped.labels(model_name=self.model, reason="write_error").inc(len(batch))
            log("serve", f"request log: {len(batch)} texts not written: {type(e).__name__}: {e}")

    def close(self, timeout: float = 30.0) -> None:
        """Flush what is queued and stop the thread (on shutdown)."""
        self._stop.set()
        self._thread.join(timeout)


def _plain(value):
    """numpy scalars and arrays in a prediction (the JSON response encoder takes them too)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_feature_records(files: list[Path], names: list[str]) -> list[dict] | None:
    """The records of a features-mode request log (JSONL files whose records carry `features` and
    no `text`), or None when these files are not one (then they are read as texts, as any input)."""
    if not files or not all(n.endswith(".jsonl") for n in names):
        return None
    records = []
    for path, name in zip(files, names):
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{name} line {n}: not JSON ({e.msg}); a request log part is JSON lines") from None
            if not isinstance(rec, dict) or "features" not in rec or "text" in rec:
                return None
            records.append(rec)
    return records or None
