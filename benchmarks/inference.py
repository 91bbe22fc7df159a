"""Inference speed: the transformers `pipeline("text-classification")` on torch eager (what a user
would write) against kubetune's ONNX batch path (kubetune.tasks.predictor.Predictor.score: length-sorted
batches, tokenization overlapped with ONNX Runtime, all cores) with the fp32, optimized and int8
variants, on the same texts, in the same run.

    python benchmarks/inference.py                      # ~20k rows: the SMS test split repeated
    python benchmarks/inference.py --rows 2000 --json bench.json

The model: all-MiniLM-L6-v2 fine-tuned on a seeded sample of the SMS Spam Collection and exported
with every CPU variant by the project's own steps (validate, tokenize, finetune, export), cached in
--workdir so a second run skips it. `--json` writes {"rows": [{"name", "rows_per_s", "p50_ms",
"p99_ms", "agreement", "accuracy"}, ...], "speedup": {"<name>": <rows/s vs baseline>}}; agreement
is with the baseline's labels, accuracy against the true labels. Targets on a 2-core CPU: ONNX
fp32/optimized >= 2.0x the baseline, int8 >= 3.0x with an accuracy drop <= 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from kubetune.core.system import usable_cpus
from kubetune.onnx.model import OnnxClassifier
from kubetune.storage import assets

TARGETS = {"onnx-fp32": 2.0, "onnx-optimized": 2.0, "onnx-int8": 3.0}
MAX_ACCURACY_DROP = 0.005


def build_model(workdir: Path, train_rows: int) -> tuple[Path, Path, Path]:
    """(torch model folder, ONNX folder with variants, dataset folder), built once per workdir."""
    from kubetune.steps.export import ExportConfig, export
    from kubetune.steps.finetune import FinetuneConfig, finetune
    from kubetune.steps.tokenize import TokenizeConfig, tokenize
    from kubetune.steps.validate import ValidateConfig, validate

    data, tokens, model, onnx_dir = (workdir / n for n in ("dataset", "tokens", "model", "onnx"))
    if not (onnx_dir / "kubetune.json").is_file() or "variants" not in json.loads((onnx_dir / "kubetune.json").read_text()):
        base = assets.resolve("builtin:all-minilm-l6-v2")[0]
        validate("builtin:sms-spam", "", "", ValidateConfig(limit=train_rows), data)
        tokenize(data, base, tokens, TokenizeConfig(max_length=128), store=None)
        finetune(tokens, base, model, FinetuneConfig(epochs=2, batch_size=16, learning_rate=2e-4))
        export(model, tokens, onnx_dir, ExportConfig(variants="fp32,optimized,int8"), workdir / "export-work")
    return model, onnx_dir, data


def test_texts(rows: int) -> tuple[list[str], list[str]]:
    """The full SMS test split (the same seeded split `kubetune run` makes), repeated to `rows`."""
    import tempfile

    import pandas as pd

    from kubetune.steps.validate import ValidateConfig, validate

    with tempfile.TemporaryDirectory() as tmp:
        validate("builtin:sms-spam", "", "", ValidateConfig(), Path(tmp))
        test = pd.read_parquet(Path(tmp) / "test.parquet")
    reps = -(-rows // len(test))
    texts, labels = (test["text"].tolist() * reps)[:rows], (test["label"].tolist() * reps)[:rows]
    return texts, labels


def run_baseline(model_dir: Path, texts: list[str], batch_size: int, max_length: int) -> tuple[list[str], list[float], float]:
    import torch
    from transformers import pipeline

    torch.set_num_threads(usable_cpus())
    pipe = pipeline("text-classification", model=str(model_dir), device=-1)
    kw = {"batch_size": batch_size, "truncation": True, "max_length": max_length}
    pipe(texts[:batch_size], **kw)  # warm-up
    labels, latencies = [], []
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        b0 = time.perf_counter()
        labels += [r["label"] for r in pipe(texts[i:i + batch_size], **kw)]
        latencies.append(time.perf_counter() - b0)
    return labels, latencies, time.perf_counter() - t0


def run_onnx(onnx_dir: Path, variant: str, texts: list[str], batch_size: int) -> tuple[list[str], list[float], float]:
    clf = OnnxClassifier(onnx_dir, variant=variant, threads=usable_cpus())
    clf.score(texts[:batch_size], batch_size)  # warm-up
    latencies: list[float] = []
    t0 = time.perf_counter()
    scored = clf.score(texts, batch_size, lambda n, s: latencies.append(s))
    wall = time.perf_counter() - t0
    return [s.prediction["label"] for s in scored], latencies, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000, help="texts to score (the SMS test split repeated)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch, the same for every row of the table")
    p.add_argument("--train-rows", type=int, default=1000, help="SMS rows to fine-tune the benchmark model on (once per workdir)")
    p.add_argument("--workdir", type=Path, default=Path(".bench-cache"), help="where the fine-tuned and exported model is cached")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)

    model_dir, onnx_dir, _ = build_model(a.workdir, a.train_rows)
    texts, truth = test_texts(a.rows)
    max_length = json.loads((onnx_dir / "kubetune.json").read_text())["max_length"]  # the same truncation everywhere
    print(f"\n{len(texts)} texts, batch size {a.batch_size}, max_length {max_length}, {usable_cpus()} cores", flush=True)

    runs = [("baseline (transformers pipeline, torch eager)", "baseline", lambda: run_baseline(model_dir, texts, a.batch_size, max_length))]
    runs += [(f"onnx-{v}", f"onnx-{v}", lambda v=v: run_onnx(onnx_dir, v, texts, a.batch_size)) for v in ("fp32", "optimized", "int8")]
    rows, reference = [], None
    for title, name, fn in runs:
        labels, latencies, wall = fn()
        reference = reference or labels
        ms = np.array(latencies) * 1000
        rows.append({"name": name, "rows_per_s": len(texts) / wall, "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)),
                     "agreement": float(np.mean([x == y for x, y in zip(labels, reference)])),
                     "accuracy": float(np.mean([x == y for x, y in zip(labels, truth)]))})
        print(f"  {title}: {rows[-1]['rows_per_s']:.1f} rows/s", flush=True)

    base = rows[0]
    speedup = {r["name"]: r["rows_per_s"] / base["rows_per_s"] for r in rows[1:]}
    print(f"\n{'name':<16}{'rows/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'agreement':>11}{'accuracy':>10}{'speedup':>9}  target")
    ok = True
    for r in rows:
        s = speedup.get(r["name"], 1.0)
        target = TARGETS.get(r["name"])
        met = target is None or (s >= target and base["accuracy"] - r["accuracy"] <= MAX_ACCURACY_DROP)
        ok &= met
        note = "" if target is None else f">= {target:.1f}x {'met' if met else 'MISSED'}"
        print(f"{r['name']:<16}{r['rows_per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['agreement']:>11.4f}"
              f"{r['accuracy']:>10.4f}{s:>8.2f}x  {note}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "speedup": speedup}, indent=2) + "\n")
    print(f"\ntargets {'met' if ok else 'NOT met'} (baseline measured in this run; the machine's load affects every row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
