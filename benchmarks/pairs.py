"""Answer-selection benchmark (pair-classification): kubetune vs TF-IDF baselines on the same split.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/pairs.py      # 1000 train / 200 test questions, 1 epoch (~16 min, 2 busy CPU cores)
    .venv/bin/python benchmarks/pairs.py --train-questions 4000 --test-questions 1000 --epochs 3 --max-length 128   # on a GPU

Data: builtin:newsgroups-answers (20 Newsgroups train posts: a subject, its own body = "answer", 3
bodies of other posts of the same newsgroup = "other"; see kubetune.storage.derived). The first
--train-questions questions train (the validate step splits 10% of them off for eval), the next
--test-questions are the test split, every candidate of a question in the same split.

  tfidf-cosine   rank each question's candidates by TF-IDF cosine(subject, body) (fitted on the
                 train texts); a pair is "answer" when it is its question's top candidate.
  tfidf-logreg   logistic regression on pair features: cosine, word overlap, the element-wise
                 product of the two TF-IDF vectors; ranks by P(answer).
  zero-shot-embed  cosine of the base model's mean-pooled embeddings of subject and body, no
                 fine-tuning (benchmarks/baselines.py): what fine-tuning must beat.
  kubetune       the pipeline's own steps in one process (validate -> tokenize -> finetune -> test
                 scoring, as `kubetune run --task pair-classification` runs them).

Metrics on the test split: MRR and accuracy@1 over the questions (4 candidates: chance MRR 0.52,
accuracy@1 0.25), pair accuracy and macro-F1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import embedding_cosine, run_steps  # noqa: E402

from kubetune.storage import assets  # noqa: E402
from kubetune.tasks.metrics import classification_metrics  # noqa: E402
from kubetune.tasks.pair import ranking_metrics  # noqa: E402
from kubetune.training.modeling import resolve_model_dir  # noqa: E402


def split_questions(frame: pd.DataFrame, n_train: int, n_test: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = frame["text"].drop_duplicates()
    train, test = set(order.iloc[:n_train]), set(order.iloc[n_train:n_train + n_test])
    return frame[frame["text"].isin(train)], frame[frame["text"].isin(test)]


def baseline_scores(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, np.ndarray]:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(sublinear_tf=True, min_df=1, stop_words="english").fit(pd.concat([train["text"], train["text_pair"]]))

    def features(f):
        a, b = vec.transform(f["text"]), vec.transform(f["text_pair"])
        cos = np.asarray(a.multiply(b).sum(axis=1)).ravel()
        overlap = np.asarray((a > 0).multiply(b > 0).sum(axis=1)).ravel()
        return cos, hstack([csr_matrix(np.c_[cos, overlap, np.log1p(overlap)]), a.multiply(b)]).tocsr()

    _, x_train = features(train)
    cos_test, x_test = features(test)
    lr = LogisticRegression(max_iter=2000, C=4.0).fit(x_train, (train["label"] == "answer").to_numpy())
    return {"tfidf-cosine": cos_test, "tfidf-logreg": lr.predict_proba(x_test)[:, 1]}


def ranked(test: pd.DataFrame, p_answer: np.ndarray, labels: list[str], predict=None) -> dict:
    """Ranking and pair metrics of scores; pairs are "answer" by `predict` or by being the top candidate."""
    gold = (test["label"] == "answer").to_numpy()
    if predict is None:
        top = pd.Series(p_answer).groupby(test["text"].to_numpy()).transform("max").to_numpy()
        predict = p_answer >= top
    m = ranking_metrics(test["text"].to_numpy(), p_answer, gold)
    ids = {label: i for i, label in enumerate(labels)}
    c = classification_metrics(test["label"].map(ids).to_numpy(), np.where(predict, ids["answer"], ids["other"]), labels)
    return {**m, "accuracy": c["accuracy"], "macro_f1": c["macro_f1"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--train-questions", type=int, default=1000)
    p.add_argument("--test-questions", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--baselines-only", action="store_true", help="score the baselines and stop (no fine-tuning)")
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="h13-pairs-bench-"))
    timings, t_all = {}, time.perf_counter()

    frame = pd.read_parquet(assets.materialize("builtin:newsgroups-answers", work))
    train, test = split_questions(frame, a.train_questions, a.test_questions)
    train.to_parquet(work / "train.parquet", index=False)
    test.to_parquet(work / "test.parquet", index=False)

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(a.model, None, work)
    scores = baseline_scores(train, test)
    scores["zero-shot-embed"] = embedding_cosine(model_dir, test["text"].tolist(), test["text_pair"].tolist(), a.max_length)
    results = {name: ranked(test, s, ["answer", "other"]) for name, s in scores.items()}
    timings["baselines"] = time.perf_counter() - t0
    if a.baselines_only:
        for name, r in results.items():
            print(f"{name:<16} MRR {r['mrr']:.4f} accuracy@1 {r['accuracy_at_1']:.4f}")
        return 0

    meta, training, metrics = run_steps("pair-classification", work, model_dir, a, timings)
    results["kubetune"] = {k: metrics[k] for k in ("ranked_questions", "mrr", "accuracy_at_1", "accuracy", "macro_f1")}
    wall = time.perf_counter() - t_all

    print(f"\nanswer selection, 20 Newsgroups subjects -> bodies (4 candidates): train {meta['splits']['train']['questions']} "
          f"questions ({meta['splits']['train']['rows']} pairs), eval {meta['splits']['eval']['questions']}, test "
          f"{meta['splits']['test']['questions']} ({meta['splits']['test']['rows']} pairs); {a.model}, {training['device']}, "
          f"{a.epochs} epochs, max_length {a.max_length}")
    print(f"{'method':<16} {'MRR':>7} {'acc@1':>7} {'pair acc':>9} {'macro-F1':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['mrr']:7.4f} {r['accuracy_at_1']:7.4f} {r['accuracy']:9.4f} {r['macro_f1']:9.4f}")
    best = max((k for k in results if k != "kubetune"), key=lambda k: results[k]["mrr"])
    beat = results["kubetune"]["mrr"] > results[best]["mrr"]
    print(f"kubetune MRR - best baseline ({best}) MRR = {results['kubetune']['mrr'] - results[best]['mrr']:+.4f}: "
          f"{'BEATS' if beat else 'DOES NOT BEAT'} the baseline")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", wall {wall:.0f}")
    if a.out:
        a.out.write_text(json.dumps({"results": results, "timings": timings, "wall_seconds": wall,
                                     "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    return 0 if beat else 1


if __name__ == "__main__":
    raise SystemExit(main())
