"""Adapter registry: the only way the core reaches model-specific code.

An adapter package (``model_adapters.<name>`` or any module listed under the
``graphsurgeon.adapters`` entry point group) registers itself on import with
:func:`register_adapter`. The core never imports a model by name.
"""
from __future__ import annotations

import importlib
import pkgutil
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


def available_adapters() -> list[str]:
    """Names :func:`get_adapter` can find: registered adapters, ``graphsurgeon.adapters`` entry points and the
    subpackages of ``model_adapters``. Names are listed, not imported, so asking costs no adapter import."""
    names = set(_REGISTRY)
    names.update(entry.name for entry in entry_points(group="graphsurgeon.adapters"))
    try:
        package = importlib.import_module("model_adapters")
    except ModuleNotFoundError as err:
        if err.name != "model_adapters":
            raise
    else:
        names.update(info.name for info in pkgutil.iter_modules(getattr(package, "__path__", [])) if info.ispkg)
    return sorted(names)


def get_adapter(name: str) -> ModelAdapter:
    """Return a fresh adapter instance for ``name`` (e.g. the package name under ``model_adapters``)."""
    if name not in _REGISTRY:
        _discover(name)
    if name not in _REGISTRY:
        known = ", ".join(available_adapters()) or "none found"
        raise ConfigError(f"unknown adapter {name!r} (known: {known})")
    return _REGISTRY[name]()
