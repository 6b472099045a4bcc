"""GGUF's quantized weights kept as they are stored: Q8_0 as Int8BlockLinear, Q4_0 as Int4Linear.

    model = llama.load("model-Q4_0.gguf", quantize="int4", dtype="bfloat16")   # runs in about the file's size
    model = llama.load("model-Q8_0.gguf", quantize="int8")

A GGUF weight of a type that maps onto a quantized module without loss is copied into it:

- Q8_0 (blocks of 32 int8 values with one fp16 scale d: w = q * d) has a scale per block of 32
  inputs, which this project's Int8Linear (one scale per output row) cannot hold. Int8BlockLinear
  below holds it as it is: weight (N, K) int8, scales (N, K/32) fp16.
- Q4_0 (blocks of 32 4-bit values q with one fp16 scale d: w = (q - 8) * d) is Int4Linear with
  group size 32 and zero point 0, since Int4Linear computes w = (q - 8) * scale + zero. The nibbles
  are reordered (Q4_0 pairs value j with j + 16 in a byte, Int4Linear value 2j with 2j + 1) and
  the scales take the model's dtype: exact in float32 and float16, rounded to 8 bits of mantissa in
  bfloat16 (as every bfloat16 Int4Linear's scales are).

Every other weight is dequantized (weights/gguf.py) and quantized by the requested mode as any
checkpoint is (int8 per channel; int4 in groups of group_size), or stays in float where that mode
cannot take it. The embedding and the norms stay in float, as elsewhere in this project.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from weights.gguf import BLOCK, GGMLType, dequantize, quantize_q8_0

from ..core import gguf as core_gguf
from ..core.gguf import Fill
from .embedding import QuantizedEmbedding
from .linear import (Int4Linear, Int8Linear, _row_chunks, check_mode, pack_nibbles, quantize_int4, quantize_int8,
                     target_names)  # fmt: skip

Q8_0_BLOCK = 34  # bytes of one Q8_0 block: fp16 d, then 32 int8 values
Q4_0_BLOCK = 18  # fp16 d, then 16 bytes of 4-bit values


class Int8BlockLinear(nn.Module):
    """y = x @ W.T with W[n, k] = weight[n, k] * scales[n, k // 32]: GGUF's Q8_0, kept as stored.

    Buffers: weight (N, K) int8, scales (N, K/32) float16. The forward widens a slice of rows at a
    time into x's dtype (through float32, so W is exactly Q8_0's dequantized value rounded once to
    that dtype) and multiplies; the slices keep the float temporaries small (see _row_chunks). That
    costs several passes over the weights, so decoding is slow here: kernels.optimize swaps in
    kernels/native.py's NativeInt8BlockLinear, which reads the int8 values once (gemv_q8_0).
    """

    block_size = 32

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        if in_features % self.block_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the block size {self.block_size}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, in_features // self.block_size,
                                                  dtype=torch.float16, device=device))  # fmt: skip

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8BlockLinear":
        module = cls(linear.in_features, linear.out_features, linear.weight.device)
        module.load_weight(linear.weight.detach())
        return module

    def load_q8_0(self, data: torch.Tensor) -> None:
        """Fill from the Q8_0 bytes of an (N, K) weight (1-D uint8, as stored in a GGUF file)."""
        N, K = self.out_features, self.in_features
        blocks = data.view(N, K // self.block_size, Q8_0_BLOCK)
        self.scales = blocks[..., :2].contiguous().view(torch.float16).view(N, K // self.block_size)
        self.weight = blocks[..., 2:].contiguous().view(torch.int8).view(N, K)

    def load_weight(self, w: torch.Tensor) -> None:
        """Quantize a float (N, K) weight as Q8_0 (ggml's rounding) into this module."""
        self.load_q8_0(quantize_q8_0(w.detach().cpu()).to(w.device))

    def dequantize(self, dtype=torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """W[rows] in dtype: (n, K)."""
        q = self.weight[rows].view(-1, self.in_features // self.block_size, self.block_size).float()
        w = q * self.scales[rows].float().unsqueeze(-1)  # (n, K/32, 32): the value Q8_0 stands for, in float32
        return w.view(-1, self.in_features).to(dtype)

    def dequantize_rows(self, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `index` (any shape) of dequantize(dtype): (*index.shape, K); an embedding's lookup."""
        rows = index.reshape(-1)
        q = self.weight[rows].view(-1, self.in_features // self.block_size, self.block_size).float()
        w = q * self.scales[rows].float().unsqueeze(-1)  # (n, K/32, 32) in float32, as dequantize()
        return w.to(dtype).view(*index.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for rows in _row_chunks(self.weight):
            y[:, rows] = F.linear(x2, self.dequantize(x.dtype, rows))
        return y.view(*x.shape[:-1], self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 per block of {self.block_size} (Q8_0)")


class GGUFRows(nn.Module):
    """A (V, D) matrix as a GGUF file stores it, kept for row lookups (an embedding's table, see
    embedding.py): buffer `blocks` (V, row bytes) uint8 of GGML type `kind`, each row a whole number
    of blocks. dequantize_rows widens the rows asked for with weights/gguf.py's dequantize, so a
    lookup is bit for bit the dequantized file's row. It has no matmul: it serves only lookups (a
    tied output of such a type gets its own quantized copy; see load)."""

    def __init__(self, kind: GGMLType, out_features: int, in_features: int, device=None):
        super().__init__()
        values, size = BLOCK[kind]
        if in_features % values:
            raise ValueError(f"{kind.name} rows hold blocks of {values} values; {in_features} is not a multiple")
        self.kind, self.out_features, self.in_features = GGMLType(kind), out_features, in_features
        self.register_buffer("blocks", torch.zeros(out_features, in_features // values * size, dtype=torch.uint8,
                                                   device=device))  # fmt: skip

    def load_raw(self, data: torch.Tensor) -> None:
        """Fill from the tensor's bytes as stored (1-D uint8); copied, as the file is closed after loading."""
        self.blocks = data.view(self.out_features, -1).clone()

    def dequantize_rows(self, index: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `index` (any shape) of the matrix: (*index.shape, D) in dtype."""
        rows = self.blocks[index.reshape(-1)].cpu()  # (n, row bytes); weights/gguf.py dequantizes on the CPU
        w = dequantize(rows.reshape(-1), self.kind, dtype).to(self.blocks.device)
        return w.view(*index.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, GGUF {self.kind.name} rows"


def int4_from_q4_0(data: torch.Tensor, out_features: int, in_features: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Q4_0 bytes of an (N, K) weight -> Int4Linear's buffers (weight (N, K/2) uint8 as pack_nibbles
    packs, scales_and_zeros (K/32, N, 2) with zero 0): the same (q - 8) * d."""
    N, K = out_features, in_features
    blocks = data.view(N * K // 32, Q4_0_BLOCK)
    d = blocks[:, :2].contiguous().view(torch.float16).view(N, K // 32)
    qs = blocks[:, 2:]  # byte j: value j in the low nibble, value j + 16 in the high one
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).view(N, K)  # (N*K/32, 32) -> (N, K), values 0..15
    sz = torch.stack([d.to(dtype), torch.zeros(N, K // 32, dtype=dtype)], dim=-1)  # (N, K/32, 2)
    return pack_nibbles(q), sz.transpose(0, 1).contiguous()


def load(path: str | os.PathLike, mode: str, *, group_size: int = 128, include_output: bool = True,
         include_embedding: bool = True, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         progress: bool | None = None):  # fmt: skip
    """Load a GGUF file with its linears quantized: Q8_0 weights (mode "int8") and Q4_0 weights (mode
    "int4") copied as they are stored, every other one quantized from its dequantized values
    (see the module docstring). include_output: quantize the output projection too.
    include_embedding: keep a quantized embedding quantized (a QuantizedEmbedding, embedding.py):
    as the mode's module when its type is the one the mode keeps (a tied output is then that same
    module), else as its GGUF rows (GGUFRows; a tied output gets a quantized copy). A float
    embedding, and a tied one when include_output is False, stays in float.
    model.quantization records the mode, what came from GGUF, and the embedding's stored type."""
    check_mode(mode, group_size)
    kept: list[str] = []
    requantized: list[str] = []
    embedding_kind: list[str] = []

    def module_for(name: str, N: int, K: int, kind: GGMLType, dtype) -> tuple[nn.Module, Fill] | None:
        """The quantized module for a weight stored as `kind`, and how to fill it; None: stays in float."""
        if mode == "int8" and kind == GGMLType.Q8_0:
            module = Int8BlockLinear(K, N, device="meta")
            kept.append(name)
            return module, lambda weight: module.load_q8_0(weight.data)
        if mode == "int4" and kind == GGMLType.Q4_0:
            module = Int4Linear(K, N, 32, dtype, device="meta")
            kept.append(name)
            return module, lambda weight: _fill_int4(module, weight.data)
        if mode == "int8" or K % group_size == 0:
            module = Int8Linear(K, N, dtype, "meta") if mode == "int8" else Int4Linear(K, N, group_size, dtype, "meta")
            requantized.append(name)
            return module, lambda weight: _requantize(module, weight, dtype)
        return None  # stays in float, as llama/quantization does with a width the groups do not divide

    def swap(model, dtype, types):
        fills = {}
        names = target_names(model, include_output)  # checks the model before anything changes
        tied = model.config.tie_word_embeddings
        kind = types["tok_embeddings.weight"]
        if include_embedding and kind in BLOCK and not (tied and not include_output):
            V, D = model.tok_embeddings.num_embeddings, model.tok_embeddings.embedding_dim
            if (mode, kind) in (("int8", GGMLType.Q8_0), ("int4", GGMLType.Q4_0)):
                table, fills["tok_embeddings"] = module_for("tok_embeddings", V, D, kind, dtype)
                if tied:  # the output is the table itself: one quantized matrix for both
                    model.output = table
                    names.remove("output")
                    kept.append("output")
            else:
                table = GGUFRows(kind, V, D, device="meta")
                fills["tok_embeddings"] = lambda weight, table=table: table.load_raw(weight.data)
            model.tok_embeddings = QuantizedEmbedding(table, dtype)
            embedding_kind.append(kind.name)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)
            if not isinstance(linear, nn.Linear):
                continue
            made = module_for(name, linear.out_features, linear.in_features, types[f"{name}.weight"], dtype)
            if made is not None:
                setattr(parent, child, made[0])
                fills[name] = made[1]
        return fills

    model = core_gguf.load(path, dtype=dtype, device=device, progress=progress, swap=swap)
    model.quantization = {"mode": mode, "group_size": group_size, "include_output": "output" in kept + requantized,
                          "gguf_kept": len([n for n in kept if n != "tok_embeddings"]),
                          "gguf_requantized": len(requantized),
                          "embedding": embedding_kind[0] if embedding_kind else None}  # fmt: skip
    # No prepare_kernels here: the packing torch's int4 kernel wants is made on a module's first use
    # instead, by the modules that use it (kernels.optimize swaps in ones with their own packing), so
    # that loading does not peak at the int32 copy torch's packing makes of each matrix (1 GB for a
    # 1B model's output projection).
    return model


def _requantize(module: Int8Linear | Int4Linear, weight: core_gguf.StoredWeight, dtype: torch.dtype) -> None:
    """module.load_weight(the weight dequantized to dtype), a slice of rows at a time: the same values
    (both steps work row by row), without the whole float matrix (0.5 GB in bfloat16 for a 1B
    model's output) existing at once."""
    N, K = weight.shape
    row_bytes = weight.data.numel() // N
    int8 = isinstance(module, Int8Linear)
    parts = []
    for rows in _row_chunks(torch.empty(N, K, device="meta")):
        w = dequantize(weight.data[rows.start * row_bytes : min(rows.stop, N) * row_bytes], weight.type, dtype)
        q, scales = quantize_int8(w.view(-1, K)) if int8 else quantize_int4(w.view(-1, K), module.group_size)
        parts.append((q if int8 else pack_nibbles(q), scales))
    if int8:
        module.weight, module.scales = torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]).to(dtype)
    else:  # scales_and_zeros: (K/G, N, 2)
        module.weight = torch.cat([q for q, _ in parts])
        module.scales_and_zeros = torch.cat([sz for _, sz in parts], dim=1).to(dtype)


def _fill_int4(module: Int4Linear, raw: torch.Tensor) -> None:
    module.weight, module.scales_and_zeros = int4_from_q4_0(raw, module.out_features, module.in_features,
                                                            module.scales_and_zeros.dtype)  # fmt: skip
