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
from .files import describe, open_regular

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


# The reference library's limit: a header beyond it is refused before it is read into memory.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """Header of one .safetensors file, validated as the reference library validates it; tensors
    read on demand.

    The tensors' byte ranges, in order of their offsets, must tile the data exactly: each one starts
    where the previous one ends, the first at 0 and the last at the end of the file. So no two
    tensors share bytes (one would silently alias another's weights), and no bytes are unaccounted for.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open_regular(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", prefix)
                if n > size - 8:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors file "
                        f"(header says {n} bytes, file has {size - 8} after the length)"
                    )
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{self.path}: corrupt safetensors file: a header of {n} bytes "
                                          f"(at most {MAX_HEADER_BYTES})")  # fmt: skip
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {describe(e)}") from e
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, a ValueError
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: __metadata__ must map names to strings")
        self.metadata = metadata
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype, shape, begin, end = self._entry(name, info)
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
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
        expected = 0  # where the next tensor must start
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if begin != expected:
                what = "overlaps the tensor before it" if begin < expected else "leaves a gap after the tensor before it"
                raise CheckpointError(f"{self.path}: corrupt header: tensor {name!r} at bytes [{begin}, {end}) "
                                      f"of the data {what} (which ends at {expected})")  # fmt: skip
            expected = end
        if expected != data_size:
            raise CheckpointError(f"{self.path}: corrupt file: the tensors take {expected} bytes of data, "
                                  f"but the file holds {data_size}")  # fmt: skip

    def _entry(self, name: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, each checked for type and sign."""

        def integers(values, count=None) -> list[int] | None:
            ok = isinstance(values, list) and (count is None or len(values) == count)
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
            return values if ok else None

        dtype = DTYPES.get(info.get("dtype")) if isinstance(info, dict) and isinstance(info.get("dtype"), str) else None
        shape = integers(info.get("shape")) if isinstance(info, dict) else None
        offsets = integers(info.get("data_offsets"), 2) if isinstance(info, dict) else None
        if dtype is None or shape is None or offsets is None or offsets[1] < offsets[0]:
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {info!r:.200}")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, in its stored dtype, in fresh CPU memory; with `rows`, only those rows of its first
        dimension (one contiguous byte range: a rank of a tensor-parallel group reads just its part)."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + max(stop, start) * row_bytes
            shape = (max(stop - start, 0), *shape[1:])
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        try:
            with open_regular(self.path) as f:
                f.seek(self.data_start + begin)
                got = f.readinto(buffer.numpy()) if end > begin else 0
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r}: {describe(e)}") from e
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
