"""Meta's checkpoint format: params.json + consolidated.00.pth ... consolidated.NN.pth.

Meta trained and released the models split for model parallelism: each consolidated.NN.pth holds
one rank's slice of every matrix. Merging concatenates the slices tensor by tensor, along the dim
each layer was split on in Meta's code:

    column-parallel (split outputs, dim 0): wq, wk, wv, w1, w3, output
    row-parallel    (split inputs,  dim 1): wo, w2
    tok_embeddings: dim 1 in Llama 1/2 (split on the hidden size), dim 0 in Llama 3 (on the vocab)
    norms: replicated on every rank; taken from shard 0
    rope.freqs (Llama 1/2): a precomputed table, ignored

The .pth files are pickles. They are opened with `weights_only=True`, so a checkpoint can hold only
tensors and plain containers and never runs code, and with `mmap=True`, so a tensor's bytes are read
only when it is copied out.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .files import check_regular, describe
from .jsonio import read_json_object

SHARD_PATTERN = "consolidated.*.pth"
IGNORED = {"rope.freqs"}

_COLUMN_PARALLEL = re.compile(r"(attention\.w[qkv]|feed_forward\.w[13])\.weight$|^output\.weight$")
_ROW_PARALLEL = re.compile(r"(attention\.wo|feed_forward\.w2)\.weight$")


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(SHARD_PATTERN))


def read_params(directory: Path) -> dict:
    return read_json_object(directory / "params.json")


def split_dim(name: str, shard_shape: tuple[int, ...], model_dim: int) -> int | None:
    """The dim a tensor was split on across model-parallel ranks, or None if it is replicated."""
    if name == "tok_embeddings.weight":
        # Llama 1/2 split the embedding on its width, Llama 3 on the vocabulary; a slice that is
        # not `dim` wide was cut along its width.
        return 1 if shard_shape[1] != model_dim else 0
    if _COLUMN_PARALLEL.search(name):
        return 0
    if _ROW_PARALLEL.search(name):
        return 1
    return None


class MetaCheckpoint:
    """A Meta checkpoint directory, opened lazily: shapes are known at once, tensors read on demand."""

    format = "meta"

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        self.config = read_params(self.path)
        self.files = shard_files(self.path)
        if not self.files:
            raise CheckpointError(f"{self.path}: no {SHARD_PATTERN} files beside params.json")
        expected = [f"consolidated.{i:02d}.pth" for i in range(len(self.files))]
        if [f.name for f in self.files] != expected:
            raise CheckpointError(
                f"{self.path}: shard files {[f.name for f in self.files]} are not numbered "
                f"consolidated.00.pth to consolidated.{len(self.files) - 1:02d}.pth"
            )
        self.shards = [_load_pickle(f) for f in self.files]
        dim = self.config.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise CheckpointError(f"{self.path / 'params.json'}: missing or non-integer key 'dim'")

        names0 = [n for n in self.shards[0] if n not in IGNORED]
        for file, shard in zip(self.files[1:], self.shards[1:]):
            names = [n for n in shard if n not in IGNORED]
            if set(names) != set(names0):
                missing = sorted(set(names0) - set(names))[:3]
                extra = sorted(set(names) - set(names0))[:3]
                raise CheckpointError(
                    f"{self.path}: shards disagree: {file.name} lacks {missing} and/or has extra {extra} compared with {self.files[0].name}"
                )

        # The merged shape of every tensor, checked for consistency across shards.
        self.split: dict[str, int | None] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in names0:
            shapes = [tuple(shard[name].shape) for shard in self.shards]
            d = split_dim(name, shapes[0], dim) if len(shapes[0]) == 2 else None
            if d is None:
                if any(s != shapes[0] for s in shapes):
                    raise CheckpointError(f"{self.path}: shards disagree on replicated tensor {name!r}: shapes {shapes}")
                merged = shapes[0]
            else:
                other = [s[:d] + s[d + 1 :] for s in shapes]
                if any(o != other[0] for o in other) or any(len(s) != 2 for s in shapes):
                    raise CheckpointError(
                        f"{self.path}: shards disagree on tensor {name!r}: shapes {shapes} cannot be joined along dim {d}"
                    )
                merged = shapes[0][:d] + (sum(s[d] for s in shapes),) + shapes[0][d + 1 :]
            self.split[name] = d if len(self.shards) > 1 else None
            self._shapes[name] = merged

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def file_of(self, name: str) -> str:
        return ", ".join(str(f) for f in self.files)

    def dtype(self, name: str) -> torch.dtype:
        return self.shards[0][name].dtype

    def read(self, name: str, dtype: torch.dtype | None = None, region: tuple[int, slice] | None = None) -> torch.Tensor:
        """The merged tensor in `dtype` (default: as stored), in fresh CPU memory.

        region: (dim, slice) to read only that part of the merged tensor (a rank of a tensor-parallel
        group). Each shard contributes the part of its slice that falls inside, whatever dim the
        shards were split on, so a rank reads only the bytes it keeps: with as many shards as ranks
        and the same split, exactly its own shard's."""
        shape = self._shapes[name]
        d = self.split[name]
        pieces = [shard[name] for shard in self.shards] if d is not None else [self.shards[0][name]]
        lo, hi = [0] * len(shape), list(shape)  # the box to read, in merged coordinates
        if region is not None:
            dim, part = region
            lo[dim], hi[dim], _ = part.indices(shape[dim])
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=dtype or pieces[0].dtype)
        try:
            offset = 0
            for piece in pieces:
                src, dst = piece, out
                for k in range(len(shape)):  # intersect the piece's box with the wanted one, dim by dim
                    start = offset if k == d else 0
                    a, b = max(lo[k], start), min(hi[k], start + piece.shape[k])
                    if a >= b:
                        break
                    src, dst = src.narrow(k, a - start, b - a), dst.narrow(k, a - lo[k], b - a)
                else:
                    _copy_releasing(dst, src)
                offset += piece.shape[d] if d is not None else 0
        except RuntimeError as e:  # a truncated file surfaces as a bus error or read failure here
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r}: {e}") from e
        return out

    def close(self) -> None:
        self.shards = []


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        check_regular(path)  # torch.load would block on a FIFO
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {describe(e)}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers: never run a file's code.
        # torch's message is a paragraph; keep the line that names the refused object.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors ({detail})") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: expected a dict of tensors by name; keys {bad[:3]!r:.100} are not strings")
    return state


