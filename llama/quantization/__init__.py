"""Weight-only quantization (int8 per channel, int4 in groups), applied from outside the model.

    linear.py      Int8Linear / Int4Linear, quantize_model (swap a loaded model's linears)
    checkpoint.py  quantize while loading; save_quantized / load_quantized
    embedding.py   QuantizedEmbedding: an embedding table kept quantized, rows dequantized on lookup
    gguf.py        GGUF's Q8_0 / Q4_0 weights kept as stored (Int8BlockLinear, Int4Linear, GGUFRows)
"""

from . import gguf
from .embedding import QuantizedEmbedding
from .checkpoint import load, load_quantized, read_quantization, save_quantized
from .gguf import Int8BlockLinear
from .linear import (GROUP_SIZES, MODES, Int4Linear, Int8Linear, check_mode, prepare_kernels, quantize_int4,
                     quantize_int8, quantize_model, swap_linears, target_names)  # fmt: skip

__all__ = [
    "GROUP_SIZES",
    "MODES",
    "QuantizedEmbedding",
    "Int4Linear",
    "Int8BlockLinear",
    "Int8Linear",
    "check_mode",
    "load",
    "load_quantized",
    "prepare_kernels",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "read_quantization",
    "save_quantized",
    "swap_linears",
    "target_names",
]
