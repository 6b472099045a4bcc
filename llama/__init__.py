"""A from-scratch, pure-PyTorch Llama (1, 2, 3, 3.1, 3.2 text models).

    import llama
    model = llama.load("path/to/checkpoint", dtype="bfloat16")   # Meta or Hugging Face layout
    logits = model(tokens)                                        # (B, T) -> (B, T, vocab) float32

    llm = llama.Llama.load("path/to/checkpoint")                 # model + tokenizer
    print(llm.generate("The capital of France is", temperature=0))

    model = llama.load("path/to/checkpoint", dtype="bfloat16", quantize="int8")   # or "int4"
"""

from weights import CheckpointError

from . import quantize
from .checkpoint import load, save
from .config import REGISTRY, ConfigError, ModelConfig, RopeScaling
from .generation import GenerationError, generate, stream
from .model import Transformer
from .pipeline import Llama
from .tokenizer import load_tokenizer

__all__ = [
    "REGISTRY",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "Llama",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "generate",
    "load",
    "load_tokenizer",
    "quantize",
    "save",
    "stream",
]
