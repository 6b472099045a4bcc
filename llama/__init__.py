"""A from-scratch, pure-PyTorch Llama (1, 2, 3, 3.1, 3.2 text models).

    import llama
    model = llama.load("path/to/checkpoint", dtype="bfloat16")   # Meta or Hugging Face layout, or GGUF
    logits = model(tokens)                                        # (B, T) -> (B, T, vocab) float32

    llm = llama.Llama.load("path/to/checkpoint")                 # model + tokenizer
    print(llm.generate("The capital of France is", temperature=0))

    model = llama.load("path/to/checkpoint", dtype="bfloat16", quantize="int8")   # or "int4"
"""

from weights import CheckpointError

from . import distributed, quantization
from .core.checkpoint import save
from .core.config import REGISTRY, ConfigError, ModelConfig, RopeScaling
from .core.generation import GenerationError, generate, stream
from .core.model import Transformer
from .loading import load, load_tokenizer
from .pipeline import Llama

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
    "distributed",
    "quantization",
    "save",
    "stream",
]
