"""Training checkpoints in the store, so a fine-tune killed with its node resumes where it was.

One object per run, `runs/<run_id>/checkpoints/finetune/state.pt` (torch.save of plain tensors and
numbers, loaded with weights_only=True): the trainable weights, the optimizer and scheduler, the
sampler position (epoch, optimizer step within it), every rank's torch RNG state, the per-epoch
history and the best epoch's trainable weights. It is replaced as a whole, atomically (a rename on
a local store, one PUT or completed multipart upload on S3), so a reader sees the previous
checkpoint or the new one, never a torn file.

A checkpoint is only resumed by a run with the same training settings and data: `fingerprint`
holds them, and a mismatch is an error naming the settings, never a silent fresh start.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from kubetune.errors import ConfigError
from kubetune.storage.space import tensor_bytes, writing
from kubetune.storage.store import Store, join

KEY = "state.pt"


class Checkpoints:
    def __init__(self, store: Store, prefix: str):
        self.store, self.prefix = store, prefix
        self.key = join(prefix, KEY)

    @property
    def url(self) -> str:
        return self.store.url(self.key)

    def save(self, state: dict[str, Any]) -> None:
        import torch

        with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-") as tmp:
            path = Path(tmp) / KEY
            with writing(path, f"the training checkpoint {KEY}", tensor_bytes(state)):
                torch.save(state, path)
            self.store.upload(path, self.key)

    def delete(self) -> int:
        """Remove this run's checkpoint; how many objects went."""
        return self.store.delete_prefix(self.prefix)

    def load(self) -> dict[str, Any] | None:
        import torch

        if not self.store.exists(self.key):
            return None
        with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-") as tmp:
            path = Path(tmp) / KEY
            self.store.download(self.key, path)
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a foreign or corrupt file: say which, and how to start over
                raise ConfigError(f"checkpoint {self.url} cannot be read ({e}); delete it or pass --resume false") from None


def check_compatible(saved: dict[str, Any], fingerprint: dict[str, Any], url: str) -> None:
    """Raises a ConfigError naming every setting in which the checkpoint differs from this run."""
    old = saved.get("fingerprint", {})
    if old.get("labels") != fingerprint["labels"]:
        raise ConfigError(
            f"checkpoint {url} was trained for {len(old.get('labels') or [])} labels {old.get('labels')}, but these tokens "
            f"have {len(fingerprint['labels'])} labels {fingerprint['labels']}: use a new run id, or --resume false to start over")
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {url} comes from other settings ({'; '.join(diff)}): re-run with the same "
                          "settings to resume, or use a new run id / --resume false to start over")
