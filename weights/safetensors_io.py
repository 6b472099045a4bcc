"""A small safetensors reader that fills tensors with plain file reads.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N
bytes of JSON mapping each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets
relative to the end of the header), then the raw little-endian bytes.

Why not `safetensors.safe_open`? It memory-maps the file, and every page of a mapping that has been
read counts towards the process's resident memory until the mapping closes, so loading a model
through it peaks near twice the model's size. Reading each tensor with `readinto` straight into
its destination keeps the peak near one copy: the file's pages then sit in the OS page cache,
which the kernel can drop, rather than in our address space.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Header of one .safetensors file, validated; tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", prefix)
                if n > size - 8:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors file "
                        f"(header says {n} bytes, file has {size - 8} after the length)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {info!r}") from e
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{self.path}: corrupt header entry for tensor {name!r}: "
                    f"{end - begin} bytes for shape {list(shape)} of {info['dtype']}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data, "
                    f"but the file holds only {data_size}"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in its stored dtype, in fresh CPU memory."""
        dtype, shape, begin, end = self.entries[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(buffer.numpy()) if end > begin else 0
        if got != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        if dtype == torch.bool:
            return buffer.view(torch.bool).view(shape)
        return buffer.view(dtype).view(shape)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write tensors to one .safetensors file (via the reference library), readable by all (0644)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o644)  # the library writes through a private (0600) temporary file
