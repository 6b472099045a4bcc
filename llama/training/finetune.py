"""Fine-tuning a released checkpoint: which weights train, in which form, with how much memory.

    spec = FinetuneSpec(method="qlora", quantize="int4", gradient_checkpointing=True)
    model = load_for_finetuning("path/to/Llama-3.2-1B", spec, dtype="bfloat16")
    result = loop.train(model, InstructionBatches(...), TrainConfig(...), run=spec.describe())
    save_adapter(model, "out")                       # lora / qlora; `full` saves the whole checkpoint

Three methods:

- full:  every weight trains (or only the blocks in `layers`); AdamW keeps two moments per weight,
         so memory is about 4x the weights (weights, gradients, two moments) plus activations.
- lora:  the checkpoint frozen in its dtype, low-rank adapters on the chosen projections train
         (llama/training/lora.py); gradients and optimiser state exist only for the adapters.
- qlora: as lora, with the frozen base quantized to int8 or int4 while loading
         (llama/quantization/; Dettmers et al., 2023, who use a 4-bit NormalFloat where this
         project has its own int4). The base's gradients flow to its inputs through QuantizedMatmul,
         which dequantizes one layer at a time; no float copy of the base is ever whole in memory.
         The embedding and the output projection are quantized too (qlora.py; the
         paper keeps them in float: quantize_embedding=False).

Activation checkpointing (any method) keeps only each block's input during the forward pass and
recomputes the block's insides during the backward pass: activation memory falls from
"every block's intermediate tensors" to "one block's plus the block inputs", for about one more
forward pass of compute.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.checkpoint import load as load_checkpoint
from ..core.checkpoint import release_freed_memory, save_state_dict
from ..core.model import Transformer, TransformerBlock
from .. import quantization
from ..loading import load, set_config_fields
from ..quantization.linear import Int4Linear, Int8Linear
from .lora import DEFAULT_TARGETS, apply_lora, resolve_targets
from .qlora import rowwise_int4, swap_embedding

# A checkpoint's tokenizer and generation settings, copied beside a checkpoint fine-tuning writes.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "original/tokenizer.model")  # fmt: skip

METHODS = ("lora", "qlora", "full")


@dataclass(frozen=True)
class FinetuneSpec:
    """What trains, and how the frozen part is held."""

    method: str = "lora"  # lora | qlora | full
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # HF or Meta names (lora.TARGETS)
    rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    quantize: str | None = None  # qlora: int8 | int4
    group_size: int = 64  # int4 group size
    layers: tuple[int, ...] | None = None  # blocks that train (full) or get adapters (lora); None: all
    gradient_checkpointing: bool = False
    adapter_dtype: str = "float32"  # of LoRA's A and B
    # qlora: the embedding (and the output projection, tied or not) quantized too, unless an adapter
    # goes on the output projection (lm_head), which then stays in float
    quantize_embedding: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "qlora" and self.quantize not in ("int8", "int4"):
            raise ValueError(f"qlora needs quantize int8 or int4, got {self.quantize!r}")
        if self.method != "qlora" and self.quantize is not None:
            raise ValueError(f"quantize={self.quantize!r} is for method qlora (the frozen base quantized), not {self.method}")
        if self.method != "full":
            resolve_targets(self.lora_targets)  # unknown names refused now, before loading anything
        if self.adapter_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"adapter_dtype must be float32 or bfloat16, got {self.adapter_dtype!r}")

    def describe(self) -> dict[str, Any]:
        """The fields that matter to this method (for summaries and the resume check)."""
        data = dataclasses.asdict(self)
        if self.method == "full":
            return {k: data[k] for k in ("method", "layers", "gradient_checkpointing")}
        if self.method == "lora":
            data = {k: v for k, v in data.items() if k not in ("quantize", "group_size", "quantize_embedding")}
        return data

    @property
    def quantizes_embedding(self) -> bool:
        """Whether loading quantizes the embedding and the output projection (see quantize_embedding)."""
        return self.method == "qlora" and self.quantize_embedding and "output" not in resolve_targets(self.lora_targets)


def load_for_finetuning(path: str | os.PathLike, spec: FinetuneSpec, *, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu", set_fields: Sequence[str] = (), seed: int = 0,
                        rope_scaling=None) -> Transformer:  # fmt: skip
    """Load a checkpoint prepared for `spec`: quantized (qlora), with fresh adapters (lora, qlora;
    seeded by `seed`) or with the chosen blocks trainable (full), with activation checkpointing if
    asked, in train mode. set_fields: ModelConfig `field=value` assignments (loading.set_config_fields).
    rope_scaling: a scaling and the context it gives, as llama.load(rope_scaling=) takes it ("linear:4",
    "yarn:4", a RopeScaling): fine-tuning to a longer context."""
    if spec.quantizes_embedding and quantization.read_quantization(path) is None:
        # Every frozen matrix quantized as it is read: the blocks' projections, the embedding table,
        # and the output projection (a tied one is the embedding's table itself:
        # qlora.py); no int4 kernel packing (see below).
        def swap(model, dtype):
            tied = model.config.tie_word_embeddings
            names = quantization.swap_linears(model, spec.quantize, spec.group_size, include_output=not tied,
                                              dtype=dtype, fill=False)  # fmt: skip
            return names + swap_embedding(model, spec.quantize, spec.group_size, dtype)

        model = load_checkpoint(path, dtype=dtype, device=device, swap=swap)
        model.quantization = {"mode": spec.quantize, "group_size": spec.group_size, "include_output": True}
        release_freed_memory()
    elif spec.method == "qlora" and quantization.read_quantization(path) is None:
        # As QLoRA does: the blocks' projections quantized, the output projection kept in float (a
        # tied one stays the embedding itself, no copy), and no int4 kernel packing (see below).
        model = quantization.load(path, spec.quantize, group_size=spec.group_size, include_output=False, dtype=dtype,
                                  device=device, kernels=False)  # fmt: skip
    else:
        stored = quantization.read_quantization(path)
        if stored is not None and stored.get("mode") != spec.quantize:
            raise ValueError(f"{path} is quantized as {stored.get('mode')!r}: fine-tune it with --method qlora "
                             f"--quantize {stored.get('mode')}, or start from the float checkpoint")  # fmt: skip
        model = load(path, dtype=dtype, device=device)  # a quantized checkpoint loads quantized
        release_freed_memory()  # what reading left in the C heap
    if set_fields:
        model = set_config_fields(model, set_fields)
    if rope_scaling is not None:
        model.set_rope_scaling(rope_scaling)
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            # Training's inputs have many rows: the dequantizing path, never the packed CPU kernels
            # (which is also why the int4 packing is not made above; a checkpoint saved quantized
            # comes with it).
            module.use_kernel = False
    if spec.method == "qlora":
        rowwise_int4(model)  # the same values, widened a slice at a time (qlora.py)
    if spec.method == "full":
        bad = [i for i in spec.layers or () if not 0 <= i < len(model.layers)]
        if bad:  # the same message as apply_lora's, not "no trainable parameters" later
            raise ValueError(f"layers {bad} do not exist; the model has layers 0..{len(model.layers) - 1}")
        blocks = None if spec.layers is None else {f"layers.{i}." for i in spec.layers}
        for name, p in model.named_parameters():
            p.requires_grad_(blocks is None or name.startswith(tuple(blocks)))
    else:
        apply_lora(model, spec.lora_targets, rank=spec.lora_rank, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                   rslora=spec.rslora, layers=spec.layers, dtype=getattr(torch, spec.adapter_dtype), seed=seed)  # fmt: skip
    if spec.gradient_checkpointing:
        checkpoint_activations(model)
    return model.train()


# ---- the C heap ------------------------------------------------------------------------------------

# glibc's malloc serves blocks below a threshold from its heap and maps larger ones on their own
# (handed back to the OS when freed). The threshold starts at 128 KiB and rises to the size of any
# mapped block freed, up to 32 MiB, so after the first step the MB-sized activations, logits and
# dequantized weights of training all come from the heap; freed, they stay there as holes that
# the next sizes do not fit, and the resident set grows by ~0.5 GB of memory nothing uses (measured
# on the 1B shape: the heap held 0.5 GB free at the peak of a QLoRA step that used 0.25 GB).
# A fixed threshold of 4 MiB (mallopt also stops it from rising) maps every block of 4 MiB or more
# on its own: nothing large outlives its use in the heap. The cost is the page faults of fresh
# mappings: more CPU time per step (the README's table).
MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def set_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at nbytes for this process (0: leave glibc's own, rising one);
    True if it was set, False where the C library is not glibc. A process-wide setting: scripts call
    it (finetune.py, finetune_memory.py), the library never does."""
    if nbytes < 0:
        raise ValueError(f"the mmap threshold must be >= 0 bytes, got {nbytes}")
    if nbytes == 0:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_MMAP_THRESHOLD, nbytes) == 1


