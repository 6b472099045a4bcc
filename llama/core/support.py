"""The check every transform of a model runs first: refuse what it was not written for.

A fast path, a quantizer or a file format that meets a module or a config field it does not know
could compute (or save) something other than the plain model without any sign of it: a per-head
norm skipped, a window ignored, a field dropped. So each one declares what it was written for -- the
exact module types it may meet and the config variants it handles -- and check_supported refuses
everything else with an error naming the module or the field. Teaching a transform a new variant
means testing it against the plain model and adding it to that transform's lists.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .config import ModelConfig, unsupported_fields


class UnsupportedModelError(ValueError):
    """A transform was asked to work on a module type or config field it was not written for."""


def check_supported(model: nn.Module, who: str, modules: Iterable[type], fields: Iterable[str]) -> None:
    """UnsupportedModelError unless every module of `model` has an exact type among `modules` and
    every variant field of model.config that is set is among `fields`."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise UnsupportedModelError(f"{who} takes a llama Transformer, got {type(model).__name__}")
    types = set(modules)
    for name, module in model.named_modules():
        if type(module) not in types:
            raise UnsupportedModelError(
                f"{who} was not written for module {name or 'the model'!r} of type {type(module).__qualname__}; "
                "teach it that module or use the plain model"
            )
    extra = unsupported_fields(config, tuple(fields))
    if extra:
        raise UnsupportedModelError(
            f"{who} was not written for config {', '.join(f'{k}={v!r}' for k, v in extra.items())}; "
            "teach it that field or use the plain model"
        )
