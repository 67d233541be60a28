"""One thin adapter per model family: where the decoder layers, norms and projections live.

Everything family-specific (module names, norms and their folding, the sliced
layer, parameter formulas, the rotary module, the head name, the BOS decision)
goes through an adapter. Every module of this package other than `base` is
imported here, so supporting a new family means adding one file that calls
`register` (plus its tests); nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from helpers.models.adapters.base import ModelAdapter

_REGISTRY: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    """Make `adapter` responsible for each of its `model_types`."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """The `config.model_type` values the lab can handle."""
    return sorted(_REGISTRY)


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose family has no adapter."""


def get_adapter(model_or_config: nn.Module | Any) -> ModelAdapter:
    """Return the adapter for a model (or its config); clear error if none fits."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported. Supported model types: "
            f"{', '.join(supported_model_types())}. Adding one means writing an adapter "
            "in helpers/models/adapters/ (see llama.py, gemma3.py, opt.py)."
        )
    return _REGISTRY[model_type]


def _import_families() -> None:
    """Import every family module of this package; each registers its adapter."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()

__all__ = [
    "ModelAdapter",
    "UnsupportedArchitectureError",
    "get_adapter",
    "register",
    "supported_model_types",
]
