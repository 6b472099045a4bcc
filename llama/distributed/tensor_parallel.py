"""Tensor parallelism, Megatron / Meta style, applied to a model from outside.

    torchrun --nproc-per-node 2 scripts/generate.py --checkpoint DIR --tp 2
    model = llama.distributed.load(path)          # each rank reads only its part (loading.py)
    model = llama.distributed.shard(model)        # or split a model every rank already holds

Every rank holds 1/W of each matrix (W = world size) and runs the same forward on its part:

    column-parallel (outputs split)  wq, wk, wv by heads; w1, w3 by hidden units. Plain, smaller
                                     nn.Linear modules: the heads and hidden units a rank produces
                                     are consumed on that rank, so nothing is communicated.
    row-parallel (inputs split)      wo, w2: RowParallelLinear multiplies its columns with the rank's
                                     heads / hidden units and sums the partial products over ranks
                                     (one all_reduce per block half: two per layer).
    vocabulary-parallel              tok_embeddings: each rank looks up the tokens in its rows of the
                                     table (zeros elsewhere), all_reduce; output: each rank computes
                                     its slice of the logits, all_gather.
    replicated                       the norms (RMSNorm, per-head q/k norms), RoPE, the mask.

Key/value heads: with Hkv >= W each rank holds Hkv / W of them, and its H / W query heads are exactly
the ones that read them (query head h reads kv head h // n_rep). With Hkv < W, each kv head is
replicated on W / Hkv ranks, as Meta's reference reshards Llama 2 70B's 8 kv heads over 16 GPUs; each
rank then holds one. The KV cache of each rank holds only its own kv heads (setup_cache sizes each
layer's cache from its attention module).

The model's config stays the global one (what the checkpoint describes); each attention module's
n_heads / n_kv_heads say what this rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from ..core.model import (Attention, FeedForward, GeluFeedForward, KVCache, LayerCache, RMSNorm, Transformer,
                          TransformerBlock)  # fmt: skip
from ..core.support import check_supported


class TensorParallelError(ValueError):
    """A model cannot be split over this world size, or no process group is set up."""


# ---- the plan: which slice of each tensor a rank holds ----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The slices rank `rank` of `world` holds, along the dim each tensor is split on."""

    config: ModelConfig
    rank: int
    world: int

    def __post_init__(self):
        c, W = self.config, self.world
        if c.n_heads % W:
            raise TensorParallelError(f"n_heads {c.n_heads} is not divisible by the world size {W}")
        if c.n_kv_heads % W and W % c.n_kv_heads:
            raise TensorParallelError(
                f"n_kv_heads {c.n_kv_heads} and the world size {W} do not divide each other: the key/value "
                "heads can be neither split evenly nor replicated"
            )
        if c.ffn_dim % W:
            raise TensorParallelError(f"ffn_dim {c.ffn_dim} is not divisible by the world size {W}")

    @property
    def n_heads(self) -> int:
        return self.config.n_heads // self.world

    @property
    def n_kv_heads(self) -> int:
        return max(1, self.config.n_kv_heads // self.world)

    def heads(self) -> slice:
        return slice(self.rank * self.n_heads, (self.rank + 1) * self.n_heads)

    def kv_heads(self) -> slice:
        """This rank's kv heads; with Hkv < W, the one its query heads read (replicated on W / Hkv ranks)."""
        first = self.rank * self.n_kv_heads if self.config.n_kv_heads >= self.world else self.rank * self.config.n_kv_heads // self.world
        return slice(first, first + self.n_kv_heads)

    def hidden(self) -> slice:
        F_local = self.config.ffn_dim // self.world
        return slice(self.rank * F_local, (self.rank + 1) * F_local)

    def vocab(self) -> slice:
        """This rank's rows of the embedding / output: ceil(V / W) per rank, the last ones shorter."""
        per = -(-self.config.vocab_size // self.world)
        return slice(min(self.rank * per, self.config.vocab_size), min((self.rank + 1) * per, self.config.vocab_size))

    def region(self, name: str) -> tuple[int, slice] | None:
        """(dim, slice) of a Meta-named tensor this rank holds, or None if it holds all of it."""
        hd = self.config.head_dim
        rows = lambda s: slice(s.start * hd, s.stop * hd)  # noqa: E731  heads -> rows of hd each
        if name.endswith("attention.wq.weight"):
            return 0, rows(self.heads())
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            return 0, rows(self.kv_heads())
        if name.endswith("attention.wo.weight"):
            return 1, rows(self.heads())
        if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
            return 0, self.hidden()
        if name.endswith("feed_forward.w2.weight"):
            return 1, self.hidden()
        if name in ("tok_embeddings.weight", "output.weight"):
            return 0, self.vocab()
        return None

    def take(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole tensor (a copy, so the whole one can be freed)."""
        region = self.region(name)
        if region is None:
            return tensor.clone()
        dim, part = region
        return tensor.narrow(dim, part.start, part.stop - part.start).clone()


def current_plan(config: ModelConfig, group=None) -> Plan:
    if not dist.is_available() or not dist.is_initialized():
        raise TensorParallelError("tensor parallelism needs a process group: start under torchrun and call "
                                  "llama.distributed.init() (or torch.distributed.init_process_group)")  # fmt: skip
    return Plan(config, dist.get_rank(group), dist.get_world_size(group))


# ---- the parallel modules ---------------------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """A linear holding some input columns of W: y = all_reduce(x_local @ W_local.T)."""

    def __init__(self, in_features: int, out_features: int, group=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows [start, start + rows) of the vocabulary; others look up zeros, then sum."""

    def __init__(self, rows: int, dim: int, start: int, group=None, device=None, dtype=None):
        super().__init__(rows, dim, device=device, dtype=dtype)
        self.start, self.group = start, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.num_embeddings)  # (B, T)
        h = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * inside[..., None].to(self.weight.dtype)
        dist.all_reduce(h, group=self.group)
        return h  # (B, T, D)


class VocabParallelOutput(nn.Linear):
    """The output projection's rows for this rank's vocabulary slice; the logits gathered from all ranks."""

    def __init__(self, in_features: int, rows: int, vocab_size: int, world: int, group=None, device=None, dtype=None):
        super().__init__(in_features, rows, bias=False, device=device, dtype=dtype)
        self.vocab_size, self.world, self.group = vocab_size, world, group
        self.per_rank = -(-vocab_size // world)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)  # (B, T, V_rank)
        if local.shape[-1] < self.per_rank:  # the last ranks' slices are shorter: pad to gather
            local = F.pad(local, (0, self.per_rank - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (B, T, V)


# What shard() and the per-rank loader may meet: the plain model (other modules and config variants
# have not been checked against the split).
PLAIN_MODULES = (Transformer, TransformerBlock, Attention, FeedForward, GeluFeedForward, RMSNorm, KVCache, LayerCache,
                 nn.ModuleList, nn.Linear, nn.Embedding)  # fmt: skip
PARALLEL_MODULES = (RowParallelLinear, VocabParallelEmbedding, VocabParallelOutput)
HANDLED_FIELDS = ("qk_norm", "sliding_window", "window_layers", "nope_layers", "mlp")


def _linear(weight: torch.Tensor, cls=nn.Linear, **kwargs) -> nn.Linear:
    out_features, in_features = weight.shape
    module = cls(in_features, out_features, device="meta", **kwargs) if cls is not nn.Linear else \
        nn.Linear(in_features, out_features, bias=False, device="meta")  # fmt: skip
    module.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return module


def split_modules(model: Transformer, plan: Plan, tensors, group=None) -> Transformer:
    """Replace the model's modules by this rank's parallel ones, in place, filling each weight with
    `tensors(name)` (this rank's part of the Meta-named tensor)."""
    check_supported(model, "tensor parallelism", PLAIN_MODULES, HANDLED_FIELDS)
    config, W = model.config, plan.world
    for i, block in enumerate(model.layers):
        attn, ffn = block.attention, block.feed_forward
        p = f"layers.{i}."
        attn.wq = _linear(tensors(p + "attention.wq.weight"))
        attn.wk = _linear(tensors(p + "attention.wk.weight"))
        attn.wv = _linear(tensors(p + "attention.wv.weight"))
        attn.wo = _linear(tensors(p + "attention.wo.weight"), RowParallelLinear, group=group)
        attn.n_heads, attn.n_kv_heads = plan.n_heads, plan.n_kv_heads
        ffn.w1 = _linear(tensors(p + "feed_forward.w1.weight"))
        if isinstance(ffn, FeedForward):
            ffn.w3 = _linear(tensors(p + "feed_forward.w3.weight"))
        ffn.w2 = _linear(tensors(p + "feed_forward.w2.weight"), RowParallelLinear, group=group)
        for name, norm in block.named_modules():
            if isinstance(norm, RMSNorm):
                norm.weight = nn.Parameter(tensors(f"{p}{name}.weight"))
    table = tensors("tok_embeddings.weight")
    embedding = VocabParallelEmbedding(table.shape[0], config.dim, plan.vocab().start, group, device="meta")
    embedding.weight = nn.Parameter(table)
    model.tok_embeddings = embedding
    out_weight = embedding.weight if config.tie_word_embeddings else tensors("output.weight")
    output = VocabParallelOutput(config.dim, out_weight.shape[0], config.vocab_size, W, group, device="meta")
    output.weight = out_weight if isinstance(out_weight, nn.Parameter) else nn.Parameter(out_weight)
    model.output = output
    model.norm.weight = nn.Parameter(tensors("norm.weight"))
    model.tensor_parallel = {"rank": plan.rank, "world_size": W}
    return model


def shard(model: Transformer, group=None) -> Transformer:
    """Split a model every rank holds in full into this rank's part, in place (the full weights are
    dropped as each part is taken). Every rank must hold the same weights."""
    plan = current_plan(model.config, group)
    state = dict(model.state_dict())
    if model.cache is not None:
        raise TensorParallelError("shard() a model without a KV cache (clear_cache() first)")

    def tensors(name: str) -> torch.Tensor:
        return plan.take(name, state.pop(name))

    return split_modules(model, plan, tensors, group)