# ---- activation checkpointing --------------------------------------------------------------------


class CheckpointedBlock(TransformerBlock):
    """A TransformerBlock whose forward, while training, keeps no intermediate tensors: only its
    inputs are saved, and torch.utils.checkpoint runs the block again during the backward pass.

    Takes over the block's submodules and settings, so parameter names do not change, and inherits
    its forward (an edit to TransformerBlock reaches it)."""

    def __init__(self, block: TransformerBlock):
        nn.Module.__init__(self)
        for name, value in vars(block).items():  # settings: layer, ...
            if not name.startswith("_"):
                setattr(self, name, value)
        for name, module in block._modules.items():  # attention_norm, attention, ffn_norm, feed_forward
            setattr(self, name, module)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works when x needs no gradient (frozen embeddings) and
            # replays the random state, so dropout masks are the same in the replay.
            return checkpoint(super().forward, x, ctx, use_reentrant=False)
        return super().forward(x, ctx)


def checkpoint_activations(model: Transformer) -> Transformer:
    """Swap every block for a CheckpointedBlock, in place."""
    for i, block in enumerate(model.layers):
        if type(block) is TransformerBlock:
            model.layers[i] = CheckpointedBlock(block)
        elif not isinstance(block, CheckpointedBlock):
            raise ValueError(f"activation checkpointing wraps plain TransformerBlocks; layer {i} is a {type(block).__name__}")
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; a tied matrix counts once, quantized weights count their values."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            total += module.in_features * module.out_features
    return trainable, total


# ---- writing the results -------------------------------------------------------------------------


def save_checkpoint(model: Transformer, out: str | os.PathLike, *, format: str = "hf", dtype: str = "bfloat16",
                    tokenizer_from: str | os.PathLike | None = None) -> list[Path]:
    """A fine-tuned model as an ordinary checkpoint (HF or Meta layout, weights in `dtype`), with the
    tokenizer files of `tokenizer_from` copied beside it."""
    state = {name: t.detach().to("cpu", getattr(torch, dtype)) for name, t in model.state_dict().items()}
    written = save_state_dict(model.config, state, out, format=format)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file():
                target = Path(out) / Path(name).name
                shutil.copyfile(source, target)
                written.append(target)
    return written


def save_merged(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, format: str = "hf",
                dtype: str = "bfloat16") -> list[Path]:
    """The float base with the adapter merged into its weights, written as a checkpoint to `out`.
    The base is loaded again in float (a QLoRA adapter merges into the weights it approximates)."""
    model = load(base, dtype="float32", adapter=adapter)
    return save_checkpoint(model, out, format=format, dtype=dtype, tokenizer_from=base)
