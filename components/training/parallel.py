"""Multi-process data parallelism (DDP) for the fine-tune step, launched by `torchrun`.

    torchrun --nproc-per-node 2 -m kubetune.steps.finetune --tokens /tmp/kt/tokens \
        --model builtin:all-minilm-l6-v2 --out /tmp/kt/model --store ./kubetune-store --run-id dev

torchrun (and the Kubeflow Training Operator / Trainer, which run torchrun in every worker pod) sets
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `World.from_env` reads
them in the entry point, and the step code gets a `World` value (one process when they are unset).
Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

from kubetune.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "World":
        env = os.environ if environ is None else environ
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            world = cls(rank=int(env.get("RANK", "0")), size=size, local_rank=int(env.get("LOCAL_RANK", "0")),
                        local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))))
        except ValueError as e:
            raise ConfigError(f"torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
        if not 0 <= world.rank < world.size:
            raise ConfigError(f"RANK={world.rank} is outside WORLD_SIZE={world.size}")
        return world

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes outputs, records and checkpoints."""
        return self.rank == 0


@contextlib.contextmanager
def process_group(world: World, device) -> Iterator[None]:
    """Joins the torchrun process group for the duration of the step (no-op for one process)."""
    if not world.distributed:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather(world: World, obj) -> list:
    """`obj` from every rank, in rank order (a list of one for a single process)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def shard_batches(batches: list, world: World) -> list:
    """This rank's share of an epoch's batches. Every rank must take the same number of steps (a
    rank that stops early leaves the others waiting in all-reduce), so the list is first extended
    by wrapping around to a multiple of the world size."""
    if not world.distributed:
        return batches
    extra = (-len(batches)) % world.size
    batches = batches + batches[:extra]
    return batches[world.rank::world.size]
