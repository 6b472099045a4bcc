"""Faster parts swapped into a loaded model, gpt-fast style: llama/ never imports this package.

    import llama, kernels
    model = kernels.optimize(llama.load("path/to/checkpoint"))    # every fusion on
    model = kernels.optimize(model, sdpa=False)                    # all but one
    model = kernels.optimize(model, native=False)                  # PyTorch's matmuls only

Each switch replaces modules with ones of the same forward signature (see kernels/fused.py for what
each saves); every switch off leaves the model untouched. The swaps are a runtime transform for
inference: the fused weights have new names (`attention.wqkv`, `feed_forward.w13`), so save,
convert or quantize (llama/quantization/ finds linears by their Meta names) before optimizing. Only
plain nn.Linear projections are fused; on a quantized model turn fuse_qkv and fuse_gate_up off, the
other swaps take any projection module.

`native` (kernels/native.py) comes last: it swaps the bfloat16 CPU linears (the fused ones
included, and Int8Linear / Int4Linear of a quantized bfloat16 model) for modules that call
hand-written C++ matrix-vector kernels on decode-sized inputs. The kernels are compiled on first
use (needs a C++ compiler and ninja); where that fails a warning says so once and the model stays
on PyTorch. A float32 model has nothing to swap and is left alone without compiling anything.
"""

from __future__ import annotations

from llama.core.model import Attention, FeedForward, Transformer, TransformerBlock

from . import native as native_kernels
from .fused import FastAttention, FusedFeedForward, FusedNormBlock, add_rms_norm, check_fusable, fuse_linears, rope_

__all__ = [
    "FastAttention",
    "FusedFeedForward",
    "FusedNormBlock",
    "add_rms_norm",
    "check_fusable",
    "fuse_linears",
    "optimize",
    "rope_",
]


def optimize(
    model: Transformer,
    *,
    fuse_qkv: bool = True,
    fuse_gate_up: bool = True,
    fuse_norm_residual: bool = True,
    sdpa: bool = True,
    inplace_rope: bool = True,
    native: bool = True,
) -> Transformer:
    """Swap the chosen fused modules into `model` in place and return it.

    fuse_qkv:           one matmul for q, k, v (FastAttention)
    sdpa:               attention through F.scaled_dot_product_attention (FastAttention)
    inplace_rope:       rotate q and k inside their own storage (FastAttention)
    fuse_gate_up:       one matmul for SwiGLU's gate and up projections (FusedFeedForward)
    fuse_norm_residual: residual add and ffn RMSNorm in one function (FusedNormBlock)
    native:             C++ kernels for bf16 / int8 / int4 linears at decode sizes, where they
                        build (kernels.native.swap_native_linears)

    Only plain modules are replaced, so optimizing twice leaves the first swaps alone. Works layer by
    layer: the fused weights are built and the separate ones dropped one layer at a time, so memory
    peaks at the model plus one layer's weights. A KV cache already set up is kept.
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"optimize() takes a llama Transformer, got {type(model).__name__}")
    for block in model.layers:  # check everything first, so that an error leaves the model as it was
        if fuse_qkv and type(block.attention) is Attention:
            check_fusable(block.attention.wq, block.attention.wk, block.attention.wv)
        if fuse_gate_up and type(block.feed_forward) is FeedForward:
            check_fusable(block.feed_forward.w1, block.feed_forward.w3)
    for i, block in enumerate(model.layers):
        if type(block.attention) is Attention and (fuse_qkv or sdpa or inplace_rope):
            block.attention = FastAttention(block.attention, fuse_qkv=fuse_qkv, sdpa=sdpa, inplace_rope=inplace_rope)
        if type(block.feed_forward) is FeedForward and fuse_gate_up:
            block.feed_forward = FusedFeedForward(block.feed_forward)
        if type(block) is TransformerBlock and fuse_norm_residual:
            model.layers[i] = FusedNormBlock(block)
    if native:
        native_kernels.swap_native_linears(model)
    return model

