"""What QLoRA's frozen base needs beyond llama/quantization: the embedding table, and the output
projection tied to it, held quantized; int4 layers that widen their weight a slice at a time.

    model = load_for_finetuning(path, FinetuneSpec(method="qlora", quantize="int4"))   # uses these
    rows = weight_rows(model.output, slice(0, 4096), torch.bfloat16)                 # (4096, D)

Shape glossary: V vocabulary size, D model width, N, K a projection's out and in features, n rows.

Quantizing only the block projections leaves the embedding in float: for Llama 3.2 1B that is
128256 x 2048 bf16 = 0.53 GB, a third of an int4 QLoRA model. Frozen, it can be quantized like any
projection: the table is a (V, D) matrix held in an Int8Linear / Int4Linear, and

- an embedding lookup dequantizes only the rows of the tokens asked for
  (llama.quantization.QuantizedEmbedding);
- the tied output projection (Llama 3.2) is the same table applied to the hidden state
  (TiedOutput), so it is held once, as the float model ties one Parameter;
- the loss never dequantizes the whole table: loop.token_loss reads it a slice of the vocabulary at
  a time through weight_rows (see loop.sliced_cross_entropy).

The block projections' gradients pass through QuantizedMatmul, which widens a layer's whole weight
(forward, and again in the backward pass). Int4Linear.dequantize does so through an int32 per
weight and several float copies: ~150 MB of temporaries for one 8192 x 2048 MLP matrix, the largest
single part of an int4 QLoRA step. RowwiseInt4Linear computes the same values DEQUANTIZE_ROWS rows
at a time into the output, leaving the temporaries of a slice.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantization import QuantizedEmbedding
from ..quantization.linear import (Int4Linear, Int8Linear, check_mode, dequantize_int4, pack_nibbles, quantize_int4,
                                   unpack_nibbles)  # fmt: skip

CHUNK_ROWS = 4096  # rows of the embedding table quantized at a time while loading
DEQUANTIZE_ROWS = 1024  # rows of an int4 weight widened at a time by RowwiseInt4Linear


class LoadedQuantizedEmbedding(QuantizedEmbedding):
    """A QuantizedEmbedding built empty (on the meta device) and filled by the checkpoint loader,
    which hands it the float table to quantize as it is read (core.checkpoint.load's `swap`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str, group_size: int, dtype: torch.dtype,
                 device=None):  # fmt: skip
        check_mode(mode, group_size)
        if mode == "int8":
            table = Int8Linear(embedding_dim, num_embeddings, dtype, device)
        else:
            table = Int4Linear(embedding_dim, num_embeddings, group_size, dtype, device)
        table.use_kernel = False  # as the blocks' (finetune.load_for_finetuning): many rows at once
        super().__init__(table, dtype)

    def load_weight(self, w: torch.Tensor) -> None:
        """Quantize the float table w: (V, D), CHUNK_ROWS rows at a time: Int4Linear.load_weight would
        hold a (V, D) byte per weight before packing two to a byte (0.26 GB for Llama 3.2 1B, next to
        the 0.53 GB float table). Rows are quantized independently, so the result is the same."""
        V, D = self.num_embeddings, self.embedding_dim
        if w.shape != (V, D):
            raise ValueError(f"embedding table of shape {tuple(w.shape)}, expected {(V, D)}")
        table = self.table
        if isinstance(table, Int8Linear):  # quantize_int8 is chunked already and returns the final (V, D) int8
            table.load_weight(w)
            return
        G = table.group_size
        packed = torch.empty(V, D // 2, dtype=torch.uint8, device=w.device)
        sz = torch.empty(D // G, V, 2, dtype=table.scales_and_zeros.dtype, device=w.device)  # (D/G, V, 2)
        for start in range(0, V, CHUNK_ROWS):
            rows = slice(start, min(start + CHUNK_ROWS, V))
            q, part_sz = quantize_int4(w[rows], G)  # (n, D) in [0, 15], (D/G, n, 2)
            packed[rows], sz[:, rows] = pack_nibbles(q), part_sz
        table.weight, table.scales_and_zeros = packed, sz


class TiedOutput(nn.Module):
    """The output projection tied to a QuantizedEmbedding: h (..., D) -> logits (..., V) through the
    embedding's table. It holds no tensor of its own and keeps the embedding outside its submodules,
    so the model's state names the table once (as the embedding's)."""

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


def reads_rows(module: nn.Module) -> bool:
    """Whether weight_rows can read `module`'s rows: a plain nn.Linear (its weight a plain tensor, not
    a sharded one), a quantized table with dequantize_rows, a TiedOutput; not, e.g., one with a LoRA
    adapter."""
    if isinstance(module, TiedOutput):
        return True
    if type(module) is nn.Linear:
        return type(module.weight) in (nn.Parameter, torch.Tensor) and module.bias is None
    return hasattr(module, "dequantize_rows")


def weight_rows(module: nn.Module, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` of the (V, D) weight `module` stands for, in `dtype`: (n, D), the values of its own
    dequantize(). For the modules reads_rows accepts."""
    if isinstance(module, TiedOutput):
        module = module.embedding.table
    if type(module) is nn.Linear:
        return module.weight[rows].to(dtype)
    index = torch.arange(rows.start, rows.stop, device=next(module.buffers()).device)
    return module.dequantize_rows(index, dtype)


def swap_embedding(model: nn.Module, mode: str, group_size: int, dtype: torch.dtype) -> list[str]:
    """For checkpoint loading (core.checkpoint.load's `swap`, model on the meta device): replace the
    embedding by an empty LoadedQuantizedEmbedding that quantizes the table as it is read, and a tied
    output projection by a TiedOutput; returns the names filled through load_weight (["tok_embeddings"])."""
    V, D = model.tok_embeddings.weight.shape
    model.tok_embeddings = LoadedQuantizedEmbedding(V, D, mode, group_size, dtype, device="meta")
    if model.config.tie_word_embeddings:
        model.output = TiedOutput(model.tok_embeddings)
    return ["tok_embeddings"]


class RowwiseInt4Linear(Int4Linear):
    """An Int4Linear whose dequantize() widens DEQUANTIZE_ROWS rows at a time into the (N, K) result:
    the same values, with the temporaries of a slice. Takes over the module's buffers and settings
    (no copy); inherits everything else."""

    def __init__(self, module: Int4Linear):
        nn.Module.__init__(self)
        for name, value in vars(module).items():  # in_features, out_features, group_size, use_kernel
            if not name.startswith("_"):
                setattr(self, name, value)
        self._packed = None
        for name, buffer in module._buffers.items():  # weight, scales_and_zeros
            self.register_buffer(name, buffer)

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = dtype or self.scales_and_zeros.dtype
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)  # (N, K)
        for start in range(0, self.out_features, DEQUANTIZE_ROWS):
            rows = slice(start, start + DEQUANTIZE_ROWS)
            out[rows] = dequantize_int4(unpack_nibbles(self.weight[rows]), self.scales_and_zeros[:, rows].transpose(0, 1),
                                        self.group_size, dtype)  # fmt: skip
        return out


def rowwise_int4(model: nn.Module) -> list[str]:
    """Swap every Int4Linear of the model's blocks for a RowwiseInt4Linear, in place; returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is Int4Linear and name.startswith("layers."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, RowwiseInt4Linear(module))
            swapped.append(name)
    return swapped
