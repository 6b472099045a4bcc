"""Data-parallel training over several processes with FSDP2 (torch.distributed.fsdp.fully_shard).

    torchrun --nproc-per-node 2 scripts/train.py --data data/kjv --tokenizer weights/kjv/tokenizer.model ...

Every rank holds the same model, initialised from the same seed; fully_shard() then leaves each rank
1/W of every parameter (W = world size), of its gradient and of AdamW's moments, gathering a block's
parameters just before the block runs and reduce-scattering its gradients after the backward.

The global batch is the one a single process would train on: each micro-batch of B rows (the
loop's Batches, unchanged) is cut by rows, rank r taking rows [r B/W, (r+1) B/W). The loss of a step
is the sum over every rank's targets divided by the number of targets on all ranks, so:
    - each rank divides its summed loss by the *global* target count (DataParallel.sum), and
    - the gradient reduction sums over ranks instead of averaging (set_gradient_divide_factor(1)).
A step then computes the same gradients as one process on the whole batch (up to the order of the
float sums): the same losses and weights to ~1e-6 in float32.

The training state is saved whole (full_state: the trainable parameters and AdamW's moments
gathered on rank 0, in the single-process layout: moments keyed by parameter index), so a run saved
by W processes resumes in any number of processes, one included; loading hands each rank its shard.
Resuming reads the state file on every rank: on several machines --out must be on shared storage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..core.model import Transformer

# torch.distributed.fsdp and torch.distributed.checkpoint are imported where they are used: together
# they take most of a second to import, and `import llama` should not pay for them.
from .tensor_parallel import TensorParallelError


class DataParallel:
    """What the training loop (llama/training/loop.py, its `parallel` argument) asks of the processes.

    Make it after the process group (llama.distributed.init()), then shard() the model before
    training it. Every method is called on every rank, in the same order (they communicate).
    """

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise TensorParallelError("data-parallel training needs a process group: start under torchrun")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    @property
    def writes(self) -> bool:
        """Whether this rank writes files (the state, the checkpoint, the summary): rank 0."""
        return self.rank == 0

    def shard(self, model: Transformer) -> Transformer:
        """FSDP2 over the model, in place: each transformer block one unit (its parameters gathered
        together), the embedding, final norm and output in the root unit."""
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        for unit in (*model.layers, model):
            unit.set_gradient_divide_factor(1.0)  # sum the ranks' gradients: each loss is already / global targets
            unit.set_force_sum_reduction_for_comms(True)  # plain sums (gloo has no pre-scaled reduction)
        return model

    def batches(self, data):
        """The loop's data, each micro-batch cut to this rank's rows."""
        return RankBatches(data, self.rank, self.world)

    def sum(self, value: float | int) -> float | int:
        """`value` summed over the ranks (a target count, a loss)."""
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return int(t.item()) if isinstance(value, int) else float(t.item())

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """The trainable parameters {name: tensor} and the optimizer's state dict, whole, on the CPU,
        in one process's layout; on rank 0 (None on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        moments = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.writes:
            return None
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        return {name: weights[name] for name in trainable}, by_index(moments)

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's whole state dict on the CPU, on rank 0 (None on the others): what a checkpoint holds."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return weights if self.writes else None

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, moments: dict) -> None:
        """Give each rank its shard of a whole state (full_state's, or one process's)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, by_name(moments, model, optimizer), options=options)


class RankBatches:
    """A Batches object (llama/training/loop.py) whose micro-batches hold only this rank's rows."""

    def __init__(self, data, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world
        self.max_token_id = data.max_token_id

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.train_batch(step, micro)  # (B, T) each
        B = x.shape[0]
        if B % self.world:
            raise ValueError(f"the batch size {B} is not divisible by the {self.world} processes: each takes "
                             f"B / {self.world} rows")  # fmt: skip
        rows = slice(self.rank * B // self.world, (self.rank + 1) * B // self.world)
        return x[rows], y[rows]  # (B / W, T)

    def valid_batches(self):
        return self.data.valid_batches()  # every rank scores all of them (the same mean on each)

    def fingerprint(self):
        return self.data.fingerprint()


# ---- the optimizer's state: keyed by parameter index (one process) or by name (torch.distributed) ------------


def by_index(moments: dict) -> dict:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) in torch.optim's own
    layout (keyed by the parameter's position across the param groups), as one process saves it."""
    index = {name: i for i, name in enumerate(name for group in moments["param_groups"] for name in group["params"])}
    groups = [dict(group, params=[index[name] for name in group["params"]]) for group in moments["param_groups"]]
    return {"state": {index[name]: value for name, value in moments["state"].items()}, "param_groups": groups}


def by_name(moments: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The reverse of by_index, naming each index by the parameter at that position in `optimizer`."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [dict(group, params=[order[i] for i in group["params"]]) for group in moments["param_groups"]]
    return {"state": {order[int(i)]: value for i, value in moments["state"].items()}, "param_groups": groups}
