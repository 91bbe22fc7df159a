"""Step logging and a line-based progress bar.

Every line starts with "[kubetune <step>]" so the CLI can show these lines and keep the rest of the
kfp.local chatter in the log file. The bar prints whole lines (no carriage returns): pod logs, CI
logs and kfp.local's line-by-line relay all show it as it advances.
"""

from __future__ import annotations

import sys
import time

MARK = "[kubetune"


def log(step: str, message: str) -> None:
    print(f"{MARK} {step}] {message}", file=sys.stdout, flush=True)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`Progress(step, total, unit)`, then `update(n, loss=...)`; prints at most every `every_s`
    seconds and always at the end."""

    def __init__(self, step: str, total: int, unit: str, label: str = "", every_s: float = 5.0, width: int = 24):
        self.step, self.total, self.unit, self.label = step, max(int(total), 1), unit, label
        self.every_s, self.width = every_s, width
        self.done = 0
        self.start = self.last = time.perf_counter()

    def due(self, n: int = 1) -> bool:
        """Whether update(n) will print: lets callers skip costly postfix values (a GPU sync)."""
        return time.perf_counter() - self.last >= self.every_s or self.done + n >= self.total

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self._print(now, postfix)

    def _print(self, now: float, postfix: dict) -> None:
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.width)
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        extra = "".join(f"  {k} {v:.4g}" for k, v in postfix.items())
        head = f"{self.label} " if self.label else ""
        log(
            self.step,
            f"{head}[{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} {self.done}/{self.total} {self.unit}"
            f"  {rate:.1f} {self.unit}/s{extra}  elapsed {fmt_seconds(elapsed)}  eta {fmt_seconds(eta)}",
        )
