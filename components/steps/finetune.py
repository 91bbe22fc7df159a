"""Step 3 - finetune: a sequence classifier from a pretrained transformer, on CPU or CUDA, resumable.

    python -m kubetune.steps.finetune --tokens /tmp/kt/tokens --model builtin:all-minilm-l6-v2 \
        --out /tmp/kt/model --store ./kubetune-store --run-id dev --epochs 1
    python -m kubetune.steps.finetune ... --peft lora --learning-rate 5e-4      # LoRA adapters only
    torchrun --nproc-per-node 2 -m kubetune.steps.finetune ...                 # DDP (gloo on CPU, nccl on CUDA)

The recipe: AdamW (no weight decay on biases and LayerNorm; fused), linear warm-up then linear
decay, gradient accumulation and clipping, length-grouped dynamic-padding batches. The training
split is padded once and kept on the device (kubetune.training.modeling.DeviceSplit): a step is a gather
plus forward/backward, with no host collate, no host-to-device copy and no host sync (the loss is
read only when a progress line is due). A split too big for that (padded over 2 GiB on an accelerator,
256 MB on the CPU: modeling.DEVICE_SPLIT_BYTES, CPU_SPLIT_BYTES) stays unpadded and each batch is padded
when drawn; its token ids stay on disk when over shards.MMAP_BYTES. The log says which.
bf16 autocast on CUDA with fp32 master weights, fp32 on CPU with every usable core. Optional
`torch.compile`. After each epoch the eval split is scored; the best epoch by `selection_metric` is
kept and training stops early after `patience` epochs without improvement. Everything random is
seeded; a batch order depends only on (seed, epoch).

Checkpoints (kubetune.training.checkpoint) go to <store>/runs/<run_id>/checkpoints/finetune/ every
`checkpoint_steps` optimizer steps and after every epoch; the same command re-run after a crash
resumes from the last one and ends with the same weights as an uninterrupted run.

`--peft lora` trains LoRA adapters (and the new classification head) only; they are merged into
the base model before saving, so evaluate and export see a plain transformers model.

Output: a transformers model folder (config.json with id2label/label2id, model.safetensors, the
tokenizer files) and training.json (per-epoch history, best epoch, throughput). `--publish KEY`
also publishes that folder to <store>/KEY (used by the distributed job on Kubernetes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kubetune import tasks
from kubetune.core.config import add_config_args, config_from_args, opt, param, shared
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import Progress, log
from kubetune.core.system import resolve_cpu_kernels, usable_cpus
from kubetune.errors import ConfigError
from kubetune.storage.contracts import ModelInputs, TokensMeta
from kubetune.storage.shards import length_grouped_batches, load_split
from kubetune.storage.space import parameter_bytes, writing
from kubetune.storage.store import fetch, join
from kubetune.training.checkpoint import Checkpoints, check_compatible
from kubetune.training.modeling import (
    DeviceSplit,
    TorchBackend,
    add_lora,
    load_classifier,
    load_trainable,
    param_groups,
    pick_device,
    resolve_model_dir,
    trainable_state,
)
from kubetune.training.parallel import World, barrier, gather, process_group, shard_batches
from kubetune.training.trainer_status import TrainerStatus

STEP = "finetune"
PEFT_METHODS = ("none", "lora")
# settings that do not change the trained weights: a checkpoint may be resumed with other values
RUN_ONLY = ("device", "cpu_threads", "eval_batch_size", "checkpoint_steps", "resume", "compile", "keep_checkpoints")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = param(0, "Training epochs; 0 = chosen from the data size (1 epoch when it has >= the task's minimum of optimizer "
                           "steps, else enough epochs for that minimum, capped: classification 100 steps, at most 10 epochs; NER "
                           "400, at most 30). The best epoch on eval is kept; early stopping after 2 without gain.")
    # per process; the effective batch is batch_size x grad_accum_steps x processes
    batch_size: int = param(32, "Training batch size.")
    learning_rate: float = param(1e-4, "Peak AdamW learning rate (linear warm-up over 10% of steps, then linear decay).")
    weight_decay: float = opt(0.01, "AdamW weight decay (biases and LayerNorm weights get none).")
    warmup_ratio: float = opt(0.1, "Share of the optimizer steps with a linear learning-rate warm-up.")
    max_grad_norm: float = opt(1.0, "Gradients are clipped to this global norm before each optimizer step.")
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step: a big effective batch in little memory.")
    early_stopping_patience: int = opt(2, "Stop after this many epochs without an eval gain in the selection metric.")
    selection_metric: str = opt("", "Eval metric that picks the best epoch and drives early stopping; empty: the task's default.")
    seed: int = shared("seed", 0, "Seed of the new head's initialisation, dropout and the batch order (the pipeline passes "
                                  "its seed parameter).")
    device: str = opt("auto", "Torch device: auto (cuda when available), cpu or cuda.")
    eval_batch_size: int = opt(128, "Rows per batch when scoring the eval split after each epoch.")
    cpu_threads: int = opt(0, "Torch CPU threads; 0: every core this process may use (split between local DDP processes).")
    pad_multiple: int = opt(8, "Batch widths are rounded up to a multiple of this: fewer distinct shapes, little pad compute.")
    compile: bool = opt(False, "torch.compile the model (pays off on long runs of a big model only).")
    checkpoint_steps: int = opt(200, "Also checkpoint to the store every N optimizer steps; 0: only after each epoch.")
    resume: bool = opt(True, "Resume from this run's checkpoint in the store when one exists.")
    keep_checkpoints: bool = param(False, "Keep the optimizer checkpoints in the store after a successful fine-tune "
                                          "(they only serve to resume a run that failed; hundreds of MB each).")
    peft: str = opt("none", "Parameter-efficient fine-tuning: none (every weight trains) or lora (adapters and the head only; "
                            "merged into the saved model).")
    lora_rank: int = opt(8, "LoRA: rank of the adapter matrices.")
    lora_alpha: int = opt(16, "LoRA: scaling alpha (updates are scaled by alpha / rank).")
    lora_dropout: float = opt(0.1, "LoRA: dropout on the adapters' input.")
    lora_target_modules: str = opt("", "LoRA: comma-separated names of the linear modules that get adapters; empty: peft's "
                                       "default for the architecture.")

    def check(self) -> None:
        problems = []
        if self.epochs < 0:
            problems.append(f"epochs={self.epochs}: train at least 1 epoch (0: chosen from the data size)")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append("batch sizes must be >= 1")
        if self.grad_accum_steps < 1:
            problems.append(f"grad_accum_steps={self.grad_accum_steps}: must be >= 1")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate={self.learning_rate}: expected something like 2e-5 .. 2e-4")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        known = tasks.all_metrics()
        if self.selection_metric and self.selection_metric not in known:
            problems.append(f"selection_metric={self.selection_metric!r}: use one of {', '.join(known)} (empty: the task's default)")
        if self.pad_multiple < 1 or self.checkpoint_steps < 0:
            problems.append("pad_multiple must be >= 1 and checkpoint_steps >= 0")
        if self.peft not in PEFT_METHODS:
            problems.append(f"peft={self.peft!r}: use one of {', '.join(PEFT_METHODS)}")
        elif self.peft == "lora" and (self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            problems.append(f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}: "
                            "need rank >= 1, alpha > 0, dropout in [0, 1)")
        if problems:
            raise ConfigError("; ".join(problems))


def auto_epochs(steps_per_epoch: int, requested: int, task) -> tuple[int, str]:
    """(epochs, why): `requested` when set (> 0); else the fewest epochs that give the task's
    `auto_min_steps` optimizer steps, capped at its `auto_max_epochs` (kubetune.tasks.base.TaskHead;
    the best epoch is kept and early stopping still applies)."""
    if requested > 0:
        return requested, "set by --epochs"
    least = task.auto_min_steps
    epochs = min(max(-(-least // max(steps_per_epoch, 1)), 1), task.auto_max_epochs)
    if epochs == 1:
        return 1, f"auto: {steps_per_epoch} steps per epoch >= {least}"
    capped = " (capped)" if epochs * steps_per_epoch < least else ""
    return epochs, f"auto: {steps_per_epoch} steps per epoch < {least}, so {epochs} epochs = {epochs * steps_per_epoch} steps{capped}"


def forward_loss(model, batch: dict, autocast, loss):
    """Loss of one batch; `loss(logits, labels, inputs)` is the task's."""
    with autocast:
        logits = model(**batch["inputs"]).logits
    return loss(logits, batch["labels"], batch["inputs"])


