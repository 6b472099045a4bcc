"""Running one model over several processes with torch.distributed (launched by torchrun).

    process.py          init(): join the process group torchrun describes (gloo on CPUs, nccl on GPUs)
    tensor_parallel.py  split a model's matrices over ranks (Megatron / Meta style): shard()
    loading.py          load(): each rank reads only its part of a checkpoint
"""

from .loading import load
from .process import device, init, launched
from .tensor_parallel import (Plan, RowParallelLinear, TensorParallelError, VocabParallelEmbedding, VocabParallelOutput,
                              current_plan, shard)  # fmt: skip

__all__ = [
    "Plan",
    "RowParallelLinear",
    "TensorParallelError",
    "VocabParallelEmbedding",
    "VocabParallelOutput",
    "current_plan",
    "device",
    "init",
    "launched",
    "load",
    "shard",
]
