"""Step 3 - finetune: a sequence classifier from a pretrained transformer, on CPU or CUDA.

    python -m components.finetune --tokens /tmp/kt/tokens --model builtin:all-minilm-l6-v2 \
        --out /tmp/kt/model --store ./kubetune-store --run-id dev --epochs 1

The recipe: AdamW (no weight decay on biases and LayerNorm), linear warm-up then linear decay,
gradient clipping, length-grouped dynamic-padding batches (no compute on long runs of pad tokens),
bf16 autocast on CUDA with fp32 master weights, fp32 on CPU. After each epoch the eval split is
scored; the best epoch by `selection_metric` is kept and training stops early after `patience`
epochs without improvement. Everything random is seeded.

Output: a transformers model folder (config.json with id2label/label2id, model.safetensors, the
tokenizer files) and training.json (per-epoch history, best epoch, throughput).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.entry import add_config_args, config_from_args, run_main, step_parser
from components.errors import ConfigError, InputError
from components.metrics import SEQUENCE, TASK_METRICS, TOKEN, classification_metrics, resolve_metric
from components.modeling import (
    auto_model_class,
    batch_inputs,
    pick_device,
    predict_logits,
    predict_token_logits,
    resolve_model_dir,
    token_metrics,
)
from components.progress import Progress, log
from components.records import open_run, scratch
from components.shards import IGNORE, length_grouped_batches, load_split, pad_token_labels
from components.store import S3Settings

STEP = "finetune"


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    early_stopping_patience: int = 2  # epochs without eval improvement before stopping
    selection_metric: str = ""  # eval metric that picks the best epoch; empty: the task's (macro_f1, entity_micro_f1)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    eval_batch_size: int = 128
    cpu_threads: int = 0  # 0: every core this process may use

    def check(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs}: train at least 1 epoch")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append("batch sizes must be >= 1")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate={self.learning_rate}: expected something like 2e-5 .. 2e-4")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        known = [m for names in TASK_METRICS.values() for m in names]
        if self.selection_metric and self.selection_metric not in known:
            problems.append(f"selection_metric={self.selection_metric!r}: use one of {', '.join(known)} (empty: the task's default)")
        if problems:
            raise ConfigError("; ".join(problems))


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's limit)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def load_classifier(model_dir: Path, labels: list[str], task: str = SEQUENCE):
    """The pretrained encoder with a classification head for `labels` (a new head when the
    checkpoint has none or one of another size)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report is replaced by the one line below
    hf_logging.disable_progress_bar()  # tqdm bars with carriage returns garble pod logs
    try:
        model, info = auto_model_class(task).from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as e:
        what = "tag tokens" if task == TOKEN else "classify sequences"
        raise InputError(f"model {model_dir}: not a transformers model that can {what} ({e})") from None
    fresh = sorted(set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])})
    if fresh:
        log(STEP, f"new classification head for {len(labels)} labels ({len(fresh)} tensors initialised)")
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_target(split, index: np.ndarray, device):
    """What the loss compares the logits with: a label per row, or (token classification) a label
    per token, IGNORE on padding, continuation sub-tokens and special tokens."""
    import torch

    target = pad_token_labels(split, index) if split.token_labels is not None else split.labels[index]
    return torch.from_numpy(target).to(device, non_blocking=True)


def task_loss(logits, target):
    """Cross-entropy per row, or per labelled token (mean over the batch's labelled tokens)."""
    import torch.nn.functional as F

    if logits.ndim == 3:
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits.float(), target)


def eval_scores(model, split, labels: list[str], task: str, **predict) -> dict:
    """The eval split's metrics for the task (components.metrics)."""
    if task == TOKEN:
        return token_metrics(split, predict_token_logits(model, split, **predict), labels)
    return classification_metrics(split.labels, predict_logits(model, split, **predict).argmax(-1), labels)


