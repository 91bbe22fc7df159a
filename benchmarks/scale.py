"""Scale: rows/s and peak memory of each data step as the data grows; the target is memory flat in
the data's size and time linear in it.

    .venv/bin/python benchmarks/scale.py                                   # 50k and 250k rows
    .venv/bin/python benchmarks/scale.py --sizes 250000,1000000,2000000    # the issue's sizes
    .venv/bin/python benchmarks/scale.py --steps validate                  # one step (a step reads the one before)

Data: the SMS Spam Collection's 5,574 texts repeated and made unique (each row ends in its serial
number, so no row is a duplicate of another), CSV with text,label, written once per size.

Each step runs standalone in its own process, as a pipeline pod runs it (`python -m
kubetune.steps.<step>`); its peak RSS is that process's maxrss (os.wait4), its time the wall
clock. Steps: validate (the train file alone: eval and test are split off here), tokenize (every
split, all-MiniLM-L6-v2's tokenizer, max_length 128) and the fine-tune data path without the model
(`finetune-data`: the train split loaded as the fine-tune loads it, its `DeviceSplit` built, and 20
length-grouped batches of 32 drawn on the CPU; `finetune-data-per-batch`: the same with the split
kept unpadded and padded per batch, as for a split over CPU_SPLIT_BYTES) and batch inference
(`batch-infer`: the plan over the whole file, then its last shard of --infer-shard-rows rows scored,
as one pipeline pod does: its rows/s counts every row read, while only one shard is scored; the model:
all-MiniLM-L6-v2 fine-tuned for one epoch on 400 rows by `kubetune run`, built once under the work
folder, served in the variant that run published).

Baseline: the smallest size, measured in the same run. Printed per step and size: rows/s, peak RSS
(MB), and against the baseline the RSS ratio (1.0: flat) and the time per row ratio (1.0: linear).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubetune.storage import assets

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("validate", "tokenize", "finetune-data", "finetune-data-per-batch", "batch-infer")


def sms_rows() -> list[tuple[str, str]]:
    """(text, label) of the SMS Spam Collection (tab-separated label, text; read without quoting)."""
    with open(assets.resolve("builtin:sms-spam")[0], encoding="utf-8", newline="") as f:
        return [(r[1], r[0]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_data(path: Path, rows: int, source: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(("text", "label"))
        for i in range(rows):
            text, label = source[i % len(source)]
            out.writerow((f"{text} #{i}", label))


def finetune_data(tokens: Path, max_bytes: int | None, steps: int = 20, batch_size: int = 32) -> None:
    """What the fine-tune holds and does for its data, without the model (run in its own process)."""
    import numpy as np
    import torch

    from kubetune.storage.contracts import TokensMeta
    from kubetune.storage.shards import length_grouped_batches, load_split
    from kubetune.training.modeling import DeviceSplit

    meta = TokensMeta.read(tokens)
    split = load_split(tokens, "train")
    data = DeviceSplit(split, meta.inputs.pad_token_id, torch.device("cpu"), max_bytes=max_bytes, sep_id=meta.inputs.sep_token_id)
    for index in length_grouped_batches(split.lengths, batch_size, np.random.default_rng(0))[:steps]:
        data.batch(torch.from_numpy(index), data.width(index), list(meta.inputs.input_names))
    print(f"resident {data.resident}, padded {data.padded_bytes / 2**20:.0f} MB, {len(split)} rows")


def batch_infer(store: str, data: Path, output: Path, shard_rows: int) -> None:
    """What one batch-inference pod holds (run in its own process): the plan over the whole input
    file, then the file's last shard scored (its rows read on past all the others)."""
    from kubetune.steps.batch_infer import PLAN, BatchConfig, ShardScorer, make_plan
    from kubetune.storage.store import open_store

    out = open_store(str(output))
    work = output.parent / f"{output.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    plan = make_plan(open_store(store), "scale", str(data), out, BatchConfig(shard_rows=shard_rows), None, work)
    entry = ShardScorer(out.read_json(PLAN), out, None, work).score(plan["shards"][-1]["id"])
    print(f"{len(plan['shards'])} shards; scored shard {entry['id']}: {entry['rows']} rows at {entry['rows_per_s']} rows/s")


