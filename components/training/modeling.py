"""Torch-side helpers shared by finetune, evaluate and export: where the model comes from, which
device runs it, device-resident training batches, batched prediction over token shards (the torch
backend of kubetune.tasks.predictor), and the model being fine-tuned (built with its head, wrapped
for LoRA, its trainable state saved and restored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kubetune.core.progress import log
from kubetune.errors import ConfigError, InputError
from kubetune.storage import assets
from kubetune.storage.shards import IGNORE, DiskArray, TokenizedSplit, logit_rows, logit_width, pad_batch, place_logits, sorted_batches, token_types
from kubetune.storage.store import S3Settings, fetch


def resolve_model_dir(uri: str, settings: S3Settings | None, workdir: Path) -> Path:
    """A local transformers model folder for `builtin:<name>`, a local path or an s3:// prefix."""
    path = assets.resolve(uri)[0] if assets.is_builtin(uri) else fetch(uri, settings, workdir)
    if not (path / "config.json").is_file():
        raise InputError(f"model {uri}: {path} is not a transformers model folder (no config.json)")
    return path


def pick_device(requested: str):
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={requested!r}: use auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but torch sees no CUDA device; use --device auto or cpu, "
                          "or run the step in the CUDA trainer image on a GPU node")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def batch_inputs(split: TokenizedSplit, index: np.ndarray, pad_id: int, input_names: list[str], device,
                 sep_id: int | None = None) -> dict:
    """Model keyword arguments for rows `index`: input_ids, attention_mask and, for models that take
    them (BERT), token_type_ids: all zeros for single texts, the second segment after the first
    [SEP] when `sep_id` is given (text pairs, kubetune.storage.shards.token_types)."""
    import torch

    ids, mask = pad_batch(split, index, pad_id)
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if "token_type_ids" in input_names:
        out["token_type_ids"] = torch.from_numpy(token_types(ids, mask, sep_id))
    # non_blocking: the copy overlaps with the host work of building the next batch
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def predict_logits(model, split: TokenizedSplit, *, per_token: bool = False, batch_size: int, pad_id: int, input_names: list[str],
                   device, sep_id: int | None = None) -> np.ndarray:
    """float32 logits in row order: [rows, labels], or with `per_token` every real token's logits end
    to end, [tokens, labels], row i at split.offsets[i]:split.offsets[i + 1] (token classification)."""
    import torch

    model.eval()
    out = np.zeros((logit_rows(split, per_token), logit_width(split, model.config.num_labels)), dtype=np.float32)
    with torch.inference_mode():
        for index in sorted_batches(split.lengths, batch_size):
            logits = model(**batch_inputs(split, index, pad_id, input_names, device, sep_id)).logits.float().cpu().numpy()
            place_logits(out, split, index, logits, per_token)
    return out


class TorchBackend:
    """Logits from a torch model (kubetune.tasks.predictor.Backend): evaluate's reference profile
    predicts through the same path as serving and batch inference, on the fine-tuned model."""

    def __init__(self, model, inputs, device):
        self.model, self.inputs, self.device = model, inputs, device  # inputs: kubetune.storage.contracts.ModelInputs

    def logits(self, split: TokenizedSplit, batch_size: int = 64, per_token: bool = False) -> np.ndarray:
        return predict_logits(self.model, split, per_token=per_token, batch_size=batch_size, pad_id=self.inputs.pad_token_id,
                              input_names=list(self.inputs.input_names), device=self.device, sep_id=self.inputs.sep_token_id)


DEVICE_SPLIT_BYTES = 2 << 30  # the largest training split (padded, int32) kept on an accelerator
# on the CPU the gather saves only the per-batch padding, a small part of a step there, so a split is
# kept padded only while that is small: host memory stays flat in the data's size
CPU_SPLIT_BYTES = 256 << 20


