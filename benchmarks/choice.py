"""Multiple-choice benchmark: kubetune vs chance, TF-IDF and the zero-shot embedding baseline on the same test split.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/choice.py          # 1000 train / 300 test questions (2 busy CPU cores)
    .venv/bin/python benchmarks/choice.py --train-questions 4000 --test-questions 1000 --epochs 3   # on a GPU

Data: builtin:newsgroups-choice (20 Newsgroups train posts: the subject is the question; its own body
and 3 bodies of other posts of the same newsgroup are the choices, in a seeded random order; see
kubetune.storage.derived). The first --train-questions train (validate splits 10% off for eval), the
next --test-questions are the test split.

  chance           1 / choices
  tfidf-cosine     the choice whose TF-IDF vector (fitted on the train questions and choices) is
                   closest to the question's
  zero-shot-embed  the choice whose mean-pooled base-model embedding is closest to the question's
                   (benchmarks/baselines.py: the base model, no fine-tuning)
  kubetune         the pipeline's own steps in one process (validate -> tokenize -> finetune -> test
                   scoring, as `kubetune run --task multiple-choice` runs them)

Reported on the test split: accuracy and accuracy per answer position. Exit 0 when kubetune beats
all three baselines, 1 when not.
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
from baselines import embedding_cosine, run_steps, tfidf_cosine  # noqa: E402

from kubetune.steps.finetune import FinetuneConfig  # noqa: E402
from kubetune.storage import assets  # noqa: E402
from kubetune.tasks.choice import LETTERS  # noqa: E402
from kubetune.training.modeling import resolve_model_dir  # noqa: E402


def picked(test: pd.DataFrame, scores: np.ndarray) -> np.ndarray:
    """The position of the best-scored choice per question (`scores`: one per choice, row-major)."""
    width = len(test["choices"].iloc[0])
    return scores.reshape(len(test), width).argmax(1)


def accuracy(test: pd.DataFrame, predicted: np.ndarray) -> dict:
    gold = test["answer"].to_numpy()
    return {"accuracy": float((predicted == gold).mean()),
            "per_position": {LETTERS[k]: float((predicted[gold == k] == k).mean()) for k in sorted(set(gold))}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--train-questions", type=int, default=1000)
    p.add_argument("--test-questions", type=int, default=300)
    p.add_argument("--epochs", type=int, default=0, help="0: kubetune's default (chosen from the data size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=FinetuneConfig.learning_rate)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kubetune-choice-bench-"))
    timings, t_all = {}, time.perf_counter()

    frame = pd.read_parquet(assets.materialize("builtin:newsgroups-choice", work))
    train, test = frame.iloc[:a.train_questions], frame.iloc[a.train_questions:a.train_questions + a.test_questions]
    train.to_parquet(work / "train.parquet", index=False)
    test.to_parquet(work / "test.parquet", index=False)
    model_dir = resolve_model_dir(a.model, None, work)

    # ---- baselines: no training ------------------------------------------------------------------
    t0 = time.perf_counter()
    width = len(test["choices"].iloc[0])
    questions = [q for q in test["question"] for _ in range(width)]
    choices = [c for cs in test["choices"] for c in cs]
    fit = list(train["question"]) + [c for cs in train["choices"] for c in cs]
    results = {"chance": {"accuracy": 1 / width, "per_position": {LETTERS[k]: 1 / width for k in range(width)}},
               "tfidf-cosine": accuracy(test, picked(test, tfidf_cosine(fit, questions, choices))),
               "zero-shot-embed": accuracy(test, picked(test, embedding_cosine(model_dir, questions, choices, a.max_length)))}
    timings["baselines"] = time.perf_counter() - t0

    # ---- kubetune: the pipeline's steps ------------------------------------------------------------
    meta, training, metrics = run_steps("multiple-choice", work, model_dir, a, timings)
    results["kubetune"] = {"accuracy": metrics["accuracy"], "per_position": metrics["per_position_accuracy"]}
    wall = time.perf_counter() - t_all

    print(f"\nmultiple choice, 20 Newsgroups subject -> its body among {width}: train {meta['splits']['train']['rows']} questions, "
          f"eval {meta['splits']['eval']['rows']}, test {meta['splits']['test']['rows']}; {a.model}, {training['device']}, "
          f"{training['epochs']} epochs x {training['steps_per_epoch']} steps, lr {a.learning_rate}, batch {a.batch_size}, max_length {a.max_length}")
    print(f"{'method':<16} {'accuracy':>8}  per position")
    for name, r in results.items():
        print(f"{name:<16} {r['accuracy']:8.4f}  " + " ".join(f"{k} {v:.3f}" for k, v in r["per_position"].items()))
    best = max((k for k in results if k != "kubetune"), key=lambda k: results[k]["accuracy"])
    beat = results["kubetune"]["accuracy"] > results[best]["accuracy"]
    print(f"kubetune accuracy - best baseline ({best}) = {results['kubetune']['accuracy'] - results[best]['accuracy']:+.4f}: "
          f"{'BEATS' if beat else 'DOES NOT BEAT'} every baseline")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", wall {wall:.0f}")
    if a.out:
        a.out.write_text(json.dumps({"results": results, "timings": timings, "wall_seconds": wall, "training": {
            k: training.get(k) for k in ("epochs", "steps_per_epoch", "device", "best_epoch", "history", "train_seconds")},
            "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    return 0 if beat else 1


if __name__ == "__main__":
    raise SystemExit(main())
