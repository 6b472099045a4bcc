"""Checkpoint formats: files <-> (raw config dict, tensors in Meta's names).

This package knows file layouts, names and the HF rotary permutation, and nothing of the model:
llama/ imports it, never the reverse.

    ckpt = open_checkpoint(path)      # MetaCheckpoint or HFCheckpoint, opened lazily
    ckpt.format, ckpt.config          # "meta" | "hf", the params.json / config.json dict
    ckpt.shapes()                     # {meta name: shape}, before reading any tensor
    ckpt.read(name, dtype)            # one tensor, in Meta's name and row order
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import torch

from .errors import CheckpointError
from .files import describe
from .jsonio import read_json_object
from .hf import HFCheckpoint, save_hf
from .meta import MetaCheckpoint, save_meta

# The small model that ships with the project (trained on the King James Bible; see kjv/README.md).
BUNDLED_MODEL = Path(__file__).parent / "kjv"

__all__ = [
    "BUNDLED_MODEL",
    "CheckpointError",
    "HFCheckpoint",
    "MetaCheckpoint",
    "detect_format",
    "load_state_dict",
    "open_checkpoint",
    "save_hf",
    "save_meta",
]


def detect_format(path: str | os.PathLike) -> str:
    """"meta" for params.json + consolidated.*.pth, "hf" for config.json + *.safetensors; a
    CheckpointError naming the path if the directory or its config file cannot be read as one."""
    path = Path(path)
    try:
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory; a checkpoint is a directory holding params.json "
                                  "+ consolidated.*.pth (Meta) or config.json + model.safetensors (Hugging Face)")
        names = set(os.listdir(path))  # not glob: it skips a directory it cannot read, as if empty
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the directory: {describe(e)}") from e
    meta_shards = any(fnmatch.fnmatchcase(n, "consolidated.*.pth") for n in names)
    hf_shards = any(n.endswith(".safetensors") for n in names)
    if "params.json" in names and (meta_shards or not ("config.json" in names and hf_shards)):
        found = "meta"  # without shards, opening it reports what is missing
    elif "config.json" in names:
        found = "hf"
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint: expected params.json + consolidated.00.pth (Meta) or "
            "config.json + model.safetensors / model.safetensors.index.json (Hugging Face)"
        )
    # A readable JSON object, before anyone else reads it (a FIFO would hang a reader; JSON nested
    # too deeply, or a number of 5000 digits, raises what a plain json.loads caller does not expect).
    read_json_object(path / ("params.json" if found == "meta" else "config.json"))
    return found


def open_checkpoint(path: str | os.PathLike) -> MetaCheckpoint | HFCheckpoint:
    return MetaCheckpoint(path) if detect_format(path) == "meta" else HFCheckpoint(path)


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(format, raw config dict, whole state dict in Meta's names) of a checkpoint directory."""
    ckpt = open_checkpoint(path)
    try:
        return ckpt.format, ckpt.config, {name: ckpt.read(name, dtype) for name in ckpt.shapes()}
    finally:
        ckpt.close()
