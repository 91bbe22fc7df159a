"""The one encoder: how a prediction input (a text, or a (text, text_pair) pair) becomes the token
ids a model reads. Tokenize runs it over the training data and every predictor (kubetune.tasks.predictor:
serving, batch inference, the gate's champion scoring, the reference profile) over new inputs, so a
model is always fed what it was trained on, truncation included.

    rows, truncated, lost = encode_texts(tokenizer, ["a text", ...], max_length=128, truncation="head+tail")

`ModelInputs` (kubetune.storage.contracts) is the settings it needs besides the tokenizer; `Encoded`
what it gives a predictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kubetune.storage.shards import TokenizedSplit

TRUNCATIONS = ("head", "tail", "head+tail")  # which tokens of a long text are kept (see cut_ids)


@dataclass
class Encoded:
    """Inputs encoded for a model: token ids per input (special tokens included, cut to max_length;
    multiple choice: `choices` sequences per input), which inputs were truncated, and what the task's
    `decode` needs besides the logits (`extra`)."""

    rows: list[list[int]]
    truncated: np.ndarray
    extra: list | None = None
    choices: int = 1

    @cached_property
    def split(self) -> TokenizedSplit:
        return TokenizedSplit.from_rows(self.rows, choices=self.choices)

    def input_ids(self) -> list[list[int]]:
        """The token ids each input was read as (a multiple-choice input's sequences end to end)."""
        return per_input(self.rows, self.choices)


def per_input(rows: list[list[int]], choices: int) -> list[list[int]]:
    """`rows` grouped `choices` at a time, each group's ids end to end (one list per input)."""
    if choices == 1:
        return rows
    return [[t for r in rows[i:i + choices] for t in r] for i in range(0, len(rows), choices)]


def special_edges(tokenizer) -> tuple[int, int]:
    """(leading, trailing) special tokens the tokenizer adds to one sequence: (1, 1) for BERT's
    [CLS] ... [SEP] and RoBERTa's <s> ... </s>; found by comparing one word with and without them."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for lead in range(len(with_special) - len(plain) + 1):
        if with_special[lead:lead + len(plain)] == plain:
            return lead, len(with_special) - lead - len(plain)
    return 0, 0


def cut_ids(ids: list[int], max_length: int, mode: str, edges: tuple[int, int]) -> list[int]:
    """`ids` (with the special tokens) cut to `max_length`, keeping the special tokens and the text's
    head, tail, or head+tail (the first quarter of the budget from the start, the rest from the end,
    as in Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?"). `head` equals the
    tokenizer's own truncation=True."""
    if len(ids) <= max_length:
        return ids
    lead, trail = edges
    body, budget = ids[lead:len(ids) - trail], max_length - lead - trail
    if mode == "head":
        kept = body[:budget]
    elif mode == "tail":
        kept = body[len(body) - budget:]
    else:
        head = budget // 4
        kept = body[:head] + body[len(body) - (budget - head):]
    return ids[:lead] + kept + ids[len(ids) - trail:]


def encode_texts(tokenizer, texts: list[str], max_length: int, truncation: str) -> tuple[list[list[int]], np.ndarray, int]:
    """(token ids per text cut to `max_length` as `truncation` says, which texts were cut, tokens
    dropped). One tokenizer call: untruncated, so the cut can keep the tail and the loss is counted."""
    rows = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    long = [i for i, ids in enumerate(rows) if len(ids) > max_length]
    lost = 0
    if long:
        edges = special_edges(tokenizer)
        for i in long:
            cut = cut_ids(rows[i], max_length, truncation, edges)
            lost += len(rows[i]) - len(cut)
            rows[i] = cut
    truncated = np.zeros(len(rows), dtype=bool)
    truncated[long] = True
    return rows, truncated, lost


def encode_pairs(tokenizer, texts: list[str], pairs: list[str], max_length: int) -> tuple[list[list[int]], np.ndarray, dict]:
    """(token ids per pair, [CLS] text [SEP] text_pair [SEP], cut to `max_length` longer side first;
    which pairs were cut; tokens dropped in all and per side). Untruncated first, to count what the
    cut drops per side; only the long pairs are tokenized again."""
    full = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, verbose=False)
    rows = full["input_ids"]
    long = [i for i, r in enumerate(rows) if len(r) > max_length]
    stats = {"truncated_rows": len(long), "truncated_tokens": 0, "truncated_text_tokens": 0, "truncated_pair_tokens": 0}
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long], add_special_tokens=True, truncation="longest_first",
                        max_length=max_length)
        for k, i in enumerate(long):
            before, after = _side_counts(full.encodings[i]), _side_counts(cut.encodings[k])
            stats["truncated_text_tokens"] += before[0] - after[0]
            stats["truncated_pair_tokens"] += before[1] - after[1]
            stats["truncated_tokens"] += len(rows[i]) - len(cut["input_ids"][k])
            rows[i] = cut["input_ids"][k]
    truncated = np.zeros(len(rows), dtype=bool)
    truncated[long] = True
    return rows, truncated, stats


def _side_counts(encoding) -> tuple[int, int]:
    """(tokens of the first text, tokens of the second) in one encoding, special tokens excluded."""
    ids = encoding.sequence_ids
    return sum(1 for s in ids if s == 0), sum(1 for s in ids if s == 1)
