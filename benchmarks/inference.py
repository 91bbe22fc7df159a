"""Inference speed: the transformers `pipeline("text-classification")` on torch eager (what a user
would write) against kubetune's ONNX batch path (kubetune.tasks.predictor.Predictor.score: length-sorted
batches, tokenization overlapped with ONNX Runtime, all cores) with the fp32, optimized and int8
variants, on the same texts, in the same run.

    python benchmarks/inference.py                      # ~20k rows: the SMS test split repeated
    python benchmarks/inference.py --rows 5000 --busy --json bench.json

Each path's share of its compute limit: the multiply-adds it had to do (non-pad tokens only: per
layer 4h^2 + 2h*ff per token, plus 2*s*h per token for attention) per second, over the peak this
machine's ONNX Runtime reaches on a large matrix multiply of the same type measured in the same run
(MatMul fp32; MatMulInteger uint8 x int8 for int8). The CPU's features (AVX2, AVX-512 VNNI, AMX)
are read at run time and each row names the kernel family it ran on. `--busy` measures every path
again while another process spins on one core (what a shared node does to a pod's threads).

The model: all-MiniLM-L6-v2 fine-tuned on a seeded sample of the SMS Spam Collection and exported
with every CPU variant by the project's own steps (validate, tokenize, finetune, export), cached in
--workdir so a second run skips it. `--json` writes {"rows": [{"name", "rows_per_s", "p50_ms",
"p99_ms", "agreement", "accuracy"}, ...], "speedup": {"<name>": <rows/s vs baseline>}}; agreement
is with the baseline's labels, accuracy against the true labels. Targets (issue 23): int8 >= 5x the
baseline with an accuracy drop <= 0.5 points, the fp32-quality path (optimized) >= 3x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kubetune.core.system import cpu_features, cpu_kernels, usable_cpus
from kubetune.onnx.model import OnnxClassifier
from kubetune.storage import assets

TARGETS = {"onnx-optimized": 3.0, "onnx-int8": 5.0}
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


def useful_macs(onnx_dir: Path, texts: list[str], max_length: int) -> float:
    """Multiply-adds the encoder must do for `texts` on their real (non-pad) tokens."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(onnx_dir)
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    lengths = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]], dtype=np.float64)
    h, ff = cfg.hidden_size, cfg.intermediate_size
    per_layer = lengths.sum() * (4 * h * h + 2 * h * ff) + (2 * lengths ** 2 * h).sum()
    return float(cfg.num_hidden_layers * per_layer)