def eval_scores(model, split, labels: list[str], inputs: ModelInputs, cfg: FinetuneConfig, device, task) -> dict:
    """The task's metrics of `model` on the eval split (every metric the selection may use)."""
    return task.scores(TorchBackend(model, inputs, device).logits(split, cfg.eval_batch_size, task.per_token), split, labels)


def out_of_memory(e: BaseException, cfg: FinetuneConfig, device) -> ConfigError | None:
    import torch

    cpu_oom = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or cpu_oom):
        return None
    half = max(cfg.batch_size // 2, 1)
    return ConfigError(f"out of {'GPU' if device.type == 'cuda' else 'host'} memory at batch_size={cfg.batch_size}: use "
                       f"--batch-size {half} --grad-accum-steps {cfg.grad_accum_steps * 2} (same effective batch), "
                       "a shorter max_length, or --peft lora")


@dataclass
class TrainProgress:
    """Where training is: what a checkpoint stores besides tensors (plain numbers and lists)."""

    epoch: int = 1  # the epoch being trained (epochs + 1 when all are done)
    step: int = 0  # optimizer steps done in that epoch (the sampler position)
    loss_sum: float = 0.0  # train loss summed over the epoch's micro-batches so far
    micro: int = 0
    stopped: bool = False  # early stopping ended the run
    train_seconds: float = 0.0
    real_tokens: int = 0
    rows: int = 0
    best: float | None = None
    best_epoch: int = 0
    stale: int = 0
    history: list = field(default_factory=list)


class FinetuneRun:
    """One training run: model, optimizer, data on the device, and the loop over epochs."""

    def __init__(self, tokens_dir: Path, model_dir: Path, cfg: FinetuneConfig, device, world: World):
        import torch
        from transformers import get_linear_schedule_with_warmup, set_seed

        self.cfg, self.device, self.world = cfg, device, world
        if device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads or max(usable_cpus() // world.local_size, 1))
            resolve_cpu_kernels()  # before the first multi-threaded op: see its docstring (bit-exact resume)
        set_seed(cfg.seed)  # python, numpy and torch: the head's init repeats

        self.meta = TokensMeta.read(tokens_dir)
        self.labels, self.names = self.meta.labels, list(self.meta.inputs.input_names)
        self.task = tasks.get(self.meta.task)
        self.selection = tasks.resolve_metric(self.task.name, cfg.selection_metric, "selection_metric")
        train = load_split(tokens_dir, "train")
        self.evals = load_split(tokens_dir, "eval")
        self.train_rows = len(train)
        self.train = DeviceSplit(train, self.meta.inputs.pad_token_id, device, cfg.pad_multiple, sep_id=self.meta.inputs.sep_token_id)
        batches = len(shard_batches(length_grouped_batches(train.lengths, cfg.batch_size, np.random.default_rng(0)), world))
        self.steps_per_epoch = -(-batches // cfg.grad_accum_steps)
        self.epochs, self.epochs_reason = auto_epochs(self.steps_per_epoch, cfg.epochs, self.task)
        # epochs chosen from the data size: no early stop before half the minimum steps (--epochs N: the plain rule)
        self.min_steps_before_stop = self.task.auto_min_steps // 2 if cfg.epochs == 0 else 0
        total_steps = self.steps_per_epoch * self.epochs

        self.core = load_classifier(model_dir, self.labels, self.task)
        if cfg.peft == "lora":
            self.core = add_lora(self.core, cfg, self.task)
        self.core.to(device)
        self.model = self.core
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.core, device_ids=[device.index] if device.type == "cuda" else None)
            torch.manual_seed(cfg.seed * 1000 + world.rank)  # different dropout on every rank
        if cfg.compile:
            self.model = torch.compile(self.model, dynamic=True)
        # one kernel for the whole update (CUDA; also CPU in torch >= 2.4)
        self.optimizer = torch.optim.AdamW(param_groups(self.core, cfg.weight_decay), lr=cfg.learning_rate, fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.state = TrainProgress()
        self.on_epoch = None  # (epoch, model) -> None after each epoch's eval
        self.status: TrainerStatus | None = None  # where progress is reported (finetune(): a TrainJob's rank 0)
        self.clock = (time.perf_counter(), 0)  # (when, steps done then): the ETA's rate counts this process's steps only
        self.best_state: dict | None = None
        self.loss_sum = torch.zeros((), device=device)
        config_hash = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:16]
        self.fingerprint = {"labels": self.labels, "world_size": world.size, "train_rows": self.train_rows,
                            "train_tokens": int(train.tokens.sum()), "model_config": config_hash,
                            **{k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}}

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        import torch

        self.state.loss_sum = float(self.loss_sum.item())  # the one host sync, only when checkpointing
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"fingerprint": self.fingerprint, "progress": asdict(self.state), "weights": trainable_state(self.core),
                "best_weights": self.best_state, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": gather(self.world, rng)}

    def restore(self, saved: dict, url: str) -> None:
        import torch

        check_compatible(saved, self.fingerprint, url)
        load_trainable(self.core, saved["weights"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainProgress(**saved["progress"])
        self.best_state = saved["best_weights"]
        self.loss_sum = torch.tensor(self.state.loss_sum, device=self.device)
        rng = saved["rng"][self.world.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # ---- training ------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[tuple]:
        """This rank's micro-batches of `epoch`: (row index on the data's device, padded width, real tokens).
        The order depends only on (seed, epoch), so a resumed run replays it exactly."""
        import torch

        rng = np.random.default_rng([self.cfg.seed, epoch])
        batches = shard_batches(length_grouped_batches(self.train.lengths, self.cfg.batch_size, rng), self.world)
        flat = torch.from_numpy(np.concatenate(batches)).to(self.train.home)  # one copy for the whole epoch
        out, start = [], 0
        for b in batches:
            out.append((flat[start:start + len(b)], self.train.width(b), int(self.train.tokens[b].sum())))
            start += len(b)
        return out

    def train_epoch(self, epoch: int, save) -> None:
        import torch

        cfg, st = self.cfg, self.state
        self.model.train()
        plan = self.plan(epoch)
        progress = Progress(STEP, self.steps_per_epoch, "steps", label=f"epoch {epoch}/{self.epochs}")
        progress.done = st.step
        t0 = time.perf_counter()
        for step in range(st.step, self.steps_per_epoch):
            micro = plan[step * cfg.grad_accum_steps:(step + 1) * cfg.grad_accum_steps]
            for j, (index, width, tokens) in enumerate(micro):
                # DDP: all-reduce gradients on the last micro-batch of a step only
                sync = j == len(micro) - 1 or not self.world.distributed
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    loss = forward_loss(self.model, self.train.batch(index, width, self.names), self.autocast, self.task.loss)
                    (loss / len(micro)).backward()
                self.loss_sum += loss.detach()
                st.micro += 1
                st.real_tokens += tokens
                st.rows += len(index)
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), cfg.max_grad_norm, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            st.step = step + 1
            # .item() waits for the GPU: only when a progress line is due
            progress.update(1, **({"loss": self.loss_sum.item() / st.micro} if progress.due() else {}))
            if self.status is not None and self.status.due():
                self.report_status(epoch, {"loss": self.loss_sum.item() / st.micro})
            if cfg.checkpoint_steps and self.scheduler.last_epoch % cfg.checkpoint_steps == 0 and st.step < self.steps_per_epoch:
                st.train_seconds += self._elapsed(t0)
                save(f"epoch {epoch} step {st.step}/{self.steps_per_epoch}")
                t0 = time.perf_counter()
        st.train_seconds += self._elapsed(t0)

    def report_status(self, epoch: int, metrics: dict, force: bool = False) -> None:
        """Progress, ETA and `metrics` to the TrainJob's status (kubetune.training.trainer_status)."""
        total = self.epochs * self.steps_per_epoch
        done = min((epoch - 1) * self.steps_per_epoch + self.state.step, total)
        since, start = self.clock
        rate = (done - start) / max(time.perf_counter() - since, 1e-9)
        self.status.report(100 * done / max(total, 1), (total - done) / rate if rate > 0 else None,
                           {"epoch": epoch, "step": done, **metrics}, force=force)

    def _elapsed(self, t0: float) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def end_epoch(self, epoch: int) -> None:
        """Scores the eval split, keeps the best weights, decides early stopping, moves to the next epoch."""
        import torch

        cfg, st = self.cfg, self.state
        scores = eval_scores(self.core, self.evals, self.labels, self.meta.inputs, cfg, self.device, self.task)
        value = scores[self.selection]
        shown = self.task.headline
        st.history.append({"epoch": epoch, "train_loss": round(float(self.loss_sum.item()) / max(st.micro, 1), 5),
                           **{f"eval_{k}": scores[k] for k in shown}, f"eval_{self.selection}": value})
        log(STEP, f"epoch {epoch}: train loss {st.history[-1]['train_loss']:.4f}, " + ", ".join(f"eval {k} {scores[k]:.4f}" for k in shown))
        if self.on_epoch is not None:
            self.on_epoch(epoch, self.core)
        if self.status is not None:  # every epoch's end, whatever the throttle: its eval score is what a watcher waits for
            self.report_status(epoch, {"train_loss": st.history[-1]["train_loss"], f"eval_{self.selection}": value}, force=True)
        if st.best is None or value > st.best:
            # keep the best weights on the host: nothing is written twice
            st.best, st.best_epoch, st.stale, self.best_state = value, epoch, 0, trainable_state(self.core)
        elif epoch * self.steps_per_epoch < self.min_steps_before_stop:
            pass  # still too few steps to judge: a small split may score one class for several epochs before it learns
        else:
            st.stale += 1
            if st.stale >= cfg.early_stopping_patience:
                log(STEP, f"early stop: no eval {self.selection} gain for {st.stale} epoch(s)")
                st.stopped = True
        st.epoch, st.step, st.micro = epoch + 1, 0, 0
        self.loss_sum = torch.zeros((), device=self.device)

    def fit(self, checkpoints: Checkpoints | None) -> dict | None:
        """Trains the remaining epochs; returns where it resumed from (None for a fresh start)."""
        cfg, world = self.cfg, self.world
        resumed = None
        if checkpoints is not None and cfg.resume:
            saved = checkpoints.load()
            if saved is not None:
                self.restore(saved, checkpoints.url)  # replaces self.state: read it only after this
                st = self.state
                resumed = {"epoch": st.epoch, "step": st.step, "checkpoint": checkpoints.url}
                log(STEP, f"resumed from checkpoint {checkpoints.url}: epoch {st.epoch}, step {st.step}/{self.steps_per_epoch}"
                          + (" (training had finished)" if st.stopped or st.epoch > self.epochs else ""))
        st = self.state
        self.clock = (time.perf_counter(), (st.epoch - 1) * self.steps_per_epoch + st.step)  # a resumed run's rate starts here

        def save(where: str) -> None:
            if checkpoints is None:
                return
            state = self.checkpoint_state()  # every rank: the RNG states are gathered
            if world.main:
                checkpoints.save(state)
                log(STEP, f"checkpoint saved ({where}) to {checkpoints.url}")
            barrier(world)

        while st.epoch <= self.epochs and not st.stopped:
            epoch = st.epoch
            self.train_epoch(epoch, save)
            self.end_epoch(epoch)
            save(f"end of epoch {epoch}")
        return resumed

    def save_model(self, tokens_dir: Path, out_dir: Path) -> None:
        """The best epoch's weights as a plain transformers model (LoRA merged into the base)."""
        load_trainable(self.core, self.best_state)
        model = self.core.merge_and_unload() if self.cfg.peft == "lora" else self.core
        out_dir.mkdir(parents=True, exist_ok=True)
        with writing(out_dir, "the fine-tuned model (safetensors)", parameter_bytes(model)):
            model.save_pretrained(out_dir)  # safetensors
        shutil.copytree(tokens_dir / "tokenizer", out_dir, dirs_exist_ok=True)


def finetune(tokens_dir: Path, model_dir: Path, out_dir: Path, cfg: FinetuneConfig, *,
             checkpoints: Checkpoints | None = None, world: World | None = None, on_epoch=None) -> dict:
    """Train, keep the best epoch by eval `selection_metric`, save it. `on_epoch(epoch, model)`, when
    given, runs after each epoch's eval (benchmarks use it to log more than the pipeline needs)."""
    import torch

    cfg.check()
    world = world or World()
    device = pick_device(cfg.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    with process_group(world, device):
        run = FinetuneRun(tokens_dir, model_dir, cfg, device, world)
        run.on_epoch = on_epoch
        # in a TrainJob whose Trainer has the progress plugin on, rank 0 reports there; elsewhere None
        run.status = TrainerStatus.from_env(rank=world.rank, step=STEP)
        trainable = sum(p.numel() for p in run.core.parameters() if p.requires_grad)
        total = sum(p.numel() for p in run.core.parameters())
        log(STEP, f"epochs: {run.epochs} ({run.epochs_reason})")
        log(STEP, f"device {device}, {run.train_rows} train / {len(run.evals)} eval rows, {run.epochs} epoch(s) x "
                  f"{run.steps_per_epoch} steps, batch {cfg.batch_size}" + (f" x {world.size} processes" if world.distributed else "")
                  + f", lr {cfg.learning_rate}, trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
                  + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""))
        padded = f"train split padded to its longest row: {run.train.padded_bytes / 2**20:,.0f} MB"
        log(STEP, f"{padded}, kept on {device}: a batch is a gather there" if run.train.resident else
                  f"{padded} > {run.train.max_bytes / 2**20:,.0f} MB: kept unpadded "
                  f"({run.train.tokens.sum() * 4 / 2**20:,.0f} MB of token ids, "
                  f"{'on disk' if run.train.on_disk else 'in host memory'}), each batch padded when drawn")
        try:
            resumed = run.fit(checkpoints)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            oom = out_of_memory(e, cfg, device)
            if oom is None:
                raise
            raise oom from None
        st = run.state
        result = {
            "device": str(device),
            "processes": world.size,
            "best_epoch": st.best_epoch,
            "task": run.task.name,
            "selection_metric": run.selection,
            f"best_eval_{run.selection}": st.best,
            "epochs": run.epochs,
            "epochs_reason": run.epochs_reason,
            "steps_per_epoch": run.steps_per_epoch,
            "epochs_run": len(st.history),
            "history": st.history,
            "resumed_from": resumed,
            "train_seconds": round(st.train_seconds, 2),
            "train_samples_per_s": round(st.rows * world.size / max(st.train_seconds, 1e-9), 1),
            "train_tokens_per_s": round(st.real_tokens * world.size / max(st.train_seconds, 1e-9), 1),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "labels": run.labels,
            "config": asdict(cfg),
        }
        if world.main:
            run.save_model(tokens_dir, out_dir)
            (out_dir / "training.json").write_text(json.dumps(result, indent=2))
        barrier(world)
    log(STEP, f"best epoch {st.best_epoch}: eval {run.selection} {st.best:.4f}; {result['train_samples_per_s']} samples/s")
    return result


def run_step(*, store_uri: str, run_id: str, tokens_dir: Path | str, model_uri: str, out_dir: Path, cfg: FinetuneConfig,
             world: World | None = None, publish: str = "") -> dict:
    """The step as the pipeline runs it: records (main process only), checkpoints in the store,
    inputs fetched from the store when they are s3:// URIs, the output optionally published."""
    world = world or World()
    with step_context(STEP, store_uri=store_uri, run_id=run_id, config={"model": model_uri, **asdict(cfg)}, record=world.main) as ctx:
        checkpoints = Checkpoints(ctx.store, ctx.record.key("checkpoints", STEP))
        tokens_dir = fetch(str(tokens_dir), ctx.settings, ctx.tmp("tokens"))
        model_dir = resolve_model_dir(model_uri, ctx.settings, ctx.tmp("model"))
        result = finetune(tokens_dir, model_dir, out_dir, cfg, checkpoints=checkpoints, world=world)
        if world.main and not cfg.keep_checkpoints:
            removed = checkpoints.delete()  # the model is saved: nothing is left to resume
            if removed:
                log(STEP, f"removed the checkpoint {checkpoints.url} (--keep-checkpoints keeps it)")
        if world.main and publish:
            ctx.store.publish_dir(out_dir, join(publish))
            log(STEP, f"published the model to {ctx.store.url(join(publish))}")
        ctx.outputs.update({k: result[k] for k in ("device", "processes", "epochs", "epochs_reason", "best_epoch", "epochs_run", "train_seconds",
                                                   "train_samples_per_s", "history", "resumed_from")})
    return result


def build_parser():
    p = step_parser("kubetune.steps.finetune", __doc__)
    p.add_argument("--tokens", required=True, help="tokenize's output folder (local, or an s3:// published prefix)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--publish", default="", help="also publish the model folder to this key of the store")
    add_config_args(p, FinetuneConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, tokens_dir=a.tokens, model_uri=a.model,
                                     out_dir=a.out, cfg=config_from_args(FinetuneConfig, a), world=World.from_env(),
                                     publish=a.publish))


if __name__ == "__main__":
    sys.exit(main())
