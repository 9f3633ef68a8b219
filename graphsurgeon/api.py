"""The public entry point: ``optimize(model, adapter=..., passes=[...])``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import torch

from .adapters import ModelAdapter, get_adapter
from .emit import DEFAULT_MAX_GRAPH_SETS, OptimizedModel
from .errors import ConfigError
from .passes import resolve_passes


def optimize(model: torch.nn.Module, adapter: Union[str, ModelAdapter] = "infinity",
             passes: Union[str, Sequence[str]] = (), config: Optional[dict[str, Any]] = None,
             max_graph_sets: int = DEFAULT_MAX_GRAPH_SETS) -> OptimizedModel:
    """Wrap ``model`` so that its sampler runs captured per-scale graphs, rewritten by ``passes``.

    ``passes`` is a list of pass names, or one name as a string (``"lhep"``; ``"lhep,sats"`` is not split).
    With no passes the outputs equal the adapter's baseline sampler bit for bit (float32, CPU).
    ``max_graph_sets`` bounds the graph sets kept (one per specialisation: schedule, batch, prompt lengths);
    beyond it the least recently used is dropped and captured again when next needed (``fast.cache_info()``).
    """
    adapter = get_adapter(adapter) if isinstance(adapter, str) else adapter
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    names = [passes] if isinstance(passes, str) else passes
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"passes must be a pass name or a list of pass names, got {passes!r}")
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict keyed by pass name, got {type(config).__name__}")
    return OptimizedModel(model, adapter, resolve_passes(list(names), config), max_graph_sets)
