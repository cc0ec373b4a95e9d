"""Multi-process training on torch.distributed, as launched by torchrun (or SLURM's srun).

One process per device. Every rank takes its contiguous slice of the global batch, so a run
on W processes with per-rank batch b sees exactly the batches of a 1-process run with batch
W*b. Features are gathered with gradients inside ``ContrastiveLoss`` (local_loss: each rank
scores its b rows against all W*b columns); DDP averages the parameter gradients, which
then equal the 1-process full-batch gradients.

Launch (single node):  torchrun --nproc_per_node 4 -m topoclip train --config ...
Multi-node:            torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
                           --rdzv_endpoint HOST:29500 --rdzv_id JOB -m topoclip train ...
SLURM without torchrun: srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; with
MASTER_ADDR / MASTER_PORT exported, ``init_distributed`` reads those.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from topoclip.devices import check_device_available

__all__ = [
    "process_group",
    "DistInfo",
    "init_distributed",
    "current_info",
    "wrap_model",
    "rank_slice",
    "barrier",
    "broadcast_object",
    "all_gather_object",
    "mean_across_ranks",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group described by the environment (torchrun or SLURM), if any.

    Without such variables this is a no-op returning a single-process DistInfo. The backend
    defaults to nccl for CUDA devices and gloo otherwise.
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        check_device_available(dev)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def current_info(device: torch.device | str) -> DistInfo:
    """The DistInfo of an already initialised process group (single-process if there is none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistInfo(device=torch.device(device))
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=torch.device(device))


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around the model when running on several processes."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def rank_slice(global_batch: int, info: DistInfo) -> slice:
    """This rank's contiguous rows of a global batch (which must divide evenly: the gathered
    features of all ranks are concatenated in rank order and need equal sizes)."""
    if global_batch % info.world_size:
        raise ValueError(
            f"train.batch_size={global_batch} must be divisible by the number of processes {info.world_size}"
        )
    per_rank = global_batch // info.world_size
    return slice(info.rank * per_rank, (info.rank + 1) * per_rank)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise mean of a list of floats over the ranks (one small all-reduce).

    A NaN on any rank makes the mean NaN, so every rank takes the same skip decision.
    """
    if not info.distributed:
        return values
    # gloo and nccl both reduce float64 tensors on the rank's own device.
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """Join the torchrun/SLURM process group for the duration of a run (``init_distributed``)
    and leave it afterwards, unless the caller had already joined one (then it stays theirs)."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owns_group:
            cleanup()
