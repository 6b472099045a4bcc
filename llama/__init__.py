"""A from-scratch, pure-PyTorch Llama (1, 2, 3, 3.1, 3.2 text models).

    import llama
    model = llama.load("path/to/checkpoint", dtype="bfloat16")   # Meta or Hugging Face layout
    logits = model(tokens)                                        # (B, T) -> (B, T, vocab) float32
"""

from weights import CheckpointError

from .checkpoint import load, save
from .config import REGISTRY, ConfigError, ModelConfig, RopeScaling
from .model import Transformer

__all__ = [
    "REGISTRY",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "load",
    "save",
]
