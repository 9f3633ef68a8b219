"""Adapter registry: the only way the core reaches model-specific code.

An adapter package (``model_adapters.<name>`` or any module listed under the
``graphsurgeon.adapters`` entry point group) registers itself on import with
:func:`register_adapter`. The core never imports a model by name.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol, runtime_checkable

from .errors import ConfigError


@runtime_checkable
class ModelAdapter(Protocol):
    """What every adapter provides (later issues extend this with capture hooks)."""

    name: str

    def generate(self, model: Any, **kwargs: Any) -> Any:
        """Run the model's unaccelerated sampler."""


_REGISTRY: dict[str, Callable[[], ModelAdapter]] = {}


def register_adapter(name: str, factory: Callable[[], ModelAdapter]) -> None:
    """Register ``factory`` (a class or zero-argument callable) under ``name``."""
    _REGISTRY[name] = factory


def _discover(name: str) -> None:
    """Import the adapter package that may define ``name``; it registers itself."""
    try:
        importlib.import_module(f"model_adapters.{name}")
    except ModuleNotFoundError as err:
        if err.name not in (f"model_adapters.{name}", "model_adapters"):
            raise
    if name in _REGISTRY:
        return
    for entry in entry_points(group="graphsurgeon.adapters"):
        if entry.name == name:
            entry.load()


def get_adapter(name: str) -> ModelAdapter:
    """Return a fresh adapter instance for ``name`` (e.g. the package name under ``model_adapters``)."""
    if name not in _REGISTRY:
        _discover(name)
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise ConfigError(f"unknown adapter {name!r} (known: {known})")
    return _REGISTRY[name]()
