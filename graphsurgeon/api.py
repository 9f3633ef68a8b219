"""The public entry point: ``optimize(model, adapter=..., passes=[...])``."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from .adapters import ModelAdapter, get_adapter
from .emit import OptimizedModel
from .errors import ConfigError
from .passes import resolve_passes


def optimize(model: torch.nn.Module, adapter: Union[str, ModelAdapter] = "infinity", passes: Sequence[str] = (),
             config: Optional[dict[str, Any]] = None) -> OptimizedModel:
    """Wrap ``model`` so that its sampler runs captured per-scale graphs, rewritten by ``passes``.

    With no passes the outputs equal the adapter's baseline sampler bit for bit (float32, CPU).
    """
    adapter = get_adapter(adapter) if isinstance(adapter, str) else adapter
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    return OptimizedModel(model, adapter, resolve_passes(list(passes), config))
