"""Faster parts swapped into a loaded model, gpt-fast style: llama/ never imports this package.

    import llama, kernels
    model = kernels.optimize(llama.load("path/to/checkpoint"))    # every fusion on
    model = kernels.optimize(model, sdpa=False)                    # all but one
    model = kernels.optimize(model, native=False)                  # PyTorch's matmuls only

Each switch replaces modules with ones of the same forward signature (see kernels/fused.py for what
each saves); every switch off leaves the model untouched. The swaps are a runtime transform for
inference: the fused weights have new names (`attention.wqkv`, `feed_forward.w13`), so save,
convert or quantize before optimizing. Bias-free nn.Linear projections are fused, and so are
Int8Linear / Int4Linear / Int8BlockLinear ones of one kind (a quantized model): their rows and
scales are stacked. The other swaps take any projection module.

Every swap checks the whole model first (kernels/support.py) and refuses a module type or config
variant it was not written for, naming it: a researcher's new module never silently falls out of
the optimized model.

`native` (kernels/native.py) comes last: it swaps the bfloat16 CPU linears (the fused ones
included, and Int8Linear / Int4Linear of a quantized bfloat16 model) for modules that call
hand-written C++ matrix-vector kernels on decode-sized inputs. The kernels are compiled on first
use (needs a C++ compiler and ninja); where that fails a warning says so once and the model stays
on PyTorch. A float32 model has nothing to swap and is left alone without compiling anything.
"""

from __future__ import annotations

from llama.core.checkpoint import release_freed_memory
from llama.core.model import Attention, FeedForward, Transformer

from . import native as native_kernels
from .fused import FastAttention, FusedFeedForward, check_fusable, fuse_linears, rope_
from .support import UnsupportedModelError, check_supported

__all__ = [
    "FastAttention",
    "FusedFeedForward",
    "UnsupportedModelError",
    "check_fusable",
    "check_supported",
    "fusable",
    "fuse_linears",
    "optimize",
    "rope_",
]

# What optimize() may meet in a model it is given: the plain modules, and its own swaps from an
# earlier call (optimizing twice leaves them alone).
KNOWN_MODULES = (FastAttention, FusedFeedForward, *native_kernels.NATIVE_MODULES)


def fusable(model: Transformer) -> dict[str, bool]:
    """{"fuse_qkv": ..., "fuse_gate_up": ...}: whether every layer's q/k/v (gate/up) projections can be
    stacked (fuse_linears: one type, bf16 nn.Linear or one quantized kind), for
    kernels.optimize(model, **kernels.fusable(model)) on a model whose projections may be mixed (a
    GGUF file with several tensor types)."""
    result = {}
    for switch, modules in (("fuse_qkv", lambda b: (b.attention.wq, b.attention.wk, b.attention.wv)),
                            ("fuse_gate_up", lambda b: (b.feed_forward.w1, b.feed_forward.w3))):  # fmt: skip
        try:
            for block in model.layers:
                if type(block.attention) is Attention and type(block.feed_forward) is FeedForward:
                    check_fusable(*modules(block))
            result[switch] = True
        except ValueError:
            result[switch] = False
    return result


def optimize(
    model: Transformer,
    *,
    fuse_qkv: bool = True,
    fuse_gate_up: bool = True,
    sdpa: bool = True,
    inplace_rope: bool = True,
    native: bool = True,
    int8_activations: bool | None = None,
) -> Transformer:
    """Swap the chosen fused modules into `model` in place and return it.

    fuse_qkv:           one matmul for q, k, v (FastAttention)
    sdpa:               attention through F.scaled_dot_product_attention (FastAttention)
    inplace_rope:       rotate q and k inside their own storage (FastAttention)
    fuse_gate_up:       one matmul for SwiGLU's gate and up projections (FusedFeedForward)
    native:             C++ kernels for bf16 / int8 / int4 linears at decode sizes, for attention
                        of one decoding query over the cache and in-place RoPE (with sdpa, bf16),
                        and for RMSNorm and SwiGLU's gating (bf16), where they build
                        (kernels.native.swap_native_linears, swap_native_attention,
                        swap_native_elementwise)
    int8_activations:   with native, int8 / Q8_0 / int4 weights multiply activations quantized to
                        int8 per block of 32 with integer dot products (None: where the CPU has
                        AVX512-VNNI; False: the exact-activation kernels; kernels/native.py)

    Refuses (UnsupportedModelError, before changing anything) a model holding a module type or a
    config variant it was not written for (kernels/support.py). Only plain modules are replaced, so
    optimizing twice leaves the first swaps alone. Works layer by layer: the fused weights are built
    and the separate ones dropped one layer at a time, so memory peaks at the model plus one layer's
    weights. A KV cache already set up is kept.
    """
    check_supported(model, "kernels.optimize", KNOWN_MODULES)
    for block in model.layers:  # check everything first, so that an error leaves the model as it was
        if fuse_qkv and type(block.attention) is Attention:
            check_fusable(block.attention.wq, block.attention.wk, block.attention.wv)
        if fuse_gate_up and type(block.feed_forward) is FeedForward:
            check_fusable(block.feed_forward.w1, block.feed_forward.w3)
    for block in model.layers:
        if type(block.attention) is Attention and (fuse_qkv or sdpa or inplace_rope):
            block.attention = FastAttention(block.attention, fuse_qkv=fuse_qkv, sdpa=sdpa, inplace_rope=inplace_rope)
        if type(block.feed_forward) is FeedForward and fuse_gate_up:
            block.feed_forward = FusedFeedForward(block.feed_forward)
        # GeluFeedForward (config.mlp = "gelu") has no gate/up pair to fuse: it runs as written.
        # The layer's separate weights are gone: hand their pages back now, or the C allocator keeps
        # them (too small for the next layer's stacked weights) and memory grows layer by layer.
        release_freed_memory()
    if native:
        native_kernels.swap_native_linears(model, int8_activations=int8_activations)
        native_kernels.swap_native_attention(model)
        native_kernels.swap_native_elementwise(model)
    return model