def finetune(tokens_dir: Path, model_dir: Path, out_dir: Path, cfg: FinetuneConfig, on_epoch=None) -> dict:
    """Train, keep the best epoch by eval `selection_metric`, save it. `on_epoch(epoch, model)`, when
    given, runs after each epoch's eval (benchmarks use it to log more than the pipeline needs)."""
    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    cfg.check()
    device = pick_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads or usable_cpus())
    set_seed(cfg.seed)  # python, numpy and torch: the head's init and the batch order repeat
    rng = np.random.default_rng(cfg.seed)

    # ---- data: token shards, padded per batch ------------------------------------------------
    meta = json.loads((tokens_dir / "meta.json").read_text())
    labels, pad_id, names = meta["labels"], meta["pad_token_id"], meta["model_input_names"]
    task = meta.get("task", SEQUENCE)
    selection = resolve_metric(task, cfg.selection_metric, "selection_metric")
    train, evals = load_split(tokens_dir, "train"), load_split(tokens_dir, "eval")
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    # ---- model and optimiser -----------------------------------------------------------------
    model = load_classifier(model_dir, labels, task).to(device)
    fused = device.type == "cuda"  # one kernel for the whole AdamW update; CUDA only
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, fused=fused)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log(STEP, f"device {device}, {len(train)} train / {len(evals)} eval rows, {cfg.epochs} epoch(s) x {steps_per_epoch} steps, "
              f"batch {cfg.batch_size}, lr {cfg.learning_rate}" + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""))

    # ---- train, evaluating after each epoch ------------------------------------------------
    history, best, best_state, stale = [], None, None, 0
    train_seconds, real_tokens = 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        progress = Progress(STEP, steps_per_epoch, "steps", label=f"epoch {epoch}/{cfg.epochs}")
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for step, index in enumerate(length_grouped_batches(train.lengths, cfg.batch_size, rng), start=1):
            inputs = batch_inputs(train, index, pad_id, names, device)
            target = batch_target(train, index, device)
            with autocast:
                logits = model(**inputs).logits
            loss = task_loss(logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            real_tokens += int(train.lengths[index].sum())
            # .item() waits for the GPU: only when a progress line is due
            progress.update(1, **({"loss": loss_sum.item() / step} if progress.due() else {}))
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0

        scores = eval_scores(model, evals, labels, task, batch_size=cfg.eval_batch_size, pad_id=pad_id, input_names=names, device=device)
        value = scores[selection]
        shown = ("accuracy", "macro_f1") if task == SEQUENCE else ("token_accuracy", "entity_micro_f1")
        history.append({"epoch": epoch, "train_loss": round(loss_sum.item() / steps_per_epoch, 5),
                        **{f"eval_{k}": scores[k] for k in shown}, f"eval_{selection}": value,
                        "seconds": round(time.perf_counter() - t0, 1)})
        log(STEP, f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, " + ", ".join(f"eval {k} {scores[k]:.4f}" for k in shown))
        if on_epoch is not None:
            on_epoch(epoch, model)
        if best is None or value > best:
            best, stale = value, 0
            # keep the best weights on the host: a small model fits, and nothing is written twice
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_epoch = epoch
        else:
            stale += 1
            if stale >= cfg.early_stopping_patience:
                log(STEP, f"early stop: no eval {selection} gain for {stale} epoch(s)")
                break

    # ---- save the best epoch ------------------------------------------------------------------
    model.load_state_dict(best_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors
    shutil.copytree(tokens_dir / "tokenizer", out_dir, dirs_exist_ok=True)
    result = {
        "device": str(device),
        "best_epoch": best_epoch,
        "task": task,
        "selection_metric": selection,
        f"best_eval_{selection}": best,
        "epochs_run": len(history),
        "history": history,
        "train_seconds": round(train_seconds, 2),
        "train_samples_per_s": round(len(train) * len(history) / train_seconds, 1),
        "train_tokens_per_s": round(real_tokens / train_seconds, 1),
        "labels": labels,
        "config": asdict(cfg),
    }
    (out_dir / "training.json").write_text(json.dumps(result, indent=2))
    log(STEP, f"best epoch {best_epoch}: eval {selection} {best:.4f}; {result['train_samples_per_s']} samples/s")
    return result


def run_step(*, store_uri: str, run_id: str, tokens_dir: Path, model_uri: str, out_dir: Path, cfg: FinetuneConfig) -> dict:
    record = open_run(store_uri, run_id)
    with record.step(STEP, config={"model": model_uri, **asdict(cfg)}) as rec:
        model_dir = resolve_model_dir(model_uri, S3Settings.from_env(), scratch(STEP))
        result = finetune(tokens_dir, model_dir, out_dir, cfg)
        rec["outputs"] = {k: result[k] for k in ("device", "best_epoch", "epochs_run", "train_seconds", "train_samples_per_s", "history")}
    return result


def main(argv: list[str] | None = None) -> int:
    p = step_parser("components.finetune", __doc__)
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path)
    add_config_args(p, FinetuneConfig)
    a = p.parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, tokens_dir=a.tokens, model_uri=a.model,
                                     out_dir=a.out, cfg=config_from_args(FinetuneConfig, a)))


if __name__ == "__main__":
    sys.exit(main())
