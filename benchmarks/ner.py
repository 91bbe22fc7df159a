"""NER benchmark: fine-tune on the full CoNLL-2003 English train split, pick the epoch by validation
entity micro-F1, report test entity micro-F1 with a per-type table (the issue's acceptance check).

    .venv/bin/python benchmarks/ner.py                                   # full data, 5 epochs (~30-40 min on 2 CPU cores)
    .venv/bin/python benchmarks/ner.py --limit 300 --epochs 1 --max-length 64    # a quick smoke run
    .venv/bin/python benchmarks/ner.py --limit 1500 --epochs 0 --seed 1          # the NER quick try as `kubetune run` trains it

It runs the pipeline's own steps in one process (validate -> tokenize -> finetune -> test scoring,
the same functions `kubetune run --task token-classification` runs under kfp.local), without the
registry, so the numbers are the step code's. Target: test entity micro-F1 >= 0.86 with
all-MiniLM-L6-v2 (published: BERT-base cased 0.924).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from kubetune.steps.evaluate import GateConfig, score_test
from kubetune.steps.finetune import FinetuneConfig, finetune
from kubetune.steps.tokenize import TokenizeConfig, tokenize
from kubetune.steps.validate import ValidateConfig, validate
from kubetune.storage.contracts import TokensMeta
from kubetune.storage.shards import load_split
from kubetune.tasks.metrics import per_type_table
from kubetune.tasks.token import TASK, test_metrics, word_level_tags
from kubetune.training.modeling import predict_logits, resolve_model_dir

TARGET = 0.86


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", default="builtin:conll2003")
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--limit", type=int, default=0, help="sentences per split; 0: all")
    p.add_argument("--epochs", type=int, default=5, help="0: chosen from the data size, as `kubetune run` does")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the split and the training (as `kubetune run --seed`)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--test-every-epoch", action="store_true", help="also score test after each epoch (logged, not used for selection)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the intermediate folders here")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = p.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="kubetune-ner-bench-"))
    timings, t_all = {}, time.perf_counter()

    t0 = time.perf_counter()
    report, meta = validate(a.train, "", "", ValidateConfig(task=TASK.name, limit=a.limit, seed=a.seed), work / "dataset")
    if not report.passed:
        print(report.error_message())
        return 2
    timings["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(a.model, None, work)
    tokens = tokenize(work / "dataset", model_dir, work / "tokens", TokenizeConfig(max_length=a.max_length), store=None)
    timings["tokenize"] = time.perf_counter() - t0

    # test scores after every epoch, logged only: the epoch is picked by validation F1. They make a
    # run that is cut short (a time limit) still report the test F1 of its best epoch so far.
    test_by_epoch = {}

    def on_epoch(epoch, model):
        test = load_split(work / "tokens", "test")
        logits = predict_logits(model, test, per_token=True, batch_size=128, pad_id=tokens["pad_token_id"],
                                input_names=tokens["model_input_names"], device=next(model.parameters()).device)
        gold = [list(t) for t in pd.read_parquet(work / "dataset" / "test.parquet")["tags"]]
        m = test_metrics(gold, word_level_tags(test, logits.argmax(-1), tokens["labels"])[1])
        test_by_epoch[epoch] = m["entity_micro_f1"]
        print(f"[benchmark] epoch {epoch}: test entity micro-F1 {m['entity_micro_f1']:.4f} (logged; selection is by validation)\n"
              + per_type_table(m), flush=True)
        model.train()

    t0 = time.perf_counter()
    cfg = FinetuneConfig(epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.learning_rate,
                         early_stopping_patience=a.patience, device=a.device, seed=a.seed)
    training = finetune(work / "tokens", model_dir, work / "model", cfg, on_epoch=on_epoch if a.test_every_epoch else None)
    timings["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics, _, _, _ = score_test(work / "model", work / "tokens", work / "dataset", TokensMeta.read(work / "tokens"),
                                  GateConfig(device=a.device))
    timings["test"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_all

    f1 = metrics["entity_micro_f1"]
    print(f"\nCoNLL-2003 English, {a.model}: train {meta['splits']['train']['rows']}, validation {meta['splits']['eval']['rows']}, "
          f"test {meta['splits']['test']['rows']} sentences; {training['device']}, {a.epochs} epochs max, batch {a.batch_size}, "
          f"lr {a.learning_rate}, max_length {a.max_length}")
    for row in training["history"]:
        print(f"  epoch {row['epoch']}: train loss {row['train_loss']:.4f}, validation entity micro-F1 {row['eval_entity_micro_f1']:.4f}")
    print(f"selected epoch {training['best_epoch']} by validation entity micro-F1 {training['best_eval_entity_micro_f1']:.4f}\n")
    print(per_type_table(metrics))
    gate = GateConfig().threshold
    print(f"epochs {training['epochs']} ({training['epochs_reason']}); the default gate (>= {gate}): {'PASS' if f1 >= gate else 'FAIL'}")
    print(f"\ntest entity micro-F1 {f1:.4f} (target >= {TARGET}: {'MET' if f1 >= TARGET else 'MISSED'}), macro-F1 "
          f"{metrics['entity_macro_f1']:.4f}, token accuracy {metrics['token_accuracy']:.4f}, words lost to truncation "
          f"{metrics['truncated_words']}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", wall {wall:.0f} ({wall / 60:.1f} min)")
    if a.out:
        a.out.write_text(json.dumps({"metrics": metrics, "training": training, "timings": timings, "wall_seconds": wall,
                                     "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
