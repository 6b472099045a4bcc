"""Loading a checkpoint straight into one rank's part of a tensor-parallel model.

Each rank builds the model on the meta device, checks every tensor name and shape against the config
(as llama.load does), and then reads only its own slice of each tensor: HF safetensors by byte
ranges of rows (or blocks of rows for column slices), Meta's consolidated.NN.pth shards by the part
of each shard that falls inside its slice, whatever the number of shards (4 shards on 2 ranks, 1 on 2,
2 on 4). Peak memory per rank: about 1 / world size of the model, plus one tensor's slice.
"""

from __future__ import annotations

import os

import torch

import weights

from ..core.checkpoint import check_tensors, checkpoint_stop_tokens, config_from_checkpoint, meta_model, parse_dtype
from ..core.model import Transformer
from .tensor_parallel import current_plan, split_modules


def load(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
         group=None) -> Transformer:
    """This rank's part of the checkpoint at `path` (Meta or HF layout), in eval mode. Needs the process
    group (llama.distributed.init()); device defaults to this rank's (its GPU under nccl)."""
    from .process import device as rank_device

    dtype = parse_dtype(dtype)
    device = torch.device(device) if device is not None else rank_device()
    ckpt = weights.open_checkpoint(path)
    try:
        config = config_from_checkpoint(ckpt)
        model = meta_model(config)
        check_tensors(ckpt, model)
        plan = current_plan(config, group)
        dtype = dtype or ckpt.dtype("tok_embeddings.weight")

        def tensors(name: str) -> torch.Tensor:
            return ckpt.read(name, dtype, region=plan.region(name)).to(device)

        split_modules(model, plan, tensors, group)
    finally:
        ckpt.close()
    model.rope_freqs = model.rope_freqs.to(device)
    model.stop_tokens = checkpoint_stop_tokens(path)
    return model.eval()
