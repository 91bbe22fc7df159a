"""Per-text features measured with the model's own tokenizer, shared by the tokenize coverage
check, the reference profile (evaluate), drift reports and the serving metrics.

The embedding is a hashed bag of the model's token ids (EMBED_DIM buckets, square-root counts,
L2-normalised): what a domain classifier needs to tell two text populations apart (Evidently's
text drift trains its classifier on a bag of words the same way). It is computed from token ids
alone, so the profile frozen in evaluate (torch) and the drift check on an exported version (ONNX,
whose graph outputs logits only) measure the same thing.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import numpy as np

EMBED_DIM = 64
# low cardinality on purpose: these names become Prometheus label values and report rows
SCRIPTS = ("latin", "cjk", "kana", "hangul", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "other")
_SCRIPT_OF_NAME = {"LATIN": "latin", "CJK": "cjk", "HIRAGANA": "kana", "KATAKANA": "kana", "HANGUL": "hangul",
                   "CYRILLIC": "cyrillic", "GREEK": "greek", "ARABIC": "arabic", "HEBREW": "hebrew",
                   "DEVANAGARI": "devanagari", "THAI": "thai"}


@lru_cache(maxsize=65536)
def script_of(ch: str) -> str:
    """The writing system of a letter, from its Unicode name ("CJK UNIFIED IDEOGRAPH-4E2D" -> cjk)."""
    name = unicodedata.name(ch, "")
    return _SCRIPT_OF_NAME.get(name.split(" ", 1)[0], "other")


def flat(text) -> str:
    """A text, or a tuple of texts (a pair; a question, its choices and context) joined for display and script counts."""
    return text if isinstance(text, str) else " | ".join(flat(t) for t in text if t is not None)


def script_counts(texts: list[str]) -> dict[str, int]:
    """Letters per script over `texts` (digits, punctuation and spaces are not counted)."""
    counts = dict.fromkeys(SCRIPTS, 0)
    for text in texts:
        for ch in text:
            if ch.isalpha():
                counts[script_of(ch)] += 1
    return counts


def main_script(counts: dict[str, int]) -> tuple[str, float]:
    total = sum(counts.values())
    if not total:
        return "none", 0.0
    name = max(counts, key=counts.get)
    return name, counts[name] / total


def unknown_counts(rows: list[list[int]], unk_id: int | None, special: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(unknown tokens, content tokens) per row: special tokens ([CLS], [SEP], ...) are not content."""
    unk = np.zeros(len(rows), dtype=np.int64)
    content = np.zeros(len(rows), dtype=np.int64)
    for i, ids in enumerate(rows):
        content[i] = sum(1 for t in ids if t not in special)
        if unk_id is not None:
            unk[i] = sum(1 for t in ids if t == unk_id)
    return unk, content


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special token ids, less the unknown token (which stands for content)."""
    return {int(t) for t in tokenizer.all_special_ids if t != tokenizer.unk_token_id}


def embed(rows: list[list[int]], special: set[int], dim: int = EMBED_DIM) -> np.ndarray:
    """Hashed bag of token ids per row [rows, dim] float32 (see the module docstring)."""
    out = np.zeros((len(rows), dim), dtype=np.float32)
    for i, ids in enumerate(rows):
        kept = np.fromiter((t for t in ids if t not in special), dtype=np.uint64)
        if kept.size:
            # a multiplicative hash spreads neighbouring ids (often related word pieces) over buckets
            np.add.at(out[i], ((kept * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(dim)).astype(np.int64), 1.0)
    out = np.sqrt(out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1.0, norms)


def coverage(tokenizer, texts: list[str], rows: list[list[int]], examples: int = 3) -> dict:
    """How much of `texts` the tokenizer's vocabulary covers: the unknown-token share, the texts
    with the most unknown tokens and the character-script mix (what the fix depends on)."""
    return Coverage(tokenizer, examples).add(texts, rows).result()


class Coverage:
    """`coverage` over chunks of one split (tokenize streams it): counts add up, and the examples
    are the worst texts of all chunks, so the result equals that of the whole split at once."""

    def __init__(self, tokenizer, examples: int = 3):
        self.special, self.unk_id, self.examples = special_ids(tokenizer), tokenizer.unk_token_id, examples
        self.unknown = self.content = self.seen = 0
        self.scripts: dict[str, int] = {}
        self.worst: list[tuple[float, int, str]] = []  # (-unknown share, row number, text[:80])

    def add(self, texts: list, rows: list[list[int]]) -> "Coverage":
        unk, content = unknown_counts(rows, self.unk_id, self.special)
        self.unknown, self.content = self.unknown + int(unk.sum()), self.content + int(content.sum())
        texts = [flat(t) for t in texts]
        for name, n in script_counts(texts).items():
            self.scripts[name] = self.scripts.get(name, 0) + n
        shares = unk / np.maximum(content, 1)
        self.worst += [(-float(shares[i]), self.seen + int(i), texts[i][:80])
                       for i in np.argsort(-shares, kind="stable")[:self.examples] if unk[i]]
        self.worst = sorted(self.worst)[:self.examples]
        self.seen += len(texts)
        return self

    def state(self) -> dict:
        """What `merge` needs to continue from here (JSON): a piece of a split tokenized elsewhere."""
        return {"unknown": self.unknown, "content": self.content, "seen": self.seen, "scripts": self.scripts,
                "worst": [list(w) for w in self.worst]}

    def merge(self, state: dict) -> "Coverage":
        """Add the `state` of the chunks that follow this one's (their rows are numbered on from here):
        the result equals one pass over all of them."""
        self.unknown, self.content = self.unknown + state["unknown"], self.content + state["content"]
        for name, n in state["scripts"].items():
            self.scripts[name] = self.scripts.get(name, 0) + n
        self.worst = sorted(self.worst + [(share, self.seen + row, text) for share, row, text in state["worst"]])[:self.examples]
        self.seen += state["seen"]
        return self

    def result(self) -> dict:
        share = self.unknown / self.content if self.content else 0.0
        name, part = main_script(self.scripts)
        return {"unknown_tokens": self.unknown, "content_tokens": self.content, "unknown_share": round(share, 4),
                "main_script": name, "main_script_share": round(part, 4),
                "examples": [{"text": text, "unknown_share": round(-neg, 3)} for neg, _, text in self.worst]}
