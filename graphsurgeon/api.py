"""The public entry point: ``optimize(model, adapter=..., passes=[...])``."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from .adapters import ModelAdapter, get_adapter
from .emit import OptimizedModel
from .errors import ConfigError

KNOWN_PASSES: dict[str, Any] = {}  # filled by the passes package as passes are added


def optimize(model: torch.nn.Module, adapter: Union[str, ModelAdapter] = "infinity", passes: Sequence[str] = (),
             config: Optional[dict[str, Any]] = None) -> OptimizedModel:
    """Wrap ``model`` so that its sampler runs captured per-scale graphs, rewritten by ``passes``.

    With no passes the outputs equal the adapter's baseline sampler bit for bit (float32, CPU).
    """
    adapter = get_adapter(adapter) if isinstance(adapter, str) else adapter
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    unknown = [name for name in passes if name not in KNOWN_PASSES]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; available: {sorted(KNOWN_PASSES) or 'none yet'}")
    if config:
        extra = sorted(set(config) - set(passes))
        if extra:
            raise ConfigError(f"config has settings for passes that are not enabled: {extra}")
    return OptimizedModel(model, adapter, list(passes))
