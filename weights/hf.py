"""Hugging Face's checkpoint format: config.json + model.safetensors (or shards + an index).

Two things differ from Meta's format besides the file types:

1. Names. One table maps them (HF_TO_META below); layer numbers carry over.
2. The rotary layout. Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head; HF's
   rotates halves (x[i], x[i + hd/2]). HF's converter makes its checkpoints work with its layout by
   reordering the rows of wq and wk inside each head: Meta row 2i + j (pair i, member j) becomes
   HF row j * hd/2 + i. Since the rows of wq produce the components of q, the permuted weights
   produce permuted queries and keys, and the dot products attention takes are unchanged. This
   module undoes the reordering on the way in and redoes it on the way out; wk uses the number of
   key/value heads, not the number of query heads. ROTARY_ROWS lists every tensor that follows
   the rotary layout (wq, wk, and the per-head q/k norms of Qwen3-style models).

Both sides of the boundary: HF files hold HF's row order; everything this module returns or is
given is in Meta's order, which is what llama/core/model.py computes with.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import CheckpointError
from .jsonio import read_json_object
from .safetensors_io import SafetensorsFile, save_safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# One table maps the names; {i} is the layer number.
NAMES = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attention.q_norm.weight"),  # Qwen3's per-head norms
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attention.k_norm.weight"),
]

# The tensors whose rows follow the rotary layout of each head, so that HF's layout (rotating halves)
# and Meta's (rotating interleaved pairs) order them differently: Meta name suffix -> the config.json
# key counting the heads they hold. The per-head norms are one vector of hd shared by every head:
# one "head" of hd rows. Everything else is stored alike in both layouts.
ROTARY_ROWS = {
    "attention.wq.weight": "num_attention_heads",  # (H * hd, D)
    "attention.wk.weight": "num_key_value_heads",  # (Hkv * hd, D)
    "attention.q_norm.weight": None,  # (hd,)
    "attention.k_norm.weight": None,  # (hd,)
}
# HF files may carry these buffers; they are derived from the config, never loaded.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_HF_TO_META = [(_pattern(hf), meta) for hf, meta in NAMES]
_META_TO_HF = [(_pattern(meta), hf) for hf, meta in NAMES]


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def hf_to_meta_name(name: str) -> str | None:
    """The Meta name of an HF tensor name, or None if it is not part of a Llama model."""
    return _rename(name, _HF_TO_META)


def meta_to_hf_name(name: str) -> str:
    renamed = _rename(name, _META_TO_HF)
    if renamed is None:
        raise CheckpointError(f"tensor {name!r} has no Hugging Face name")
    return renamed


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF row order (halves) -> Meta row order (interleaved pairs), per head. w: (n * hd, dim) or (n * hd,)."""
    rows, cols = w.shape[0], w[0].numel()
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(w.shape)


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta row order (interleaved pairs) -> HF row order (halves), per head. w: (n * hd, dim) or (n * hd,)."""
    rows, cols = w.shape[0], w[0].numel()
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(w.shape)


def rotary_heads(name: str, config: dict) -> int | None:
    """For a Meta-named tensor in ROTARY_ROWS, the number of heads its rows hold (read from the
    config.json dict); None for every other tensor."""
    for suffix, key in ROTARY_ROWS.items():
        if name.endswith(suffix):
            if key is None:
                return 1
            return _heads(config, key, "num_attention_heads" if key == "num_key_value_heads" else None)
    return None


def read_config(directory: Path) -> dict:
    return read_json_object(directory / "config.json")


def _heads(config: dict, key: str, fallback: str | None = None, where: str | Path = "config.json") -> int:
    value = config.get(key, config.get(fallback) if fallback else None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: missing or invalid {key!r}: {value!r}")
    return value


class HFCheckpoint:
    """An HF checkpoint directory, opened lazily, presented in Meta's names and RoPE layout."""

    format = "hf"

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        self.config = read_config(self.path)
        self.n_heads = _heads(self.config, "num_attention_heads", where=self.path / "config.json")
        self.n_kv_heads = _heads(self.config, "num_key_value_heads", "num_attention_heads", self.path / "config.json")

        index_path = self.path / INDEX
        if index_path.exists():
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index_path}: malformed index: 'weight_map' is not an object of tensor name -> file name")
            files = {}
            for file in sorted(set(weight_map.values())):
                if Path(file).name != file:  # a bare file name: never a path out of the checkpoint
                    raise CheckpointError(f"{index_path}: shard {file!r} is not a file name in {self.path}")
                if not (self.path / file).exists():
                    raise CheckpointError(f"{index_path}: lists shard {file!r}, which does not exist")
                files[file] = SafetensorsFile(self.path / file)
            self.files = list(files.values())
            # Every tensor the index names must be in the file it names, and nowhere else.
            located: dict[str, SafetensorsFile] = {}
            for hf_name, file in weight_map.items():
                if hf_name not in files[file].entries:
                    raise CheckpointError(f"{index_path}: says {hf_name!r} is in {file}, but that file has no such tensor")
                located[hf_name] = files[file]
            for file in self.files:
                for hf_name in file.entries:
                    if hf_name not in weight_map:
                        raise CheckpointError(f"{file.path}: tensor {hf_name!r} is missing from {INDEX}")
        else:
            single = self.path / SINGLE
            if not single.exists():
                raise CheckpointError(f"{self.path}: no {SINGLE} or {INDEX} beside config.json")
            self.files = [SafetensorsFile(single)]
            located = {hf_name: self.files[0] for hf_name in self.files[0].entries}

        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        unknown = []
        for hf_name, file in located.items():
            if IGNORED.fullmatch(hf_name):
                continue
            name = hf_to_meta_name(hf_name)
            if name is None:
                unknown.append(f"{hf_name!r} (in {file.path.name})")
                continue
            self._where[name] = (file, hf_name)
        # Reported when the tensors are first asked for, so that a config that is not a Llama's
        # (another model family, whose tensors these are) is reported first, by the config reader.
        self._unknown = unknown

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._unknown:
            raise CheckpointError(f"{self.path}: unexpected tensors {', '.join(self._unknown[:5])}")
        return {name: file.shape(hf_name) for name, (file, hf_name) in self._where.items()}

    def file_of(self, name: str) -> str:
        file, hf_name = self._where[name]
        return f"{file.path} ({hf_name})"

    def dtype(self, name: str) -> torch.dtype:
        file, hf_name = self._where[name]
        return file.dtype(hf_name)

    def read(self, name: str, dtype: torch.dtype | None = None, region: tuple[int, slice] | None = None) -> torch.Tensor:
        """The tensor in `dtype` (default: as stored), in Meta's name and row order.

        region: (dim, slice) to read only part of it (a rank of a tensor-parallel group). Rows are read
        as one byte range; columns a block of rows at a time, so the whole tensor is never in memory.
        A tensor in the rotary row order is cut at whole heads, which both layouts keep together."""
        file, hf_name = self._where[name]
        heads = rotary_heads(name, self.config)
        if region is None or region[0] == 0:
            rows = None if region is None else region[1]
            tensor = file.read(hf_name, rows)
            if heads is not None:
                total = file.shape(hf_name)[0]
                tensor = permute_to_meta(tensor, heads * tensor.shape[0] // total)
        else:
            dim, cols = region
            shape = file.shape(hf_name)
            if dim != 1 or len(shape) != 2 or heads is not None:
                raise CheckpointError(f"{self.file_of(name)}: cannot read a region along dim {dim} of {list(shape)}")
            start, stop, _ = cols.indices(shape[1])
            tensor = torch.empty(shape[0], stop - start, dtype=dtype or file.dtype(hf_name))
            block = max(1, (64 << 20) // max(1, shape[1] * file.dtype(hf_name).itemsize))
            for first in range(0, shape[0], block):
                part = file.read(hf_name, slice(first, first + block))
                tensor[first : first + block] = part[:, start:stop]
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def close(self) -> None:
        pass


def save_hf(
    directory: str | os.PathLike,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write config.json and model.safetensors (or shards and an index) from a Meta-named state dict.

    `config` is a transformers config.json dict; its head counts drive the q/k permutation, and with
    tie_word_embeddings set, output.weight is not written. Returns the files written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "output.weight" and config.get("tie_word_embeddings"):
            continue
        heads = rotary_heads(name, config)
        if heads is not None:
            tensor = permute_to_hf(tensor, heads)
        tensors[meta_to_hf_name(name)] = tensor.contiguous()

    # Greedy sharding in name order, each shard at most max_shard_bytes (one big tensor may exceed it).
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for hf_name, tensor in tensors.items():
        if max_shard_bytes and shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_name] = tensor
        size += tensor.nbytes

    dtypes = {t.dtype for t in tensors.values()}
    config = dict(config)
    if len(dtypes) == 1:
        config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    written = [directory / "config.json"]
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_safetensors(directory / SINGLE, shards[0], metadata)
        return [*written, directory / SINGLE]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(directory / file, shard, metadata)
        written.append(directory / file)
        weight_map.update({hf_name: file for hf_name in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, directory / INDEX]

