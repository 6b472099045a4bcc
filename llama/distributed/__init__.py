"""Running one model over several processes with torch.distributed (launched by torchrun).

    process.py          init(): join the process group torchrun describes (gloo on CPUs, nccl on GPUs);
                        start(), together(): what the scripts need to run under torchrun
    tensor_parallel.py  split a model's matrices over ranks (Megatron / Meta style): shard()
    loading.py          load(): each rank reads only its part of a checkpoint
    lockstep.py         Leader / follow(): rank 0 drives the model (a server), the others mirror it
    training.py         DataParallel: training over several processes with FSDP2 (fully_shard)
"""

from .loading import load
from .lockstep import Leader, follow
from .process import device, exit, init, launched, shared_seed, start, together
from .training import DataParallel
from .tensor_parallel import (PARALLEL_MODULES, Plan, RowParallelLinear, TensorParallelError, VocabParallelEmbedding, VocabParallelOutput,
                              current_plan, shard)  # fmt: skip

__all__ = [
    "DataParallel",
    "PARALLEL_MODULES",
    "Leader",
    "Plan",
    "RowParallelLinear",
    "TensorParallelError",
    "VocabParallelEmbedding",
    "VocabParallelOutput",
    "current_plan",
    "device",
    "exit",
    "follow",
    "init",
    "launched",
    "load",
    "shard",
    "shared_seed",
    "start",
    "together",
]
