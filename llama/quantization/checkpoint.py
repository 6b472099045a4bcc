"""Quantized checkpoints: quantizing while loading, and saving / loading this project's own
quantized format (config.json with a "quantization" entry + model.safetensors holding the
Int8Linear / Int4Linear buffers in Meta's names; see linear.py for the format of each buffer).

    model = load(path, "int8")                                  # any checkpoint, quantized as it is read
    save_quantized(model, "out/", tokenizer_from=path)         # quantize once ...
    model = load_quantized("out/")                              # ... load the small file later

llama.load() dispatches here; this package depends on llama.core, never the reverse.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from weights import CheckpointError
from weights.jsonio import read_json_object
from weights.safetensors_io import SafetensorsFile, save_safetensors

from ..core import checkpoint as core_checkpoint
from ..core.checkpoint import checkpoint_stop_tokens, meta_model
from ..core.config import ConfigError, ModelConfig
from ..core.device import model_dtype
from .linear import check_mode, prepare_kernels, swap_linears


def load(path: str | os.PathLike, mode: str, *, group_size: int = 128, include_output: bool = True,
         dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu", progress: bool | None = None,
         kernels: bool = True):
    """Load a float checkpoint directory, quantizing each block linear (and the output projection
    unless include_output is False; a tied one as a quantized copy) as it is read.

    kernels: make the CPU int4 kernel's packing now (prepare_kernels); False for training (QLoRA),
    whose many-row inputs never use it, which saves a second copy of the int4 weights."""
    check_mode(mode, group_size)
    swapped: list[str] = []

    def swap(model, dtype):
        swapped.extend(swap_linears(model, mode, group_size, include_output, dtype, fill=False))
        return swapped

    model = core_checkpoint.load(path, dtype=dtype, device=device, progress=progress, swap=swap)
    model.quantization = {"mode": mode, "group_size": group_size, "include_output": "output" in swapped}
    if kernels:
        prepare_kernels(model)
    return model


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")  # fmt: skip


def save_quantized(model: nn.Module, path: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None) -> list[Path]:
    """Write a quantized model (quantize_model / load(quantize=...)) as config.json + model.safetensors.

    tokenizer_from: a checkpoint directory whose tokenizer and generation config files are copied.
    Returns the files written.
    """
    info = getattr(model, "quantization", None)
    if info is None:
        raise ValueError("the model is not quantized; call quantize_model() first or load with quantize=...")
    if "gguf_kept" in info:
        raise ValueError("a model loaded from GGUF with quantize= keeps GGUF's own blocks, which this format "
                         "cannot hold; keep the GGUF file, or convert it with scripts/convert.py")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().cpu() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings and not info.get("include_output"):
        state.pop("output.weight", None)  # the embedding itself
    dtype = str(model_dtype(model)).removeprefix("torch.")
    config = model.config.to_hf(dtype) | {"quantization": info}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_safetensors(path / "model.safetensors", state, metadata={"format": "pt"})
    written = [path / "config.json", path / "model.safetensors"]
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy(Path(tokenizer_from) / name, path / name)
                written.append(path / name)
    return written


def read_quantization(path: str | os.PathLike) -> dict | None:
    """The "quantization" entry of a checkpoint directory's config.json, or None."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # the ordinary loader reports it
    return config.get("quantization") if isinstance(config, dict) else None


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu"):
    """A model from save_quantized's files, built on the meta device and filled tensor by tensor, so
    memory stays near the quantized size. Float tensors (embedding, norms, scales) take `dtype`."""
    path = Path(path)
    config_dict = read_json_object(path / "config.json")
    info = config_dict["quantization"]
    if (not isinstance(info, dict) or "mode" not in info or set(info) - {"mode", "group_size", "include_output"}
            or not isinstance(info.get("include_output", False), bool)):  # fmt: skip
        raise CheckpointError(f"{path / 'config.json'}: malformed 'quantization' entry: {info!r}; expected "
                              '{"mode": "int8" | "int4", "group_size": N, "include_output": true | false}')  # fmt: skip
    try:
        check_mode(info["mode"], info.get("group_size", 128))
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    try:
        config = ModelConfig.from_hf(config_dict)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    file = SafetensorsFile(path / "model.safetensors")
    found = set(file.names())
    if "tok_embeddings.weight" not in found:
        raise CheckpointError(f"{file.path}: config.json has a 'quantization' entry, but this is not a quantized "
                              f"checkpoint of this project (its tensors are not in Meta's names: "
                              f"{', '.join(sorted(found)[:3])} ...); an ordinary checkpoint has no such entry")  # fmt: skip
    dtype = dtype or file.dtype("tok_embeddings.weight")
    model = meta_model(config)
    tied = config.tie_word_embeddings and not info.get("include_output", False)  # output still the embedding
    swap_linears(model, info["mode"], info.get("group_size", 128), info.get("include_output", False), dtype, fill=False)
    expected = {n: t for n, t in model.state_dict().items() if not (tied and n == "output.weight")}
    missing, unexpected = [n for n in expected if n not in found], [n for n in found if n not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{file.path}: missing tensors: {missing[:6]}, unexpected tensors: {unexpected[:6]}")
    state = {}
    for name, template in expected.items():
        if file.shape(name) != tuple(template.shape):
            raise CheckpointError(f"{file.path}: tensor {name!r} has shape {list(file.shape(name))}, "
                                  f"but the config expects {list(template.shape)}")  # fmt: skip
        tensor = file.read(name)
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        state[name] = tensor.to(device)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.rope_freqs = model.rope_freqs.to(device)
    model.stop_tokens = checkpoint_stop_tokens(path)
    model.quantization = info
    prepare_kernels(model)
    return model.eval()