def model_store(work: Path) -> str:
    """A store whose production model `scale` is the real model fine-tuned for one epoch on 400 SMS
    rows (`kubetune run`): batch inference needs one; its quality does not matter here."""
    store = work / "model-store"
    if not (store / "models/scale").exists():
        # the gate at 0: the model is published whatever one epoch on 400 rows makes of it
        subprocess.run([sys.executable, "-m", "kubetune.pipelines.cli", "run", "--store", str(store), "--name", "scale",
                        "--limit", "400", "--epochs", "1", "--gate-threshold", "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return str(store)


def measure(args: list[str], log: Path) -> dict:
    """Wall seconds and peak RSS (MB) of one step process (`args`: after `python`); exits with its
    log when it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{args[0]} failed (exit {proc.returncode}); its log: {log}\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_mb": usage.ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="50000,250000", help="comma-separated row counts, smallest first (the baseline)")
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to run, in order (a step reads the one before)")
    p.add_argument("--workdir", type=Path, default=None, help="where data and outputs go (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--finetune-data", type=Path, default=None, help=argparse.SUPPRESS)  # a tokens folder: the data path alone
    p.add_argument("--per-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--infer-shard-rows", type=int, default=2_000, help="batch-infer: rows per shard (one shard is scored)")
    p.add_argument("--batch-infer", nargs=3, default=None, help=argparse.SUPPRESS)  # store, data, output: one pod alone
    a = p.parse_args()
    if a.finetune_data:
        finetune_data(a.finetune_data, 0 if a.per_batch else None)
        return 0
    if a.batch_infer:
        batch_infer(a.batch_infer[0], Path(a.batch_infer[1]), Path(a.batch_infer[2]), a.infer_shard_rows)
        return 0
    sizes = sorted(int(s) for s in a.sizes.split(","))
    steps = a.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        p.error(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    source, results = sms_rows(), {}
    store = model_store(work) if "batch-infer" in steps else ""
    for rows in sizes:
        d = work / str(rows)
        d.mkdir(parents=True, exist_ok=True)
        write_data(d / "train.csv", rows, source)
        common = ["--store", str(d / "store"), "--run-id", "scale"]
        commands = {
            "validate": ["-m", "kubetune.steps.validate", "--train", str(d / "train.csv"), "--out", str(d / "dataset"),
                         "--report", str(d / "report.md"), "--expectations", str(d / "expectations.json"), *common],
            "tokenize": ["-m", "kubetune.steps.tokenize", "--dataset", str(d / "dataset"), "--model", a.model,
                         "--out", str(d / "tokens"), "--max-length", str(a.max_length), *common],
            "finetune-data": [__file__, "--finetune-data", str(d / "tokens")],
            "finetune-data-per-batch": [__file__, "--finetune-data", str(d / "tokens"), "--per-batch"],
            "batch-infer": [__file__, "--batch-infer", store, str(d / "train.csv"), str(d / "scored"),
                            "--infer-shard-rows", str(a.infer_shard_rows)],
        }
        for done in ("scored", "store"):  # a new batch, and tokenize without its cache, each time
            shutil.rmtree(d / done, ignore_errors=True)
        results[rows] = {step: measure(args, d / f"{step}.log") for step, args in commands.items() if step in steps}
        for step, r in results[rows].items():
            print(f"{rows:>9,} rows  {step:<23} {r['seconds']:7.1f} s  {rows / r['seconds']:8,.0f} rows/s  peak {r['peak_mb']:7,.0f} MB",
                  flush=True)

    base = sizes[0]
    print(f"\nagainst the baseline ({base:,} rows, same run): peak RSS ratio (1.0 = flat), time per row ratio (1.0 = linear)")
    print(f"{'step':<23} " + " ".join(f"{n:>18,}" for n in sizes))
    for step in results[base]:
        cells = []
        for n in sizes:
            r, b = results[n][step], results[base][step]
            cells.append(f"{r['peak_mb'] / b['peak_mb']:7.2f} / {r['seconds'] / n / (b['seconds'] / base):6.2f}")
        print(f"{step:<23} " + " ".join(f"{c:>18}" for c in cells))
    if a.out:
        a.out.write_text(json.dumps({"sizes": sizes, "results": {str(k): v for k, v in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
