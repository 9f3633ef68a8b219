"""Adapter registry: the only way the core reaches model-specific code.

An adapter package (``model_adapters.<name>`` or any module listed under the
``graphsurgeon.adapters`` entry point group) registers itself on import with
:func:`register_adapter`. The core never imports a model by name.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, ContextManager, Optional, Sequence

import torch

from .errors import ConfigError


class ModelAdapter(abc.ABC):
    """Everything the core asks of a model family. Subclass it: the abstract members are required (a class
    missing one cannot be instantiated, and :func:`get_adapter` names what is missing); the others have defaults.

    The core calls these members and nothing else of the model; model knowledge stays in the adapter.
    """

    name: ClassVar[str]
    """The name the adapter is registered and found under (``--adapter``)."""

    operating_points: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named fixed pass settings for benchmarks (``bench --operating-point NAME``): ``{name: {pass: settings}}``."""

    paper_latency_s: ClassVar[dict[str, dict[str, float]]] = {}
    """Published latencies per named config and method, printed beside measured ones (facts, not targets)."""

    @abc.abstractmethod
    def build_model(self, config: Any, device: str = "meta", seed: Optional[int] = None,
                    draw_on_device: bool = False) -> Any:
        """The model for a named config (``--config``); ``meta``: structure only, for capture without weights."""

    @abc.abstractmethod
    def validate(self, model: Any, **generate_kwargs: Any) -> Any:
        """Check ``generate``'s arguments as the baseline does and raise a clear error before any work; the
        optimized model calls it before capturing, so a rejected call costs nothing."""

    @abc.abstractmethod
    def generate(self, model: Any, scale_runner: Any = None, **generate_kwargs: Any) -> Any:
        """The unaccelerated sampler. With ``scale_runner`` (from :meth:`graph_runner`), the same loop runs the
        captured graphs instead of the eager model, so the baseline and the optimized model share sampling."""

    @abc.abstractmethod
    def baseline_runner(self, model: Any) -> Any:
        """The eager scale runner the baseline uses, so that observers (per-scale timers) can wrap it."""

    @abc.abstractmethod
    def capture_key(self, model: Any, **generate_kwargs: Any) -> Any:
        """What a captured graph set is specialised to (schedule, batch, prompt lengths, ...): a hashable key;
        calls with equal keys share one graph set."""

    @abc.abstractmethod
    def capture_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M") -> dict[str, Any]:
        """Generation arguments with placeholder inputs, to capture without real prompts (check, export)."""

    @abc.abstractmethod
    def capture_plan(self, model: Any, **generate_kwargs: Any) -> Any:
        """The :class:`graphsurgeon.capture.CapturePlan` for these arguments: per-scale steps, their inputs,
        the explicit state between scales, regions and export decompositions."""

    @abc.abstractmethod
    def graph_runner(self, model: Any, captured: Any, scale_schedule: Any, runtimes: Sequence[Any] = ()) -> Any:
        """A scale runner that runs ``captured``'s graphs, threading their state and the passes' ``runtimes``."""

    @abc.abstractmethod
    def benchmark_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M",
                       seed: int = 0) -> dict[str, Any]:
        """Seeded generation arguments for benchmarks (random inputs, the family's usual sampling settings)."""

    def precision(self, model: Any, dtype: Any) -> Callable[[], ContextManager[Any]]:
        """Prepare ``model`` for ``dtype`` and return a factory of the context to run in. Default: float32 only."""
        if dtype != torch.float32:
            raise ConfigError(f"adapter {self.name!r} runs float32 only, not {dtype}")
        return contextlib.nullcontext


def missing_members(cls: type) -> list[str]:
    """The members of the contract that ``cls`` does not provide (empty for a complete adapter)."""
    missing = [] if isinstance(getattr(cls, "name", None), str) else ["name"]
    for member in sorted(ModelAdapter.__abstractmethods__):
        value = getattr(cls, member, None)
        if not callable(value) or getattr(value, "__isabstractmethod__", False):
            missing.append(member)
    return missing


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
    """Return a fresh adapter instance for ``name`` (e.g. the package name under ``model_adapters``); a
    ConfigError names what the contract (:class:`ModelAdapter`) needs and the adapter lacks."""
    if name not in _REGISTRY:
        _discover(name)
    if name not in _REGISTRY:
        known = ", ".join(available_adapters()) or "none found"
        raise ConfigError(f"unknown adapter {name!r} (known: {known})")
    factory = _REGISTRY[name]
    missing = missing_members(factory) if isinstance(factory, type) else []
    if missing or (isinstance(factory, type) and not issubclass(factory, ModelAdapter)):
        detail = f"it lacks {missing}" if missing else "it does not subclass graphsurgeon.ModelAdapter"
        raise ConfigError(f"adapter {name!r} ({factory.__module__}.{factory.__qualname__}) does not meet the "
                          f"adapter contract: {detail}")
    adapter = factory()
    if not isinstance(adapter, ModelAdapter):
        raise ConfigError(f"adapter {name!r}: its factory returned {type(adapter).__name__}, not a ModelAdapter")
    return adapter
