"""GGUF, llama.cpp's one-file model format: a memory-mapped reader and a writer.

This module knows the file layout and the tensor encodings, nothing of the model: it returns
metadata as a dict and tensors under their GGUF names (`blk.0.attn_q.weight`). llama/core/gguf.py
maps those onto ModelConfig and Meta's names.

Layout (all little-endian; the spec is ggml's docs/gguf.md):

    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv metadata entries:   key (string) | value type u32 | value
    n_tensors tensor infos:  name (string) | n_dims u32 | dims u64 x n_dims | type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data; every offset (counted from
    the start of the data) is a multiple of the alignment.

A string is a u64 byte length and UTF-8 bytes; an array an element type u32, a u64 count and the
elements. Version 1 (u32 counts) and big-endian files are refused.

Shapes. GGUF lists dimensions innermost first (ne[0] is the length of a row); this module speaks
torch's order, so a linear weight stored with ne = [K, N] is read as (N, K), the matrix nn.Linear
holds. Quantized types encode each row as blocks of BLOCK[type][0] values, so a row's length must
be a multiple of that.

Row order of wq and wk. Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head and
llama.cpp's rope (its "normal" mode, the one for architecture "llama") does the same, so GGUF files
store attn_q / attn_k rows in Meta's order: llama.cpp's converter undoes Hugging Face's permutation
(convert_hf_to_gguf.py, LlamaModel.permute). This project's model uses Meta's order too, so no
permutation happens at this boundary, either way.

Tensor types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32 with one fp16 scale,
and a min for the _1 kinds) and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256
with 6- or 8-bit sub-block scales). dequantize() gives, bit for bit in float32, what the `gguf`
package's reference code (gguf/quants.py, mirroring ggml-quants.c) gives: the same float32
operations in the same order. Types written: F32, F16, BF16 and Q8_0, whose quantize_q8_0 is
ggml's quantize_row_q8_0_ref to the bit.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
QK_K = 256  # values in a K-quant super-block


class GGMLType(IntEnum):
    """ggml's tensor types (ggml.h, enum ggml_type); ids 4, 5 and 31-33, 36-38 were removed."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (values per block, bytes per block) of every type, read or not: the layout check needs them all.
BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56),
    GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66), GGMLType.MXFP4: (32, 17),
}  # fmt: skip


class ValueType(IntEnum):
    """Types of metadata values (gguf.md, enum gguf_metadata_value_type)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}  # fmt: skip


# ---- dequantization ---------------------------------------------------------------------------------
#
# Each function takes the blocks of one type as uint8 (n, bytes per block) and returns float32
# (n, values per block), in the order of gguf/quants.py so that every float32 result is the same.

_NIBBLES = torch.tensor([0, 4], dtype=torch.uint8)
_CRUMBS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)  # 2-bit fields of a byte
_BITS = torch.arange(8, dtype=torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32: one fp16 number per block."""
    return b.contiguous().view(torch.float16).float()


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """The fields of each block, consecutive byte ranges of the given sizes (the rest last)."""
    return list(torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1))


def _low_high_nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, B) bytes -> (n, 2B) 4-bit values: for each run of `group` bytes, their low nibbles then
    their high nibbles (how ggml lays out 4-bit blocks: value j and value j + group share a byte)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _NIBBLES.view(1, 1, 2, 1)  # (n, runs, 2, group)
    return (q & 0x0F).reshape(n, -1)


def _high_bits(qh: torch.Tensor, n_values: int) -> torch.Tensor:
    """(n, B) bytes of bit masks -> (n, 8B) bits, bit b of byte i being value 8i + b (Q5_0, Q5_1)."""
    return ((qh.unsqueeze(-1) >> _BITS) & 1).reshape(qh.shape[0], n_values)


def _dequantize_q4_0(blocks):  # d (fp16) | 16 bytes of 4-bit q: x = d * (q - 8)
    d, qs = _split(blocks, 2)
    q = _low_high_nibbles(qs, 16).to(torch.int8) - 8
    return _f16(d) * q.float()


def _dequantize_q4_1(blocks):  # d | m | 16 bytes of q: x = d * q + m
    d, m, qs = _split(blocks, 2, 2)
    return _f16(d) * _low_high_nibbles(qs, 16).float() + _f16(m)


def _dequantize_q5_0(blocks):  # d | 4 bytes: bit 4 of each q | 16 bytes: bits 0-3: x = d * (q - 16)
    d, qh, qs = _split(blocks, 2, 4)
    q = (_low_high_nibbles(qs, 16) | (_high_bits(qh, 32) << 4)).to(torch.int8) - 16
    return _f16(d) * q.float()


