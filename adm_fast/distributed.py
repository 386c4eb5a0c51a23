"""Process-group setup for torchrun (no MPI), shared by training and sampling:
NCCL on GPUs, gloo on CPU.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; a plain
`python`/`adm-fast` run is a world of one and never touches torch.distributed,
so single-process training cannot hang on a rendezvous (guided-diffusion's MPI
launch did: its issues #12, #63).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_world_size() -> int:
    """The world size torchrun announces (1 for a plain run)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device: str | None = None, timeout_s: float = 600.0) -> World:
    """Join torchrun's process group when there is one and pick this rank's device.

    device: "cpu", "cuda" or None (cuda when available). Each rank takes
    cuda:LOCAL_RANK among the devices CUDA_VISIBLE_DEVICES leaves visible.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for, but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are "
                               "visible (check CUDA_VISIBLE_DEVICES and --nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return World(rank, world_size, local_rank, dev)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(world: World, obj):
    """Rank 0's value of a small picklable object on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(world: World, values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging; one collective for all keys)."""
    if not world.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.world_size
