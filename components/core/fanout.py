"""Fan-out pieces: what one parallel task of a step works on when the data is large.

The pipeline runs such a step as a plan (a list of pieces), a `dsl.ParallelFor` of piece tasks that
publish their results under <store>/runs/<run>/pieces/<step>/<piece>/, and the step itself, which
merges them in order. A piece is a run of `count` units (token shards for tokenize, input files for
validate) of one split from unit `first`, written `train-00004-00002`: the text names store keys, so
it is parsed strictly. Small data is one piece, WHOLE, which the step does itself (kfp.local cannot
run an empty ParallelFor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetune.errors import ConfigError

WHOLE = "whole"  # the one piece of data a single task handles (no fan-out)
MAX_PIECES = 500  # large KFP fan-ins are slow to schedule and to collect: keep the fan-out in the low hundreds
_FORM = re.compile(r"(train|eval|test)-(\d{5})-(\d{5})")


@dataclass(frozen=True)
class Piece:
    split: str
    first: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Piece":
        m = _FORM.fullmatch(text)
        if not m or int(m[3]) < 1:
            raise ConfigError(f"piece {text!r}: expected <split>-<first>-<count> as the plan writes it, e.g. train-00000-00020")
        return cls(m[1], int(m[2]), int(m[3]))

    def __str__(self) -> str:
        return f"{self.split}-{self.first:05d}-{self.count:05d}"


def parse_pieces(pieces) -> tuple[Piece, ...]:
    """The pieces a step merges (WHOLE, the small-data piece, is none)."""
    return tuple(Piece.parse(p) for p in pieces if p != WHOLE)


def pieces_prefix(ctx, step: str) -> str:
    """Where `step`'s pieces go: under the run's records (a StepContext with a store and a run id)."""
    if ctx.record is None:
        raise ConfigError(f"{step}'s fan-out keeps its pieces in the run's records: give a store and a run id")
    return ctx.record.key("pieces", step)


def is_piece(text: str) -> bool:
    return bool(_FORM.fullmatch(text))


def in_order(pieces, split: str) -> list[Piece]:
    """The pieces of `split`, by their first unit."""
    return sorted((p for p in pieces if p.split == split), key=lambda p: p.first)


def check_count(pieces: list, what: str, fix: str) -> list:
    if len(pieces) > MAX_PIECES:
        raise ConfigError(f"{what} make {len(pieces)} parallel tasks (at most {MAX_PIECES}); {fix}")
    return pieces
