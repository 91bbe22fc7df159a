"""Fine-tune speed and quality: kubetune's fine-tune step vs the Hugging Face Trainer tutorial recipe.

    python benchmarks/finetune.py --device cpu --json finetune-cpu.json          # 1 epoch on CPU
    python benchmarks/finetune.py --device cuda                                    # 3 epochs on a GPU
    python benchmarks/finetune.py --device cuda --model-config bert-base --limit 2000   # speed only, MFU

Same data for every row: the SMS Spam Collection (builtin:sms-spam) split by the validate step
(test = 20% stratified, eval = 10%, seed 0), tokenized once at max_length 128; the same model
(all-MiniLM-L6-v2), the same epochs.

  baseline   transformers.Trainer with the recipe every tutorial uses: every example padded to
             max_length=128, fp32, AdamW lr 2e-5, batch 32, linear decay.
  kubetune   kubetune.steps.finetune.finetune with its defaults (batch 32, lr 1e-4, length-grouped
             dynamic padding on the device, fused AdamW, bf16 autocast on CUDA).
  lora       the same step with --peft lora (rank 8, alpha 16, query/value, lr 5e-4).

Each row runs in its own process (clean peak memory, no warm caches shared). train_s is the
training loop only (our step also scores the eval split after each epoch; that is not counted),
samples/s = rows x epochs / train_s, tokens/s counts real (non-pad) tokens only. Accuracy and
macro-F1 are on the test split, scored the same way for every row. `--model-config bert-base` trains
a randomly initialised BERT-base (110M parameters) for speed only and prints the achieved model
TFLOP/s (6 x non-embedding parameters per real token plus attention) and its utilisation of the
GPU's dense bf16 peak. speedup = kubetune / baseline samples/s; f1_delta = kubetune - baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # subprocesses run from the repository root (kubetune itself is installed)

MAX_LENGTH = 128
# dense bf16 peak TFLOP/s by GPU name (vendor data sheets, SXM parts)
BF16_PEAK = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def prepare(work: Path, limit: int, model_config: str) -> dict:
    from kubetune.steps.tokenize import TokenizeConfig, tokenize
    from kubetune.steps.validate import ValidateConfig, validate
    from kubetune.storage import assets

    model_dir = assets.resolve("builtin:all-minilm-l6-v2")[0]
    dataset, tokens = work / "dataset", work / "tokens"
    report, _ = validate("builtin:sms-spam", "", "", ValidateConfig(limit=limit, seed=0, eval_fraction=0.1, test_fraction=0.2), dataset)
    if not report.passed:
        sys.exit("validation of builtin:sms-spam failed")
    tokenize(dataset, model_dir, tokens, TokenizeConfig(max_length=MAX_LENGTH), store=None)
    if model_config == "bert-base":
        model_dir = random_bert_base(work / "bert-base", tokens)
    return {"dataset": str(dataset), "tokens": str(tokens), "model": str(model_dir)}


def random_bert_base(out: Path, tokens: Path) -> Path:
    """BERT-base dimensions (12 x 768, 110M parameters) with MiniLM's uncased vocabulary, random init."""
    from transformers import BertConfig, BertForSequenceClassification, set_seed

    set_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522)).save_pretrained(out)
    return out


# ---- one row, in its own process -----------------------------------------------------------