_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # not a POSIX libc (Windows): pages stay until the file closes
    _madvise = None
_MADV_DONTNEED = 4


def _copy_releasing(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = 64 << 20) -> None:
    """dst.copy_(src) in slices of rows, releasing each slice's mapped pages once copied, so that a
    large tensor (an embedding of 0.5 GB) never sits in memory twice."""
    if src.dim() == 0:
        dst.copy_(src)
        return
    rows = max(1, chunk_bytes // max(1, src[0].nbytes))
    for start in range(0, src.shape[0], rows):
        dst[start : start + rows].copy_(src[start : start + rows])
        _release_pages(src[start : start + rows])


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop the memory-mapped pages under a tensor that has been copied out.

    Pages of a file mapping that were read count towards resident memory until the mapping is
    closed, which for a checkpoint means the whole file. Telling the kernel we no longer need them
    keeps peak memory near one copy of the model. The mapping is private and unmodified, so this
    only ever discards clean pages the kernel could re-read from the file.
    """
    if _madvise is None or tensor.numel() == 0 or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.nbytes
    first = -(-start // _PAGE) * _PAGE  # whole pages only: neighbours may share the edge pages
    last = end // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)


def save_meta(
    directory: str | os.PathLike,
    params: dict,
    state_dict: dict[str, torch.Tensor],
    *,
    n_shards: int = 1,
    embedding_split: str = "auto",
) -> list[Path]:
    """Write params.json and consolidated.NN.pth, split into `n_shards` as Meta's layers split them.

    embedding_split: "vocab" (Llama 3), "dim" (Llama 1/2), or "auto" (vocab if it has 128000+
    entries). Returns the files written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dim = params["dim"]
    if embedding_split == "auto":
        embedding_split = "vocab" if state_dict["tok_embeddings.weight"].shape[0] >= 128000 else "dim"
    for key in ("n_heads", "n_kv_heads"):
        if params.get(key, params["n_heads"]) % n_shards:
            raise CheckpointError(f"cannot split {params.get(key)} {key} across {n_shards} shards")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in state_dict.items():
        if name == "tok_embeddings.weight":
            d = 0 if embedding_split == "vocab" else 1
        else:
            d = split_dim(name, tuple(tensor.shape), dim) if tensor.dim() == 2 else None
        if d is None or n_shards == 1:
            for shard in shards:
                shard[name] = tensor.contiguous()
            continue
        if tensor.shape[d] % n_shards:
            raise CheckpointError(f"cannot split tensor {name!r} of shape {list(tensor.shape)} into {n_shards} along dim {d}")
        for shard, piece in zip(shards, tensor.chunk(n_shards, dim=d)):
            shard[name] = piece.clone()  # clone: save only the slice, not the whole storage
    (directory / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    files = [directory / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    for file, shard in zip(files, shards):
        torch.save(shard, file)
    return [directory / "params.json", *files]
