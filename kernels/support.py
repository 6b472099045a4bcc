"""What the swaps of this package were written for (see llama/core/support.py for why each checks).

Teaching them a new variant: check that FastAttention / FusedFeedForward / the native linears
handle it (a test against the plain model in tests/test_variants.py), then add it here.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from llama.core import support
from llama.core.cache import QuantizedLayerCache
from llama.core.model import (Attention, FeedForward, GeluFeedForward, KVCache, LayerCache, RMSNorm, Transformer,
                              TransformerBlock)  # fmt: skip
from llama.core.support import UnsupportedModelError
from llama.distributed import PARALLEL_MODULES
from llama.quantization import Int4Linear, Int8BlockLinear, Int8Linear, QuantizedEmbedding
from llama.quantization.gguf import GGUFRows
from llama.training.lora import LoRALinear

# The plain model's modules (and the quantized linears, which may sit in a model before any swap:
# Int8BlockLinear holds a GGUF file's Q8_0 weights; and LoRA adapters left unmerged, as a server of
# several adapters keeps them: a LoRALinear calls its base projection, which the native swap replaces
# like any other; fusing refuses it, see check_fusable; and a QuantizedEmbedding with its table, which
# the swaps only look up rows of -- the native swap replaces a table that is also the tied output
# under both names). QuantizedLayerCache: the attention steps
# receive its keys and values dequantized, in the model's dtype, as from a LayerCache
# (tests/test_kv_cache.py checks FastAttention on it).
PLAIN_MODULES = (Transformer, TransformerBlock, Attention, FeedForward, GeluFeedForward, RMSNorm, KVCache, LayerCache,
                 QuantizedLayerCache, nn.ModuleList, nn.Linear, nn.Embedding, Int8Linear, Int4Linear, Int8BlockLinear,
                 LoRALinear, nn.ParameterDict, QuantizedEmbedding, GGUFRows)  # fmt: skip
# A tensor-parallel model (llama.distributed.shard / load) also holds the row- and vocabulary-parallel
# modules, whose forward ends in a collective. No swap replaces them: the swaps pick modules by exact
# type (a plain nn.Linear, Attention, FeedForward), so FastAttention / FusedFeedForward take them over
# as they are, and the column-parallel projections -- plain nn.Linear holding this rank's rows -- are
# fused and served like any other (FastAttention splits by the rank's n_heads / n_kv_heads).
PLAIN_MODULES += PARALLEL_MODULES
# Config variants the swaps handle: the fast modules inherit the steps that read them.
HANDLED_FIELDS = ("qk_norm", "sliding_window", "window_layers", "nope_layers", "mlp")

__all__ = ["HANDLED_FIELDS", "PLAIN_MODULES", "UnsupportedModelError", "check_supported"]


def check_supported(model: nn.Module, who: str, known: Iterable[type] = ()) -> None:
    support.check_supported(model, who, (*PLAIN_MODULES, *known), HANDLED_FIELDS)
