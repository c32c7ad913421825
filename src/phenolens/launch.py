"""Where this process stands in a launch (`accelerate launch`, torchrun, Slurm through Accelerate).

The launcher says it in the environment (WORLD_SIZE, RANK); training (`train.trainer`) and the runs
split over processes (`run.shards`) read it here, so that they agree on it.
"""

from __future__ import annotations

import os


def launched_world() -> int:
    """How many processes the launcher started (1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes shared files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def accelerate_on_cpu(device: str | None = None) -> bool:
    """Whether Accelerate must be told `cpu=True` for the launched processes to form one group (gloo).

    `accelerate launch --cpu --num_processes N` starts one process unless it is given an MPI hostfile;
    `accelerate launch --multi_gpu --num_processes N` (torchrun) starts N, but accelerate only treats
    them as one launch on CPUs when told `cpu=True`: when DEVICE is the CPU, or none is named and the
    machine has no accelerator.
    """
    if launched_world() <= 1:
        return False
    if device is not None:
        return device == "cpu"
    import torch

    has = getattr(torch, "accelerator", None)
    if has is not None and hasattr(has, "is_available"):
        return not has.is_available()
    return not torch.cuda.is_available()