def _dequantize_q5_1(blocks):  # d | m | qh | qs: x = d * q + m
    d, m, qh, qs = _split(blocks, 2, 2, 4)
    q = _low_high_nibbles(qs, 16) | (_high_bits(qh, 32) << 4)
    return _f16(d) * q.float() + _f16(m)


def _dequantize_q8_0(blocks):  # d | 32 int8: x = q * d
    d, qs = _split(blocks, 2)
    return qs.contiguous().view(torch.int8).float() * _f16(d)


def _dequantize_q2_k(blocks):
    # 16 bytes of scales (4-bit scale, 4-bit min per 16 values) | 64 bytes of 2-bit q | d | dmin
    n = blocks.shape[0]
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2)
    dl = (_f16(d) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).view(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _CRUMBS.view(1, 1, 4, 1)) & 3  # (n, 2, 4, 32)
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, QK_K)


def _dequantize_q3_k(blocks):
    # 32 bytes hmask (bit 2 of each q, inverted) | 64 bytes of 2-bit q | 12 bytes of 6-bit scales | d
    n = blocks.shape[0]
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12)
    low, high = scales[:, :8], scales[:, 8:]  # low 4 bits of the 16 scales, then their top 2 bits
    low = (low.reshape(n, 1, 8) >> _NIBBLES.view(1, 2, 1)).reshape(n, 16)
    high = (high.reshape(n, 1, 4) >> _CRUMBS.view(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (_f16(d) * sc.float()).view(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _CRUMBS.view(1, 1, 4, 1)).reshape(n, 16, 16)) & 3
    qh = ((hmask.reshape(n, 1, 1, 32) >> _BITS.view(1, 1, 8, 1)).reshape(n, 16, 16) & 1) ^ 1
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)  # the offset is 4 where the mask bit is 0
    return (dl * q.float()).reshape(n, QK_K)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of Q4_K / Q5_K -> (n, 8) 6-bit scales and (n, 8) 6-bit mins. Bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins;
    bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dequantize_q4_k(blocks):  # d | dmin | 12 bytes of scales | 128 bytes of 4-bit q: x = d*sc*q - dmin*m
    n = blocks.shape[0]
    d, dmin, scales, qs = _split(blocks, 2, 2, 12)
    sc, mn = _k_scales(scales)
    d = (_f16(d) * sc.float()).view(n, 8, 1)
    dm = (_f16(dmin) * mn.float()).view(n, 8, 1)
    q = _low_high_nibbles(qs, 32).view(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _dequantize_q5_k(blocks):  # d | dmin | scales | 32 bytes: bit 4 of q | 128 bytes: bits 0-3
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, QK_K // 8)
    sc, mn = _k_scales(scales)
    d = (_f16(d) * sc.float()).view(n, 8, 1)
    dm = (_f16(dmin) * mn.float()).view(n, 8, 1)
    ql = _low_high_nibbles(qs, 32).view(n, 8, 32)
    high = ((qh.reshape(n, 1, 1, 32) >> _BITS.view(1, 1, 8, 1)) & 1).reshape(n, 8, 32)
    return (d * (ql | (high << 4)).float() - dm).reshape(n, QK_K)


def _dequantize_q6_k(blocks):
    # 128 bytes: bits 0-3 | 64 bytes: bits 4-5 | 16 int8 scales | d: x = d * scale * (q - 32)
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    d = (_f16(d) * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> _NIBBLES.view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _CRUMBS.view(1, 1, 4, 1)) & 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.view(n, 16, 16).float()).reshape(n, QK_K)


_DEQUANTIZE = {
    GGMLType.Q4_0: _dequantize_q4_0, GGMLType.Q4_1: _dequantize_q4_1, GGMLType.Q5_0: _dequantize_q5_0,
    GGMLType.Q5_1: _dequantize_q5_1, GGMLType.Q8_0: _dequantize_q8_0, GGMLType.Q2_K: _dequantize_q2_k,
    GGMLType.Q3_K: _dequantize_q3_k, GGMLType.Q4_K: _dequantize_q4_k, GGMLType.Q5_K: _dequantize_q5_k,
    GGMLType.Q6_K: _dequantize_q6_k,
}  # fmt: skip
_FLOATS = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
READABLE = (*_FLOATS, *_DEQUANTIZE)
WRITABLE = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0)

CHUNK_BLOCKS = 1 << 15  # blocks dequantized at a time: float32 temporaries of a few MB


