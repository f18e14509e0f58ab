"""Joining the process group that ``torchrun`` or ``accelerate launch`` describe.

Both launchers start one process per device and tell each, in its environment, who it is
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and where to meet (``MASTER_ADDR``, ``MASTER_PORT``).
``fisherlora train`` and ``compare`` read that here and nothing else: data-parallel training
is PyTorch's ``DistributedDataParallel``; the statistics are all-reduced in ``stats.py``.
Without those variables (a plain ``python`` / ``fisherlora`` call) the job is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fisherlora.errors import ConfigError


@dataclass(frozen=True)
class Process:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, prints and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` as the launcher set it; 1 for a plain call."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from err


def init_distributed(device: torch.device) -> tuple[Process, torch.device]:
    """Join (once) the process group the launcher describes, with NCCL on CUDA and gloo on CPU,
    and return this process and its device (``cuda:LOCAL_RANK`` when ``device`` is CUDA).

    A process group that the caller already initialised is used as it is.
    """
    if not dist.is_initialized():
        if launched_world_size() <= 1:
            return Process(), device
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE is set but {', '.join(missing)} is not: start distributed runs with "
                "`torchrun --nproc-per-node N` or `accelerate launch`"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    process = Process(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if device.type == "cuda" and process.distributed:
        device = torch.device("cuda", process.local_rank)
        torch.cuda.set_device(device)
    return process, device


def is_main_process() -> bool:
    """True for one process, and for rank 0 of a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op for one process): rank 0's files are complete after it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