def train_baseline(paths: dict, device: str, epochs: int, out: Path) -> float:
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from kubetune.storage.shards import load_split

    meta = json.loads((Path(paths["tokens"]) / "meta.json").read_text())
    labels = meta["labels"]
    texts = pd.read_parquet(Path(paths["dataset"]) / "train.parquet")["text"].tolist()
    y = load_split(Path(paths["tokens"]), "train").labels
    tokenizer = AutoTokenizer.from_pretrained(Path(paths["tokens"]) / "tokenizer")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    rows = [{**{k: v[i] for k, v in enc.items()}, "labels": torch.tensor(int(y[i]))} for i in range(len(texts))]
    model = AutoModelForSequenceClassification.from_pretrained(
        paths["model"], num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=32, learning_rate=2e-5,
                             num_train_epochs=epochs, seed=0, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, use_cpu=device == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    t0 = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    trainer.model.save_pretrained(out / "model")
    return seconds


def train_ours(paths: dict, device: str, epochs: int, out: Path, lora: bool) -> tuple[float, dict]:
    from kubetune.steps.finetune import FinetuneConfig, finetune

    extra = {"peft": "lora", "learning_rate": 5e-4, "lora_target_modules": "query,value"} if lora else {}
    cfg = FinetuneConfig(epochs=epochs, device=device, checkpoint_steps=0, early_stopping_patience=epochs, **extra)
    result = finetune(Path(paths["tokens"]), Path(paths["model"]), out / "model", cfg)
    return result["train_seconds"], result


def model_flops(model_dir: Path, lengths, epochs: int) -> float:
    """Training FLOPs on the real tokens: 6 per non-embedding parameter per token, plus attention
    scores and mixing (12 x layers x hidden x length per token), forward and backward."""
    import numpy as np
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    lengths = np.asarray(lengths, dtype=np.float64)
    per_epoch = 6 * params * lengths.sum() + 12 * config.num_hidden_layers * config.hidden_size * (lengths ** 2).sum()
    return float(per_epoch * epochs)


def one_row(name: str, paths: dict, device: str, epochs: int, speed_only: bool, out_json: Path) -> None:
    import torch

    from kubetune.storage.shards import load_split
    from kubetune.tasks.metrics import classification_metrics
    from kubetune.training.modeling import predict_logits

    tokens = Path(paths["tokens"])
    out = out_json.parent / name
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extra = {}
    if name == "baseline":
        seconds = train_baseline(paths, device, epochs, out)
    else:
        seconds, result = train_ours(paths, device, epochs, out, lora=name == "lora")
        extra["trainable_share"] = round(result["trainable_parameters"] / result["total_parameters"], 5)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    train = load_split(tokens, "train")
    row = {"name": name, "samples_per_s": round(len(train) * epochs / seconds, 1),
           "tokens_per_s": round(int(train.lengths.sum()) * epochs / seconds, 1), "peak_mem_mb": round(peak_mb, 1),
           "train_s": round(seconds, 2), "accuracy": None, "macro_f1": None, **extra}
    flops = model_flops(Path(paths["model"]), train.lengths, epochs)
    row["tflops"] = round(flops / seconds / 1e12, 3)
    if not speed_only:
        from transformers import AutoModelForSequenceClassification

        meta = json.loads((tokens / "meta.json").read_text())
        model = AutoModelForSequenceClassification.from_pretrained(out / "model").to(device)
        test = load_split(tokens, "test")
        logits = predict_logits(model, test, batch_size=128, pad_id=meta["pad_token_id"], input_names=meta["model_input_names"],
                                device=torch.device(device))
        scores = classification_metrics(test.labels, logits.argmax(-1), meta["labels"])
        row.update(accuracy=round(scores["accuracy"], 4), macro_f1=round(scores["macro_f1"], 4))
    out_json.write_text(json.dumps(row))


# ---- the driver ----------------------------------------------------------------------------------


def gpu_peak(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu", None
    import torch

    name = torch.cuda.get_device_name()
    return name, next((v for k, v in BF16_PEAK.items() if k in name), None)


def print_table(rows: list[dict], summary: dict, peak: float | None, device_name: str) -> None:
    cols = ["name", "samples_per_s", "tokens_per_s", "peak_mem_mb", "train_s", "accuracy", "macro_f1", "tflops", "mfu", "trainable_share"]
    for r in rows:
        r["mfu"] = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
    table = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print(f"\nfine-tune benchmark on {device_name} ({summary['epochs']} epoch(s), {summary['train_rows']} train rows, "
          f"model {summary['model']}; mfu against {'%.1f TFLOP/s bf16 peak' % peak if peak else 'n/a (no GPU bf16 peak)'})")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    print(f"speedup (kubetune / baseline samples/s): {summary['speedup']:.2f}x")
    if summary["f1_delta"] is not None:
        print(f"f1_delta (kubetune - baseline macro-F1): {summary['f1_delta']:+.4f} ({100 * summary['f1_delta']:+.2f} points)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--epochs", type=int, default=0, help="default: 1 on cpu, 3 on cuda")
    p.add_argument("--limit", type=int, default=0, help="use a seeded stratified sample of at most N rows (0: all 5,574)")
    p.add_argument("--json", type=Path, help="write {rows, speedup, f1_delta} here")
    p.add_argument("--model-config", choices=("minilm", "bert-base"), default="minilm",
                   help="bert-base: random-init 110M-parameter BERT, speed only (TFLOP/s and MFU)")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA row")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    epochs = a.epochs or (3 if a.device == "cuda" else 1)
    speed_only = a.model_config == "bert-base"
    if a.row:
        one_row(a.row, json.loads(a.paths), a.device, epochs, speed_only, a.row_json)
        return 0
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        paths = prepare(work, a.limit, a.model_config)
        names = ["baseline", "kubetune"] + ([] if a.no_lora or speed_only else ["lora"])
        rows = []
        for name in names:
            print(f"--- {name} ...", flush=True)
            row_json = work / f"{name}.json"
            cmd = [sys.executable, __file__, "--row", name, "--paths", json.dumps(paths), "--row-json", str(row_json),
                   "--device", a.device, "--epochs", str(epochs), "--model-config", a.model_config]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"row {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows.append(json.loads(row_json.read_text()))
            print(json.dumps(rows[-1]), flush=True)
        from kubetune.storage.shards import load_split

        train_rows = len(load_split(Path(paths["tokens"]), "train"))
    base, ours = rows[0], rows[1]
    summary = {"speedup": round(ours["samples_per_s"] / base["samples_per_s"], 3),
               "f1_delta": None if speed_only else round(ours["macro_f1"] - base["macro_f1"], 4),
               "epochs": epochs, "train_rows": train_rows, "model": a.model_config}
    device_name, peak = gpu_peak(a.device)
    print_table(rows, summary, peak, device_name)
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "speedup": summary["speedup"], "f1_delta": summary["f1_delta"],
                                      "device": device_name, "epochs": epochs, "train_rows": train_rows,
                                      "model": a.model_config, "bf16_peak_tflops": peak}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