def dequantize(data: torch.Tensor, kind: GGMLType, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data: the raw bytes of n values of type `kind` (1-D uint8) -> (n,) in `dtype`, via float32."""
    kind = GGMLType(kind)
    if kind in _FLOATS:
        return data.view(_FLOATS[kind]).to(dtype, copy=True)
    if kind not in _DEQUANTIZE:
        raise ValueError(f"tensor type {kind.name} cannot be dequantized here; readable: "
                         f"{', '.join(t.name for t in READABLE)}")  # fmt: skip
    values, size = BLOCK[kind]
    blocks = data.view(-1, size)
    out = torch.empty(blocks.shape[0] * values, dtype=dtype)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = _DEQUANTIZE[kind](blocks[start : start + CHUNK_BLOCKS])
        out[start * values : start * values + chunk.numel()] = chunk.reshape(-1)
    return out


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """(..., K) float, K a multiple of 32 -> the Q8_0 bytes (1-D uint8), as ggml's
    quantize_row_q8_0_ref: per block d = max|x| / 127, q = roundf(x / d) (halves away from zero,
    computed as x * (1 / d) in float32), and d stored as fp16."""
    blocks = w.reshape(-1, 32)
    out = torch.empty(blocks.shape[0], 34, dtype=torch.uint8)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):  # float32 temporaries of a few MB
        x = blocks[start : start + CHUNK_BLOCKS].float()
        d = x.abs().amax(dim=1, keepdim=True) / 127  # (n, 1)
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = x * inverse
        a = v.abs()
        whole = torch.floor(a)
        q = torch.sign(v) * (whole + torch.floor(2 * (a - whole)))  # roundf, without the error of floor(a + 0.5)
        out[start : start + x.shape[0], :2] = d.to(torch.float16).view(torch.uint8)
        out[start : start + x.shape[0], 2:] = q.to(torch.int8).view(torch.uint8)
    return out.reshape(-1)


def encode(w: torch.Tensor, kind: GGMLType) -> torch.Tensor:
    """A float tensor as the bytes of type `kind` (one of WRITABLE), row-major (1-D uint8)."""
    kind = GGMLType(kind)
    if kind == GGMLType.Q8_0:
        if w.shape[-1] % 32:
            raise ValueError(f"Q8_0 needs rows whose length is a multiple of 32, got shape {list(w.shape)}")
        return quantize_q8_0(w)
    if kind not in _FLOATS:
        raise ValueError(f"cannot write tensor type {kind.name}; writable: {', '.join(t.name for t in WRITABLE)}")
    return w.detach().to(_FLOATS[kind]).contiguous().reshape(-1).view(torch.uint8)


# ---- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. shape is in torch's order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int  # absolute, in the file
    nbytes: int


class _Cursor:
    """Reads the header fields from the mapped file, with errors naming the file and the place."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.pos = buffer, path, 0
        self.where = "the header"

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated GGUF file: it ends inside {self.where} "
                                  f"(at byte {len(self.buffer)})")  # fmt: skip
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated GGUF file: a string of {n} bytes in {self.where} "
                                  f"runs past the end of the file")  # fmt: skip
        raw = bytes(self.buffer[self.pos : self.pos + n])
        self.pos += n
        # Token texts need not be valid UTF-8; surrogateescape keeps every byte (and writes it back).
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.unpack(_SCALAR[ValueType(kind)])
        if kind == ValueType.STRING:
            return self.string()
        if kind == ValueType.ARRAY:
            element, count = self.unpack("<I"), self.unpack("<Q")
            if element in _SCALAR:
                fmt = _SCALAR[ValueType(element)]
                size = struct.calcsize(fmt)
                if self.pos + count * size > len(self.buffer):
                    raise CheckpointError(f"{self.path}: truncated GGUF file: an array of {count} values in "
                                          f"{self.where} runs past the end of the file")  # fmt: skip
                values = np.frombuffer(self.buffer, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += count * size
                return values
            if element == ValueType.STRING:
                if count > len(self.buffer) - self.pos:  # each string takes at least 8 bytes
                    raise CheckpointError(f"{self.path}: truncated GGUF file: an array of {count} strings in "
                                          f"{self.where} runs past the end of the file")  # fmt: skip
                return [self.string() for _ in range(count)]
            if element == ValueType.ARRAY:
                return [self.value(ValueType.ARRAY) for _ in range(count)]
            raise CheckpointError(f"{self.path}: {self.where} is an array of unknown value type {element}")
        raise CheckpointError(f"{self.path}: {self.where} has unknown value type {kind}")


class GGUFFile:
    """A GGUF file, memory-mapped: header, metadata and tensor table read and checked on opening,
    tensors on demand.

        f = GGUFFile("model.gguf")
        f.metadata["llama.block_count"], f.value_types["llama.block_count"]   # 16, ValueType.UINT32
        f.tensors["blk.0.attn_q.weight"]     # TensorInfo(shape=(2048, 2048), type=GGMLType.Q4_0, ...)
        f.read("blk.0.attn_q.weight", torch.bfloat16)    # dequantized copy
        f.raw("blk.0.attn_q.weight")          # its bytes (a copy), for keeping it quantized

    Every tensor's place is checked against the file and the tensors around it, so a truncated file or
    a size that disagrees with a type and shape is reported on opening, naming the tensor. Pages read
    are handed back after each read (madvise), so reading a whole model holds at most one tensor's
    pages of the file in this process's resident memory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from e
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 4 or self._file.read(4) != MAGIC:
                raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            # MAP_PRIVATE (ACCESS_COPY): a writable view for torch.frombuffer; nothing is ever written.
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._map, self.path)
        c.pos = 4
        self.version = c.unpack("<I")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise CheckpointError(f"{self.path}: GGUF version {self.version}{hint} is not supported; expected 2 or 3")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, ValueType] = {}
        for i in range(n_kv):
            c.where = f"metadata entry {i}"
            key = c.string()
            c.where = f"metadata key {key!r}"
            kind = c.unpack("<I")
            self.metadata[key] = c.value(kind)
            self.value_types[key] = ValueType(kind)
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(self.alignment, int) or self.alignment <= 0 or self.alignment % 8:
            raise CheckpointError(f"{self.path}: general.alignment must be a positive multiple of 8, "
                                  f"got {self.alignment!r}")  # fmt: skip
        infos = []
        for i in range(n_tensors):
            c.where = f"tensor info {i}"
            name = c.string()
            c.where = f"the tensor info of {name!r}"
            n_dims = c.unpack("<I")
            if n_dims > 8:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions; at most 8 are possible")
            dims = [c.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), c.unpack("<I"), c.unpack("<Q")))
        data_start = -(-c.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, kind, offset in infos:
            if name in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
            try:
                kind = GGMLType(kind)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown tensor type {kind}") from None
            values, block_bytes = BLOCK[kind]
            row = shape[-1] if shape else 1
            if row % values:
                raise CheckpointError(f"{self.path}: tensor {name!r} of type {kind.name} has rows of {row} values, "
                                      f"not a multiple of its block size {values}")  # fmt: skip
            if offset % self.alignment:
                raise CheckpointError(f"{self.path}: tensor {name!r} starts at offset {offset}, "
                                      f"not a multiple of the alignment {self.alignment}")  # fmt: skip
            nbytes = int(np.prod(shape, dtype=np.int64)) // values * block_bytes
            self.tensors[name] = TensorInfo(name, shape, kind, data_start + offset, nbytes)
        # Each tensor must fit before the next one starts and inside the file: this is where a size
        # that disagrees with the type and shape (or a cut-off file) shows.
        ordered = sorted(self.tensors.values(), key=lambda t: t.offset)
        for info, following in zip(ordered, [*ordered[1:], None]):
            end = info.offset + info.nbytes
            if following is not None and end > following.offset:
                raise CheckpointError(
                    f"{self.path}: tensor {info.name!r} ({info.type.name}, shape {list(info.shape)}) needs "
                    f"{info.nbytes} bytes, but the next tensor, {following.name!r}, starts "
                    f"{following.offset - info.offset} bytes after it: size and type/shape disagree")
            if end > size:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor {info.name!r} ({info.type.name}, shape "
                    f"{list(info.shape)}) ends at byte {end}, but the file has {size} bytes")

    # -- tensors ---------------------------------------------------------------------------------------

    def _bytes(self, info: TensorInfo) -> torch.Tensor:
        """A view of a tensor's bytes in the mapping (1-D uint8). Callers copy and then _release."""
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def _release(self, info: TensorInfo) -> None:
        """Drop the pages of a tensor from this process's resident memory (they stay in the OS cache)."""
        if hasattr(mmap, "MADV_DONTNEED") and info.nbytes:
            start = info.offset - info.offset % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    def raw(self, name: str) -> torch.Tensor:
        """A copy of the tensor's bytes as stored (1-D uint8)."""
        info = self._info(name)
        data = self._bytes(info).clone()
        self._release(info)
        return data

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, dequantized, in torch's shape. dtype: default float32 for quantized types and
        the stored type for F32 / F16 / BF16."""
        info = self._info(name)
        if info.type not in READABLE:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {info.type.name}, which this reader "
                                  f"cannot dequantize; readable: {', '.join(t.name for t in READABLE)}")  # fmt: skip
        dtype = dtype or _FLOATS.get(info.type, torch.float32)
        out = dequantize(self._bytes(info), info.type, dtype).view(info.shape)
        self._release(info)
        return out

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with GGUF's magic (Ollama's blobs have no .gguf suffix)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# ---- writing ----------------------------------------------------------------------------------------


def _pack_value(kind: ValueType, value: Any, key: str) -> bytes:
    if kind in _SCALAR:
        try:
            return struct.pack(_SCALAR[kind], value)
        except struct.error as e:
            raise ValueError(f"GGUF metadata {key!r}: {value!r} does not fit {kind.name}: {e}") from None
    if kind == ValueType.STRING:
        raw = value.encode("utf-8", errors="surrogateescape")
        return struct.pack("<Q", len(raw)) + raw
    raise ValueError(f"GGUF metadata {key!r}: cannot write a value of type {kind.name}")


def _infer_type(value: Any, key: str) -> ValueType:
    """The GGUF type llama.cpp's converter gives a Python value: bool, uint32 (int32 if negative),
    float32, string."""
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        return ValueType.UINT32 if value >= 0 else ValueType.INT32
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    raise ValueError(f"GGUF metadata {key!r}: cannot write {type(value).__name__} value {value!r:.80}")


def _encode_entry(key: str, value: Any) -> bytes:
    """A value is a Python scalar (its type inferred), a list (an array: strings, float32, or int32
    numbers), or a (ValueType, value) pair; an array's element type as (ValueType.ARRAY, (element
    type, values))."""
    out = _pack_value(ValueType.STRING, key, key)
    if isinstance(value, tuple):
        kind, value = value
    else:
        kind = ValueType.ARRAY if isinstance(value, (list, np.ndarray)) else _infer_type(value, key)
    if kind != ValueType.ARRAY:
        return out + struct.pack("<I", kind) + _pack_value(ValueType(kind), value, key)
    if isinstance(value, tuple):
        element, values = value
    else:
        values = list(value)
        first = values[0] if values else ""
        element = (ValueType.STRING if isinstance(first, str) else ValueType.FLOAT32 if isinstance(first, float)
                   else ValueType.BOOL if isinstance(first, bool) else ValueType.INT32)  # fmt: skip
    out += struct.pack("<IIQ", ValueType.ARRAY, element, len(values))
    if element in _SCALAR:
        try:
            return out + np.asarray(values, dtype=np.dtype(_SCALAR[ValueType(element)])).tobytes()
        except (ValueError, OverflowError, TypeError) as e:
            raise ValueError(f"GGUF metadata {key!r}: values do not fit {ValueType(element).name}: {e}") from None
    return out + b"".join(_pack_value(ValueType(element), v, key) for v in values)


def write_gguf(
    path: str | os.PathLike,
    metadata: Mapping[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor, GGMLType]],
    *,
    alignment: int = DEFAULT_ALIGNMENT,
) -> Path:
    """Write a GGUF v3 file: `metadata` (see _encode_entry for the value types) and `tensors`,
    (GGUF name, float tensor in torch's shape, type to store it as) in file order.
    general.alignment is written only when it differs from the default, as llama.cpp does."""
    path = Path(path)
    tensors = [(name, tensor, GGMLType(kind)) for name, tensor, kind in tensors]
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = (ValueType.UINT32, alignment)
    header = MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_encode_entry(key, value) for key, value in metadata.items())
    offset = 0
    for name, tensor, kind in tensors:
        if kind not in WRITABLE:
            raise ValueError(f"tensor {name!r}: cannot write type {kind.name}; writable: "
                             f"{', '.join(t.name for t in WRITABLE)}")  # fmt: skip
        values, block_bytes = BLOCK[kind]
        shape = tuple(tensor.shape)
        if shape and shape[-1] % values:
            raise ValueError(f"tensor {name!r}: {kind.name} needs rows whose length is a multiple of {values}, "
                             f"got shape {list(shape)}")  # fmt: skip
        header += _pack_value(ValueType.STRING, name, name)
        header += struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        header += struct.pack("<IQ", kind, offset)
        nbytes = tensor.numel() // values * block_bytes
        offset += -(-nbytes // alignment) * alignment
    with open(path, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % alignment))
        for _, tensor, kind in tensors:  # encoded one at a time: memory holds one tensor's bytes
            data = encode(tensor, kind)
            f.write(data.numpy())
            f.write(b"\0" * (-data.numel() % alignment))
    return path
