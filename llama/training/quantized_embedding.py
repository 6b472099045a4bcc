"""QLoRA's frozen embedding table, and the output projection tied to it, held quantized.

    model = load_for_finetuning(path, FinetuneSpec(method="qlora", quantize="int4"))   # uses it
    rows = weight_rows(model.output, slice(0, 4096), torch.bfloat16)                 # (4096, D)

Shape glossary: V vocabulary size, D model width, B batch, T tokens, n rows asked for.

Quantizing only the block projections leaves the embedding in float: for Llama 3.2 1B that is
128256 x 2048 bf16 = 0.53 GB, a third of an int4 QLoRA model. Frozen, it can be quantized like any
projection: the table is a (V, D) matrix, so it is held in this project's Int8Linear / Int4Linear
(llama/quantization/linear.py; int8 per row, int4 in groups of G along D), and

- an embedding lookup dequantizes only the rows of the tokens asked for (QuantizedEmbedding);
- the tied output projection (Llama 3.2) is the same module applied to the hidden state
  (TiedOutput), so the table is held once, as the float model ties one Parameter;
- the loss never dequantizes the whole table: loop.token_loss reads it a slice of the vocabulary at
  a time through weight_rows (see loop.sliced_cross_entropy).

weight_rows dequantizes rows with the same formula as the modules' own dequantize(), so a row is
bit for bit the same value wherever it is read (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantization.linear import Int4Linear, Int8Linear, check_mode, unpack_nibbles


def reads_rows(module: nn.Module) -> bool:
    """Whether weight_rows can read `module`'s rows: a plain nn.Linear (its weight a plain tensor, not
    a sharded one), an Int8Linear / Int4Linear, a TiedOutput; not, e.g., one with a LoRA adapter."""
    if isinstance(module, TiedOutput):
        return True
    if type(module) is nn.Linear:
        return type(module.weight) in (nn.Parameter, torch.Tensor) and module.bias is None
    return isinstance(module, (Int8Linear, Int4Linear))


def weight_rows(module: nn.Module, index: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `index` (a slice or a (n,) index tensor) of the (V, D) weight `module` stands for, in
    `dtype`: (n, D). For the modules reads_rows accepts."""
    if isinstance(module, TiedOutput):
        module = module.embedding.table
    if type(module) is nn.Linear:
        return module.weight[index].to(dtype)
    if isinstance(module, Int8Linear):  # as Int8Linear.dequantize, on the chosen rows
        return module.weight[index].to(dtype) * module.scales[index].to(dtype)[:, None]
    if isinstance(module, Int4Linear):  # as Int4Linear.dequantize, on the chosen rows
        K, G = module.in_features, module.group_size
        q = unpack_nibbles(module.weight[index])  # (n, K) in [0, 15]
        q = q.view(q.shape[0], K // G, G).to(dtype)  # (n, K/G, G)
        sz = module.scales_and_zeros[:, index].to(dtype).transpose(0, 1)  # (n, K/G, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(-1, K)
    raise TypeError(f"weight_rows cannot read the rows of a {type(module).__name__}")


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's lookup over a quantized (V, D) table: tokens (...) int64 -> (..., D) in `dtype`
    (the scales' dtype: the model's float dtype). `table` is an Int8Linear / Int4Linear with
    out_features V and in_features D; frozen (no gradient reaches it)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str, group_size: int = 64, dtype=torch.float32,
                 device=None):  # fmt: skip
        super().__init__()
        check_mode(mode, group_size)
        if mode == "int8":
            self.table = Int8Linear(embedding_dim, num_embeddings, dtype, device)
        else:
            self.table = Int4Linear(embedding_dim, num_embeddings, group_size, dtype, device)
        self.table.use_kernel = False  # as output: many rows at once (see finetune.load_for_finetuning)
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows it returns (what the residual stream carries)."""
        scales = self.table.scales if isinstance(self.table, Int8Linear) else self.table.scales_and_zeros
        return scales.dtype

    def load_weight(self, w: torch.Tensor) -> None:
        """Quantize the float table w: (V, D) (called by the checkpoint loader as it reads it)."""
        if w.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding table of shape {tuple(w.shape)}, expected {(self.num_embeddings, self.embedding_dim)}")
        self.table.load_weight(w)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = weight_rows(self.table, tokens.reshape(-1), self.dtype)  # (B*T, D)
        return rows.view(*tokens.shape, self.embedding_dim)  # (B, T, D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.mode}"


class TiedOutput(nn.Module):
    """The output projection tied to a QuantizedEmbedding: h (..., D) -> logits (..., V) through the
    embedding's table. It holds no tensor of its own (the table is saved once, as the embedding's) and
    keeps the embedding outside its submodules, so the model's state has no second copy."""

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        self._tied = (embedding,)  # a tuple: not registered as a submodule

    @property
    def embedding(self) -> QuantizedEmbedding:
        return self._tied[0]

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.embedding.table(h)  # (..., V); dequantizes the whole table (token_loss does not call it)

    def extra_repr(self) -> str:
        return "tied to tok_embeddings"


def swap_embedding(model: nn.Module, mode: str, group_size: int, dtype: torch.dtype) -> list[str]:
    """For checkpoint loading (core.checkpoint.load's `swap`, model on the meta device): replace the
    embedding by an empty QuantizedEmbedding that quantizes the table as it is read, and a tied output
    projection by a TiedOutput; returns the names filled through load_weight (["tok_embeddings"])."""
    V, D = model.tok_embeddings.weight.shape
    model.tok_embeddings = QuantizedEmbedding(V, D, mode, group_size, dtype, device="meta")
    if model.config.tie_word_embeddings:
        model.output = TiedOutput(model.tok_embeddings)
    return ["tok_embeddings"]
