"""An embedding table kept quantized: only the rows a lookup reads are dequantized.

    embedding = QuantizedEmbedding(table, dtype=torch.bfloat16)   # table: a quantized (V, D) matrix
    h = embedding(tokens)                                        # (B, T) int64 -> (B, T, D) in dtype
    model.tok_embeddings = embedding
    model.output = embedding.table                               # tied: the same module, its quantized matmul
    QuantizedEmbedding.from_float(model.tok_embeddings, "int4", group_size=32)

Why: the embedding of a small model is a large share of it (Llama 3.2 1B: 128256 x 2048, a fifth
of the weights, 0.53 GB in bfloat16), yet each token reads one row of it. Kept in the compact form
its file or its quantized matmul uses, it costs that form's size; a lookup widens T rows.

Shapes: V = num_embeddings (vocabulary), D = embedding_dim, tokens (...,) -> (..., D).

The table is a module standing for a (V, D) matrix (out_features V, in_features D) with
`dequantize_rows(index, dtype) -> (*index.shape, D)`, the rows its own dequantize() gives:
Int8Linear, Int4Linear (linear.py), Int8BlockLinear (GGUF's Q8_0, gguf.py), their native versions
(kernels/native.py, which replace the table in place when a tied output is swapped: the same
module serves both), and GGUFRows (gguf.py: any other GGUF type, e.g. the Q6_K embedding of
llama.cpp's Q4_0 files, row by row as stored, dequantized exactly). When the output projection is
tied to the embedding, it is the table itself (a linear of the same matrix), so the model holds the
quantized matrix once.

A QuantizedEmbedding has no float `weight`: code that needs the model's device or dtype asks
llama.core.device.model_device / model_dtype (or this module's .device / .dtype), and reading
`.weight` raises an AttributeError that says so. dequantize() makes the whole float table when it
is really wanted.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Int4Linear, Int8Linear, check_mode

CHUNK_ROWS = 4096  # rows widened at a time by dequantize(): float temporaries of a few MB


class QuantizedEmbedding(nn.Module):
    """tokens (...,) -> table.dequantize_rows(tokens, dtype): (..., D). dtype: the activations' dtype."""

    def __init__(self, table: nn.Module, dtype: torch.dtype):
        super().__init__()
        if not hasattr(table, "dequantize_rows"):
            raise TypeError(f"QuantizedEmbedding needs a table with dequantize_rows(); {type(table).__name__} has none")
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = dtype

    @classmethod
    def from_float(cls, embedding: nn.Embedding, mode: str, group_size: int = 128) -> "QuantizedEmbedding":
        """Quantize an nn.Embedding's table as quantize_model quantizes a linear (int8 per row, int4 in
        groups of group_size along D)."""
        check_mode(mode, group_size)
        w = embedding.weight.detach()
        V, D = w.shape
        table = Int8Linear(D, V, w.dtype, w.device) if mode == "int8" else Int4Linear(D, V, group_size, w.dtype, w.device)
        table.load_weight(w)
        return cls(table, w.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.table.buffers()).device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.dequantize_rows(tokens, self.dtype)  # (..., D)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (V, D) table in dtype (default: the activations' dtype)."""
        dtype = dtype or self.dtype
        out = torch.empty(self.num_embeddings, self.embedding_dim, dtype=dtype, device=self.device)
        for start in range(0, self.num_embeddings, CHUNK_ROWS):
            rows = torch.arange(start, min(start + CHUNK_ROWS, self.num_embeddings), device=self.device)
            out[rows] = self.table.dequantize_rows(rows, dtype)
        return out

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                f"QuantizedEmbedding keeps its table quantized ({type(self.table).__name__}) and has no float "
                "weight: use llama.core.device.model_device(model) / model_dtype(model) for the model's device "
                "and dtype, or .dequantize() for the float table"
            )
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"
