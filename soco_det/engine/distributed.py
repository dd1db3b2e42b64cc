"""Process-group set-up from the torchrun environment, and a sampler that resumes exactly.

``init_distributed`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set by ``torchrun`` and joins
the ``env://`` group (NCCL on CUDA, Gloo on CPU); without them it is a no-op, and ``rank()`` /
``world_size()`` answer 0 / 1, so single-process code needs no special case.

BatchNorm across processes: with ``model.sync_bn=true`` the model's BN layers are synchronised (as in
the official runs) by :mod:`soco_det.models.segment_bn` over ``torch.distributed``, so on CPU (gloo)
as well as CUDA (NCCL), with the per-call statistics of the official SyncBatchNorm also inside
batched calls; then a 2-process run equals one process over the same global batch. Without it each
process keeps its own BN statistics; ``train.loop.freeze_bn=true`` (running statistics) also makes the
result independent of how the global batch is split.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from soco_det.logs import get_logger

log = get_logger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device_type: str) -> torch.device:
    """Join the torchrun process group if there is one; return this process's device."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
        device = torch.device("cuda", local_rank())
    else:
        device = torch.device("cpu")
    if launched_by_torchrun() and not is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=30))
        log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return device


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes (in place; the identity without a process group)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A DistributedSampler-like sampler that can start in the middle of an epoch.

    Each epoch draws one permutation of ``range(n)`` from ``seed + epoch`` (the same on every
    process), drops the tail that does not divide evenly, and gives process ``r`` the indices
    ``perm[r::world]``. ``position`` counts the samples this process has consumed in the current
    epoch; iteration starts there. The state stores the *global* position, so a run resumed with a
    different number of processes continues at the same point of the permutation (as far as it
    divides).
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.n, self.num_replicas, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.epoch = 0
        self.position = 0

    @property
    def per_replica(self) -> int:
        return self.n // self.num_replicas

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def indices(self) -> list[int]:
        """This process's whole index list for the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        perm = perm[: self.per_replica * self.num_replicas]
        return perm[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.position :])

    def __len__(self) -> int:
        return self.per_replica - self.position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_position": self.position * self.num_replicas, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning("sampler seed changed from %s to %s on resume", state["seed"], self.seed)
        self.epoch = int(state["epoch"])
        self.position = int(state["global_position"]) // self.num_replicas
