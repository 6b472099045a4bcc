"""The process group: set up from torchrun's environment, nothing home-made."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback
from contextlib import contextmanager

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


# ---- for the scripts: generate.py, perplexity.py, serve.py under torchrun ---------------------------------


def start(tp: int | None) -> int:
    """Join the process group a script's --tp asks for; returns the tensor-parallel size (1: a plain
    single process, no group).

    tp: --tp, or None for torchrun's world size (1 when not under torchrun). Refused, with a
    TensorParallelError on every rank before anything is communicated (so no rank waits for another):
    --tp > 1 without torchrun, and a --tp other than the number of processes torchrun started. On the
    ranks other than 0, an uncaught exception is still printed (to the real stderr, marked with the rank)
    after the script has silenced their output.
    """
    if tp is not None and tp < 1:
        raise TensorParallelError(f"--tp must be at least 1, got {tp}")
    if not launched():
        if tp is not None and tp > 1:
            raise TensorParallelError(f"--tp {tp} needs {tp} processes: start the script with "
                                      f"torchrun --nproc-per-node {tp} ...")  # fmt: skip
        return 1
    world = int(os.environ["WORLD_SIZE"])
    if tp is not None and tp != world:
        raise TensorParallelError(f"--tp {tp} does not match the {world} processes torchrun started "
                                  f"(WORLD_SIZE={world}): give --nproc-per-node (times --nnodes) equal to --tp")  # fmt: skip
    if world == 1:
        return 1
    rank = int(os.environ["RANK"])
    if rank != 0:

        def report(kind, value, tb):  # the default hook writes to sys.stderr, which a follower has silenced
            sys.__stderr__.write(f"[rank {rank}] " + "".join(traceback.format_exception(kind, value, tb)))

        sys.excepthook = report
    init()
    # every rank through init before any may raise and exit: rank 0 hosts the store the others still read
    dist.barrier()
    atexit.register(_leave)
    return world


def _leave() -> None:
    """Leave the process group at exit. Rank 0 hosts the group's store: when it exits first (an error
    every rank raised on its own), another rank's teardown finds the store gone, which is no error of
    this run and must not turn that rank's exit status 2 into 1."""
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- gloo raises RuntimeError / DistBackendError for a vanished peer
        pass


def exit(status: int | None = 0):
    """End a script with `status`, as sys.exit(status) does. In a process group: leave the group, flush
    what was written, and end the process at once (os._exit), skipping the C++ teardown that follows
    Python's. With torch 2.13 and gloo, that teardown sometimes aborted rank 0 after everything had
    finished ("terminate called without an active exception", SIGABRT, no Python frame left): 3 of
    8 runs of tests/test_distributed.py on a 2-core VM, in serve.py and in the tests' worker."""
    if not dist.is_initialized():
        sys.exit(status)
    _leave()
    if isinstance(status, str):  # sys.exit prints a message and exits 1
        print(status, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- a closed or broken stream: nothing more to write
            pass
    os._exit(status if isinstance(status, int) else 0 if status is None else 1)


@contextmanager
def together(errors: tuple[type[BaseException], ...] = (Exception,)):
    """Run a block on every rank and end it together: if it raised `errors` on any rank, every rank
    raises (its own error, or a TensorParallelError naming the rank that failed and its message).

    Without it, a rank that failed (a checkpoint missing on one machine) exits while the others go on
    into a collective and wait for it forever. A no-op without a process group.
    """
    error = None
    try:
        yield
    except errors as e:
        error = e
    if dist.is_initialized():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else f"{error}")
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise TensorParallelError(f"rank {rank} failed: {message}")
    if error is not None:
        raise error


def shared_seed(seed: int | None) -> int | None:
    """`seed`, or with a process group and no seed, one drawn on rank 0 and sent to all: ranks that
    sample the same tokens from the same logits feed the same inputs to the next forward."""
    if seed is not None or not dist.is_initialized():
        return seed
    box = [int.from_bytes(os.urandom(8), "little") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
