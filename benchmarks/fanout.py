"""Fan-out: validate and tokenize as one task against the pipeline's fan-out (a plan, the pieces in
parallel, the merge) on the same data; the outputs must be the same.

    .venv/bin/python benchmarks/fanout.py                                  # 500k rows in 4 files, 2 pieces at a time
    .venv/bin/python benchmarks/fanout.py --rows 2000000 --files 8 --parallel 4

Data: as benchmarks/scale.py (the SMS texts repeated and made unique), written as --files CSV part
files in one folder, the way large data arrives from a data lake. Every command is its own process,
as a pod would run it (`python -m kubetune.steps.<step>` with --plan, --piece, --pieces); the
pieces run --parallel at a time (default: the CPU count), the plan before and the merge after them.
validate: a piece per file (--fanout-mb a little over a file's size); tokenize: --files pieces
(--fanout-rows the rows over --files, in whole shards of --shard-rows).

Baseline: the same step as one task on the same files, in the same run. Printed per step: its wall
time and peak RSS (the process's maxrss); the fan-out's wall time (plan + pieces + merge), its
slowest piece, its merge, the largest peak RSS of a piece and of the merge; the speedup (one task's
wall time over the fan-out's); and whether the outputs are equal (validate: meta.json with its
fingerprints, but for the fan-out option it records; tokenize: meta.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale import ROOT, measure, sms_rows

MB = 1 << 20


def write_parts(folder: Path, rows: int, files: int, source: list[tuple[str, str]]) -> None:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for k in range(files):
        with open(folder / f"part-{k:03d}.csv", "w", encoding="utf-8", newline="") as f:
            out = csv.writer(f)
            out.writerow(("text", "label"))
            for i in range(k * per, min((k + 1) * per, rows)):
                text, label = source[i % len(source)]
                out.writerow((f"{text} #{i}", label))


def run_parallel(commands: list[list[str]], logs: list[Path], parallel: int) -> list[dict]:
    """Run the commands `parallel` at a time, each its own process: wall seconds and peak RSS of each."""
    pending, running, results = list(enumerate(commands)), {}, [None] * len(commands)
    while pending or running:
        while pending and len(running) < parallel:
            i, args = pending.pop(0)
            out = open(logs[i], "w")
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            running[proc.pid] = (i, proc, out, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        i, proc, out, t0 = running.pop(pid)
        out.close()
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"{commands[i][:3]} failed; its log: {logs[i]}\n{logs[i].read_text()[-3000:]}")
        results[i] = {"seconds": time.perf_counter() - t0, "peak_mb": usage.ru_maxrss / 1024}
    return results


def last_json(log: Path):
    return json.loads(log.read_text().strip().splitlines()[-1])


def fan_out(step: str, plan: list[str], piece: list[str], merge: list[str], work: Path, parallel: int) -> dict:
    """plan, then a process per piece (`piece` + the piece), then `merge` + the pieces: timed end to end."""
    t0 = time.perf_counter()
    planned = measure(plan, work / f"{step}-plan.log")
    pieces = last_json(work / f"{step}-plan.log")
    runs = run_parallel([[*piece, "--piece", p] for p in pieces], [work / f"{step}-{p}.log" for p in pieces], parallel)
    merged = measure([*merge, "--pieces", ",".join(pieces)], work / f"{step}-merge.log")
    return {"seconds": time.perf_counter() - t0, "pieces": len(pieces), "plan_s": planned["seconds"],
            "slowest_piece_s": max(r["seconds"] for r in runs), "merge_s": merged["seconds"],
            "piece_peak_mb": max(r["peak_mb"] for r in runs), "merge_peak_mb": merged["peak_mb"]}


def same_json(a: Path, b: Path, drop: tuple[str, ...] = ()) -> bool:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    for d in (x, y):
        for k in drop:
            d.pop(k, None)
    return x == y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--files", type=int, default=4, help="CSV part files the data is written as (validate: a piece each)")
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="pieces run at a time")
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--shard-rows", type=int, default=50_000, help="tokenize: rows per token shard")
    p.add_argument("--workdir", type=Path, default=None, help="where data and outputs go (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kubetune-fanout-"))
    data = work / "train"
    write_parts(data, a.rows, a.files, sms_rows())
    mb = max(f.stat().st_size for f in data.iterdir()) * 1.01 / MB
    results = {}
    for mode in ("one", "fan"):
        d = work / mode
        common = ["--store", str(d / "store"), "--run-id", "bench"]
        validate = ["-m", "kubetune.steps.validate", "--train", str(data), "--fanout-mb", str(mb if mode == "fan" else 0), *common]
        outputs = ["--out", str(d / "dataset"), "--report", str(d / "report.md"), "--expectations", str(d / "expectations.json")]
        tokenize = ["-m", "kubetune.steps.tokenize", "--dataset", str(d / "dataset"), "--model", a.model, "--max-length", str(a.max_length),
                    "--shard-rows", str(a.shard_rows), "--fanout-rows", str(-(-a.rows // a.files)), *common]
        if mode == "one":
            results["validate"] = {"one": measure([*validate, *outputs], work / "validate-one.log")}
            results["tokenize"] = {"one": measure([*tokenize, "--out", str(d / "tokens")], work / "tokenize-one.log")}
        else:
            results["validate"]["fan"] = fan_out("validate", [*validate, "--plan"], validate, [*validate, *outputs], work, a.parallel)
            results["tokenize"]["fan"] = fan_out("tokenize", [*tokenize, "--plan"], tokenize, [*tokenize, "--out", str(d / "tokens")], work,
                                                 a.parallel)
    one, fan = work / "one", work / "fan"
    results["validate"]["same"] = same_json(one / "dataset/meta.json", fan / "dataset/meta.json", ("config",))
    results["tokenize"]["same"] = same_json(one / "tokens/meta.json", fan / "tokens/meta.json")

    print(f"{a.rows:,} rows in {a.files} files; pieces {a.parallel} at a time; {os.cpu_count()} CPUs")
    print(f"{'step':<9} {'one task: s / peak MB':>22} {'fan-out: s (pieces; plan, slowest piece, merge)':>50} "
          f"{'peak MB piece / merge':>22} {'speedup':>8} same")
    for step, r in results.items():
        o, f = r["one"], r["fan"]
        print(f"{step:<9} {o['seconds']:>12.1f} / {o['peak_mb']:>6.0f} "
              f"{f['seconds']:>15.1f} ({f['pieces']}; {f['plan_s']:.1f}, {f['slowest_piece_s']:.1f}, {f['merge_s']:.1f})"
              f"{f['piece_peak_mb']:>17.0f} / {f['merge_peak_mb']:<6.0f} {o['seconds'] / f['seconds']:>7.2f}x {r['same']}")
    if a.out:
        a.out.write_text(json.dumps({"rows": a.rows, "files": a.files, "parallel": a.parallel, "results": results}, indent=2))
    return 0 if all(r["same"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
