"""`llama.load`: one entry point for every kind of checkpoint this project reads.

It only dispatches: a float checkpoint (Meta or Hugging Face layout) goes to llama.core.checkpoint,
a request to quantize or an already quantized checkpoint to llama.quantization, a GGUF file (by its
first bytes: Ollama's blobs have no suffix) to llama.core.gguf, or llama.quantization.gguf when
quantized, and a LoRA adapter, once the model is loaded, to llama.training.lora. Keeping the choice
here lets the core loader know nothing of quantization (the dependency runs one way).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch

import weights
from weights import CheckpointError
from weights.gguf import is_gguf

from . import quantization
from .core import checkpoint, gguf
from .core import tokenizer as tokenizers
from .core.cache import check_kv_cache_dtype
from .core.config import ModelConfig
from .core.model import Transformer, rope_frequencies
from .training import lora


def load(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    quantize: str | None = None,
    group_size: int = 128,
    quantize_output: bool = True,
    quantize_embedding: bool = True,
    adapter: str | os.PathLike | None = None,
    kv_cache_dtype: str | None = None,
    rope_scaling=None,
) -> Transformer:
    """Load a checkpoint directory or a GGUF file; returns the model in eval mode.

    dtype: float32, bfloat16 or float16 (default: the dtype the weights are stored in).
    progress: show a progress bar (default: for checkpoints over 1 GB when stderr is a terminal).
    quantize: None, "int8" or "int4" (groups of group_size): each linear of the blocks is quantized
        as it is read (see llama/quantization), and so is the output projection unless
        quantize_output is False (a tied one as a quantized copy). A checkpoint written by
        llama.quantization.save_quantized loads already quantized, and then quantize must be None or
        its own mode. A GGUF file's Q8_0 weights load as they are stored with "int8", its Q4_0
        weights with "int4" (see llama/quantization/gguf.py); without quantize, every weight is
        dequantized to dtype (default: float32 for quantized files). With quantize, a GGUF file's
        quantized embedding stays quantized unless quantize_embedding is False (a QuantizedEmbedding:
        llama/quantization/embedding.py; a tied output is then its table).
    adapter: a LoRA adapter directory in peft's layout (scripts/finetune.py's output, or peft's),
        applied after loading: merged into float weights (the model stays a plain Transformer, as
        fast as the base), kept as an unmerged adapter beside quantized ones (llama.training.lora).
    kv_cache_dtype: how the model's KV caches store keys and values unless a call says otherwise:
        "int8" / "fp8" (quantized, see llama/core/cache.py) or a float dtype; None: the weights' dtype.
    rope_scaling: run the weights with another RoPE scaling and context (Transformer.set_rope_scaling:
        "yarn:4", "linear:4", a dict of RopeScaling fields, or "none"); None keeps the checkpoint's.
    """
    check_kv_cache_dtype(kv_cache_dtype)
    model = _load(path, dtype=dtype, device=device, progress=progress, quantize=quantize, group_size=group_size,
                  quantize_output=quantize_output, quantize_embedding=quantize_embedding)  # fmt: skip
    if adapter is not None:
        model = _with_adapter(model, adapter)
    model.kv_cache_dtype = kv_cache_dtype
    if rope_scaling is not None:
        model.set_rope_scaling(rope_scaling)
    return model


def _load(path, *, dtype, device, progress, quantize, group_size, quantize_output, quantize_embedding) -> Transformer:
    if quantize is not None:
        quantization.check_mode(quantize, group_size)
    if is_gguf(path):
        if quantize is not None:
            return quantization.gguf.load(path, quantize, group_size=group_size, include_output=quantize_output,
                                          include_embedding=quantize_embedding, dtype=dtype, device=device,
                                          progress=progress)  # fmt: skip
        return gguf.load(path, dtype=dtype, device=device, progress=progress)
    weights.detect_format(path)  # a readable directory and config file, before anything reads them
    stored = quantization.read_quantization(path)
    if stored is not None:
        if quantize is not None and quantize != stored.get("mode"):
            raise CheckpointError(f"{path} is already quantized as {stored.get('mode')!r}; cannot load it as {quantize!r}")
        return quantization.load_quantized(path, dtype=checkpoint.parse_dtype(dtype), device=device)
    if quantize is not None:
        return quantization.load(path, quantize, group_size=group_size, include_output=quantize_output,
                                 dtype=dtype, device=device, progress=progress)  # fmt: skip
    return checkpoint.load(path, dtype=dtype, device=device, progress=progress)


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The tokenizer of a checkpoint directory, a tokenizer file, or a GGUF file (its metadata)."""
    if is_gguf(path):
        return gguf.load_tokenizer(path)
    return tokenizers.load_tokenizer(path)


def _with_adapter(model: Transformer, adapter: str | os.PathLike) -> Transformer:
    settings = lora.read_base_settings(adapter)
    if settings:  # the base's RoPE / context settings the adapter was trained with
        model = set_config_fields(model, settings)
    lora.load_adapter(model, adapter)
    if not any(isinstance(m.base, (quantization.Int8Linear, quantization.Int4Linear)) for _, m in lora.lora_modules(model)):
        lora.merge_lora(model)
        lora.unload_lora(model)
    return model.eval()


# ModelConfig fields that may change on a loaded model: they change no weight's shape, and
# set_config_fields updates everything the model derived from them.
SETTABLE_FIELDS = ("rope_theta", "rope_scaling", "max_seq_len")


def set_config_fields(model: Transformer, assignments: Sequence[str]) -> Transformer:
    """Apply `field=value` assignments (a CLI's --set) to a loaded model; only SETTABLE_FIELDS (a
    checkpoint's weights fix every other field: their shapes, or modules built from them)."""
    config = model.config.override(assignments)
    changed = [f.name for f in dataclasses.fields(ModelConfig) if getattr(config, f.name) != getattr(model.config, f.name)]
    refused = [name for name in changed if name not in SETTABLE_FIELDS]
    if refused:
        raise ValueError(f"--set {', '.join(refused)}: a loaded checkpoint keeps its architecture; "
                         f"only {', '.join(SETTABLE_FIELDS)} can be set")  # fmt: skip
    model.config = config
    # The only state the model derived from these fields: the rotary frequencies (max_seq_len is
    # read from the config when a cache is made).
    freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    model.rope_freqs = freqs.to(model.rope_freqs.device)
    return model