class DeviceSplit:
    """A training split padded once to its longest row and kept on the training device, so a batch
    is a gather on the device: no host collate and no host-to-device copy per step, which is what
    keeps a small model from being launch/host-bound on a fast GPU. A split whose padded ids would
    take more than `max_bytes` stays unpadded in host memory (4 bytes a token, not a row's padded
    width) and each batch is padded when it is drawn, then copied to the device (`resident` says
    which; the fine-tune logs it). A split over shards.MMAP_BYTES of ids arrives on disk (`on_disk`):
    host memory then holds its offsets and labels, 16 bytes a row, and a batch reads only its rows."""

    def __init__(self, split: TokenizedSplit, pad_id: int, device, pad_multiple: int = 16, max_bytes: int | None = None,
                 sep_id: int | None = None):
        import torch

        self.sep_id = sep_id  # text pairs: token_type_ids 1 after the first [SEP] (see batch_inputs)
        lengths, seq_lengths = split.lengths, np.diff(split.offsets)
        width = int(-(-max(int(lengths.max()), 1) // pad_multiple) * pad_multiple)
        self.device, self.pad_multiple, self.pad_id = device, pad_multiple, pad_id
        self.lengths, self.tokens = lengths.astype(np.int32), split.tokens.astype(np.int32)  # per row: 4 bytes will do
        self.token_level = split.token_labels is not None
        budget = CPU_SPLIT_BYTES if getattr(device, "type", device) == "cpu" else DEVICE_SPLIT_BYTES
        self.padded_bytes, self.max_bytes = len(seq_lengths) * width * 4, budget if max_bytes is None else max_bytes
        self.resident = self.padded_bytes <= self.max_bytes
        self.on_disk = isinstance(split.ids, DiskArray)  # a big split's ids stay on disk (kubetune.storage.shards.load_split)
        if not self.resident:  # per-row lengths computed once here, not per batch (split.seq_lengths diffs every offset)
            self.split, self.home, self.host_lengths = split, torch.device("cpu"), split.seq_lengths.astype(np.int32)
            return
        ids = np.full((len(seq_lengths), width), pad_id, dtype=np.int32)
        ids[np.arange(width) < seq_lengths[:, None]] = split.ids  # sequences are stored end to end, row-major
        if split.choices > 1:  # multiple choice: [rows, choices, width], a row's choices together
            ids = ids.reshape(len(split), split.choices, width)
        self.ids = torch.from_numpy(ids).to(device)
        self.row_lengths = torch.from_numpy(split.seq_lengths.astype(np.int64)).to(device)
        labels = split.labels
        if self.token_level:  # token classification: a label per token, IGNORE on padding
            labels = np.full((len(split), width), IGNORE, dtype=np.int64)
            labels[np.arange(width) < lengths[:, None]] = split.token_labels
        self.labels = torch.from_numpy(labels).to(device)
        self.home = device

    def width(self, index: np.ndarray) -> int:
        """Padded width of a batch, from the host-side lengths (no device sync)."""
        return int(-(-int(self.lengths[index].max()) // self.pad_multiple) * self.pad_multiple)

    def batch(self, index, width: int, input_names: list[str]) -> dict:
        """{"inputs": model kwargs, "labels": targets} for the rows in `index` (a tensor on the
        split's home device), padded to `width`."""
        import torch

        ids, row_lengths, labels = self._rows(index, width)
        mask = (torch.arange(width, device=ids.device) < row_lengths[..., None]).long()
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in input_names:
            if self.sep_id is None:
                inputs["token_type_ids"] = torch.zeros_like(ids)
            else:  # as kubetune.storage.shards.token_types, on the device
                sep = (ids == self.sep_id).long()
                inputs["token_type_ids"] = ((sep.cumsum(-1) - sep) > 0).long() * mask
        if self.home != self.device:
            return {"inputs": {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()},
                    "labels": labels.to(self.device, non_blocking=True)}
        return {"inputs": inputs, "labels": labels}

    def _rows(self, index, width: int):
        """(ids, row lengths, labels) of rows `index`, padded to `width`: gathered on the device, or
        padded from the host split now."""
        import torch

        if self.resident:
            return (self.ids[index, ..., :width].long(), self.row_lengths[index],
                    self.labels[index, :width] if self.token_level else self.labels[index])
        rows = index.numpy()
        ids, _ = pad_batch(self.split, rows, self.pad_id, width=width)
        labels = _token_labels(self.split, rows, width) if self.token_level else self.split.labels[rows]
        return torch.from_numpy(ids), torch.from_numpy(self.host_lengths[rows]), torch.from_numpy(labels)


def _token_labels(split: TokenizedSplit, rows: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] per-token labels of rows `rows`, IGNORE on padding."""
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for j, i in enumerate(rows):
        row = split.row_labels(i)
        labels[j, :len(row)] = row
    return labels


# ---- the model being fine-tuned: built, wrapped for LoRA, its trainable state saved and restored ----


def load_classifier(model_dir: Path, labels: list[str], task):
    """The pretrained encoder with a classification head for `labels` (a new head when the
    checkpoint has none or one of another size)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report is replaced by the one line below
    hf_logging.disable_progress_bar()  # tqdm bars with carriage returns garble pod logs
    try:
        model, info = task.model_class().from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"model {model_dir}: not a transformers model that can {task.model_purpose} ({e})") from None
    fresh = sorted(set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])})
    if fresh:
        log("finetune", f"new classification head for {len(labels)} labels ({len(fresh)} tensors initialised)")
    return model


def add_lora(model, cfg, task):
    """Wraps `model` so that only LoRA adapters and the classification head train (peft's task type
    of the task decides which head that is); `cfg`: the lora_* fields of kubetune.steps.finetune.FinetuneConfig."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] or None
    # a head peft has no task type for (multiple choice) is kept trainable by name instead (those of its
    # modules the model trains at all: a frozen one would get no gradient, which DDP rejects)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters())}
    kind = ({"task_type": TaskType[task.peft_task_type]} if task.peft_task_type else
            {"modules_to_save": [m for m in task.head_modules if m in names]})
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, **kind)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules!r}: {e}; this model's linear layers are named "
                          f"{', '.join(names)}") from None


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable_state(model) -> dict:
    """Host copies of the trainable parameters: all of them for a full fine-tune, the adapters and
    head for LoRA. This is what checkpoints and the best epoch keep (frozen weights never change)."""
    return {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"saved weights do not fit this model (unexpected {result.unexpected_keys[:5]}); "
                          "use a new run id or --resume false")
