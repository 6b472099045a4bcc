"""The process group: set up from torchrun's environment, nothing home-made."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .tensor_parallel import TensorParallelError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes; returns (rank, world size).

    backend: "nccl" for CUDA devices, "gloo" for CPUs (default: nccl when CUDA is available). Each
    rank takes the GPU of its LOCAL_RANK. A second call returns the group already joined.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launched():
        missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
        raise TensorParallelError(f"no process group: start the script with torchrun (missing {', '.join(missing)})")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """This rank's device: its GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