def gemm_peak(kind: str, threads: int, seconds: float = 1.5) -> float:
    """Multiply-adds per second ONNX Runtime reaches on one large matrix multiply of `kind` (fp32:
    MatMul; int8: MatMulInteger uint8 x int8, what dynamic quantization runs): the compute limit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = 2048, 384, 1536  # tokens x hidden x feed-forward: the model's largest multiply
    if kind == "fp32":
        node, a_type, b_type, out = helper.make_node("MatMul", ["a", "b"], ["y"]), TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT
        a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    else:
        node, a_type, b_type, out = helper.make_node("MatMulInteger", ["a", "b"], ["y"]), TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
        a, b = np.random.randint(0, 255, (m, k), dtype=np.uint8), np.random.randint(-127, 127, (k, n), dtype=np.int8)
    inputs = [helper.make_tensor_value_info("a", a_type, [m, k]), helper.make_tensor_value_info("b", b_type, [k, n])]
    graph = helper.make_graph([node], "gemm", inputs, [helper.make_tensor_value_info("y", out, [m, n])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"a": a, "b": b}
    session.run(None, feed)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        calls += 1
    return calls * m * k * n / (time.perf_counter() - t0)


@contextlib.contextmanager
def busy_core():
    """Another process spinning on one core for the duration (pinned to the first usable CPU)."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)
        yield
    finally:
        spin.kill()
        spin.wait()


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
    p.add_argument("--busy", action="store_true", help="measure every path again while another process spins on one core")
    a = p.parse_args(argv)

    model_dir, onnx_dir, _ = build_model(a.workdir, a.train_rows)
    texts, truth = test_texts(a.rows)
    max_length = json.loads((onnx_dir / "kubetune.json").read_text())["max_length"]  # the same truncation everywhere
    print(f"\n{len(texts)} texts, batch size {a.batch_size}, max_length {max_length}, {usable_cpus()} cores", flush=True)

    features = cpu_features()
    kernels = {"baseline": "torch eager fp32", "onnx-fp32": cpu_kernels("fp32", features["flags"]),
               "onnx-optimized": cpu_kernels("optimized", features["flags"]), "onnx-int8": cpu_kernels("int8", features["flags"])}
    print(f"CPU: {features['model']}; flags: {' '.join(features['flags']) or 'none found'}", flush=True)
    peaks = {kind: gemm_peak(kind, usable_cpus()) for kind in ("fp32", "int8")}
    macs = useful_macs(onnx_dir, texts, max_length)
    print(f"compute limit (ONNX Runtime GEMM peak, {usable_cpus()} threads): fp32 {peaks['fp32'] / 1e9:.0f} GMAC/s, "
          f"int8 {peaks['int8'] / 1e9:.0f} GMAC/s; {macs / len(texts) / 1e6:.0f} M useful multiply-adds per text", flush=True)

    runs = [("baseline", lambda: run_baseline(model_dir, texts, a.batch_size, max_length))]
    runs += [(f"onnx-{v}", lambda v=v: run_onnx(onnx_dir, v, texts, a.batch_size)) for v in ("fp32", "optimized", "int8")]
    rows, reference = [], None
    for name, fn in runs:
        labels, latencies, wall = fn()
        reference = reference or labels
        ms = np.array(latencies) * 1000
        peak = peaks["int8" if name == "onnx-int8" else "fp32"]
        row = {"name": name, "kernels": kernels[name], "rows_per_s": len(texts) / wall, "p50_ms": float(np.percentile(ms, 50)),
               "p99_ms": float(np.percentile(ms, 99)), "limit_share": macs / wall / peak,
               "agreement": float(np.mean([x == y for x, y in zip(labels, reference)])),
               "accuracy": float(np.mean([x == y for x, y in zip(labels, truth)]))}
        if a.busy:
            with busy_core():
                row["busy_rows_per_s"] = len(texts) / fn()[2]
        rows.append(row)
        print(f"  {name} ({kernels[name]}): {row['rows_per_s']:.1f} rows/s"
              + (f", {row['busy_rows_per_s']:.1f} with one core busy" if a.busy else ""), flush=True)

    base = rows[0]
    speedup = {r["name"]: r["rows_per_s"] / base["rows_per_s"] for r in rows[1:]}
    print(f"\n{'name':<16}{'kernels':<20}{'rows/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'agree':>8}{'accuracy':>9}{'limit':>7}"
          f"{'speedup':>9}{'busy/quiet':>11}  target")
    ok = True
    for r in rows:
        sp = speedup.get(r["name"], 1.0)
        target = TARGETS.get(r["name"])
        met = target is None or (sp >= target and base["accuracy"] - r["accuracy"] <= MAX_ACCURACY_DROP)
        ok &= met
        note = "" if target is None else f">= {target:.1f}x {'met' if met else 'MISSED'}"
        busy = f"{r['busy_rows_per_s'] / r['rows_per_s']:>11.2f}" if a.busy else f"{'-':>11}"
        print(f"{r['name']:<16}{r['kernels']:<20}{r['rows_per_s']:>8.1f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['agreement']:>8.4f}"
              f"{r['accuracy']:>9.4f}{r['limit_share']:>7.0%}{sp:>8.2f}x{busy}  {note}")
    if a.json:
        a.json.write_text(json.dumps({"cpu": features, "peaks_mac_per_s": peaks, "useful_macs": macs, "rows": rows, "speedup": speedup},
                                     indent=2) + "\n")
    print(f"\ntargets {'met' if ok else 'NOT met'} (baseline measured in this run; the machine's load affects every row; "
          "limit: share of the GEMM peak of the path's type)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
