"""Random tiny models for tests: imported by the test modules (pytest puts tests/ on the path)."""

from __future__ import annotations

import torch

from llama import ModelConfig, Transformer


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.3, *, random_norms: bool = False,
                 dtype: torch.dtype = torch.float32) -> Transformer:
    """Matrices normal(0, std): large enough that logits are peaked and greedy choices are not
    near-ties. Norm weights stay ones, or with random_norms are 1 + normal(0, 0.1) so they matter."""
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif random_norms:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()
