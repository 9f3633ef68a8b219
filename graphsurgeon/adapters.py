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
from typing import Any, Callable, ClassVar, ContextManager, Hashable, Optional

import torch

from .capture import CapturePlan
from .errors import ConfigError
from .fidelity import OutputView
from .images import ImagePipeline, ImageSources, SamplingSettings
from .runner import ScaleRunner


class ModelAdapter(abc.ABC):
    """Everything the core asks of a model family (see docs/adapters.md). Subclass it: the abstract members are
    required (a class missing one cannot be instantiated, and :func:`get_adapter` names what is missing); the
    others have defaults. The core calls these members and nothing else of the model.

    The flow of one optimized call: ``args = validate(model, **kwargs)`` (once, before any work) ->
    ``capture_key(model, args)`` (is a graph set cached?) -> ``capture_plan(model, args)`` (capture, then the
    passes rewrite the graphs by the roles the plan declares) -> ``sample(model, args, GraphRunner(...))``: the
    family's own sampler, on the graphs instead of the eager steps.
    """

    name: ClassVar[str]
    """The name the adapter is registered and found under (``--adapter``)."""

    default_config: ClassVar[Optional[str]] = None
    """The named config ``--config`` means when it is not given (a small one, so commands run anywhere)."""

    operating_points: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named fixed pass settings for benchmarks (``bench --operating-point NAME``): ``{name: {pass: settings}}``."""

    paper_latency_s: ClassVar[dict[str, dict[str, float]]] = {}
    """Published latencies per named config and method, printed beside measured ones (facts, not targets)."""

    pixel_presets: ClassVar[tuple[str, ...]] = ()
    """The ``--pn`` values the family's schedules know (listed in ``--help``); empty: one schedule per model, and
    ``--pn`` does not apply."""

    @abc.abstractmethod
    def build_model(self, config: Any, device: str = "meta", seed: Optional[int] = None,
                    draw_on_device: bool = False) -> Any:
        """The model for a named config (``--config``); ``meta``: structure only, for capture without weights."""

    @abc.abstractmethod
    def validate(self, model: Any, **generate_kwargs: Any) -> Any:
        """Check the sampler's keyword arguments as the baseline does and return them checked (the family's own
        type, opaque to the core); raise an ``InputError`` naming the bad or unknown argument. Called once per
        call, before any capture or work, so a rejected call costs nothing and caches nothing."""

    @abc.abstractmethod
    def sample(self, model: Any, args: Any, scale_runner: Optional[ScaleRunner] = None) -> Any:
        """The unaccelerated sampler on checked ``args``, written against :class:`graphsurgeon.runner.ScaleRunner`;
        None means the family's eager runner. graphsurgeon passes a ``GraphRunner`` over the captured graphs, so
        the baseline and the optimized model share sampling. The result has a ``stats`` attribute (None) that
        the optimized model sets to what its passes did."""

    @abc.abstractmethod
    def baseline_runner(self, model: Any, args: Any) -> ScaleRunner:
        """The eager runner the baseline uses for ``args``, so that observers (per-scale timers) can wrap it."""

    @abc.abstractmethod
    def capture_key(self, model: Any, args: Any) -> Hashable:
        """What a captured graph set is specialised to (schedule, batch, condition lengths, device, ...):
        calls with equal keys share one graph set."""

    @abc.abstractmethod
    def capture_plan(self, model: Any, args: Any) -> CapturePlan:
        """The :class:`graphsurgeon.capture.CapturePlan` for ``args``: per-scale steps (the eager runner's own step
        functions) with their example inputs and roles, the residual steps, the state between scales (KV caches),
        the CFG layout, and how to switch the model's caching on."""

    @abc.abstractmethod
    def capture_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M") -> dict[str, Any]:
        """Generation keyword arguments with placeholder conditions, to capture without real inputs (check, export)."""

    @abc.abstractmethod
    def benchmark_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M",
                       seed: int = 0) -> dict[str, Any]:
        """Seeded generation keyword arguments for benchmarks (random conditions, the family's usual settings)."""

    def generate(self, model: Any, scale_runner: Optional[ScaleRunner] = None, **generate_kwargs: Any) -> Any:
        """The baseline as users call it: validate, then sample."""
        return self.sample(model, self.validate(model, **generate_kwargs), scale_runner)

    def output_view(self, output: Any) -> OutputView:
        """The drawn values, the final latent and (when returned) the guided logits of a sampler output, for
        ``graphsurgeon compare``. Default: the family is not comparable."""
        raise ConfigError(f"adapter {self.name!r} does not expose its outputs for comparison (no output_view)")

    def preview_decoder(self, model: Any, args: Any) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """For a pass that looks at pictures mid-generation (SkipVAR): the decoder of this checked call, accumulated
        latent (as the residual step's ``accumulated`` holds it) -> pictures (B, 3, H, W), or None when the call
        carries no decoder (``OptimizedModel.decoder`` can give one). Default: None."""
        return None

    def forced_args(self, generate_kwargs: dict[str, Any], reference: OutputView) -> dict[str, Any]:
        """``generate_kwargs`` forcing every scale to ``reference``'s drawn values and returning the guided logits
        (teacher forcing). Default: the family is not comparable."""
        raise ConfigError(f"adapter {self.name!r} has no teacher forcing for comparison (no forced_args)")

    def check_settings(self, settings: SamplingSettings) -> None:
        """Check the sampling settings of a run (schedule preset, guidance, temperature) before anything is built;
        raise a ConfigError or InputError naming the setting. Default: ``pn`` is one of ``pixel_presets`` when the
        family has presets. Families override it to add their own checks (the ones their sampler applies)."""
        if self.pixel_presets and settings.pn not in self.pixel_presets:
            raise ConfigError(f"--pn {settings.pn!r} is not a pixel preset of adapter {self.name!r}; give one of "
                              f"{', '.join(self.pixel_presets)}")

    def supported_dtypes(self, device_type: str) -> tuple[torch.dtype, ...]:
        """The precisions :meth:`precision` accepts on a device type ("cpu", "cuda"), so a command line can refuse
        ``--dtype`` before a model is built. Default: float32 only."""
        return (torch.float32,)

    def check_sources(self, sources: ImageSources, conditions: list[str]) -> None:
        """Check the user's files and conditions for ``graphsurgeon generate`` (files exist and fit each other,
        conditions are valid prompts or labels) before anything is loaded; raise a ConfigError naming the file or
        condition. Default: the family does not generate images."""
        raise ConfigError(f"adapter {self.name!r} does not generate images (it has no image_pipeline)")

    def image_pipeline(self, sources: ImageSources) -> ImagePipeline:
        """The loaded transformer with its condition encoder and decoder (random stand-ins, said in ``notes``,
        where ``sources`` names no file). Default: the family does not generate images."""
        raise ConfigError(f"adapter {self.name!r} does not generate images (it has no image_pipeline)")

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


def _import_reference(reference: str) -> type[ModelAdapter]:
    """``package.module:Name`` -> the ModelAdapter subclass it names (an adapter outside the repository). Anything
    else is refused by its type before it is called: the name comes from a command line (``os:system``)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"adapter {reference!r}: write an outside adapter as package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"adapter {reference!r}: cannot import module {err.name!r} (is it on PYTHONPATH?)") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ConfigError(f"adapter {reference!r}: module {module_name!r} has no attribute {attribute!r}")
    if not (isinstance(factory, type) and issubclass(factory, ModelAdapter)):
        raise ConfigError(f"adapter {reference!r} is a {type(factory).__name__}, not a subclass of "
                          "graphsurgeon.ModelAdapter; name an adapter class as package.module:ClassName")
    return factory


def get_adapter(name: str) -> ModelAdapter:
    """Return a fresh adapter instance for ``name``: a registered name (a package under ``model_adapters``, an
    entry point) or ``package.module:ClassName`` for an adapter anywhere on the path. A ConfigError names what
    the contract (:class:`ModelAdapter`) needs and the adapter lacks."""
    if ":" in name:
        factory = _import_reference(name)
    else:
        if name not in _REGISTRY:
            _discover(name)
        if name not in _REGISTRY:
            known = ", ".join(available_adapters()) or "none found"
            raise ConfigError(f"unknown adapter {name!r} (known: {known}, or package.module:ClassName)")
        factory = _REGISTRY[name]
    if not callable(factory):
        raise ConfigError(f"adapter {name!r} is a {type(factory).__name__}, not a ModelAdapter class")
    missing = missing_members(factory) if isinstance(factory, type) else []
    if missing or (isinstance(factory, type) and not issubclass(factory, ModelAdapter)):
        detail = f"it lacks {missing}" if missing else "it does not subclass graphsurgeon.ModelAdapter"
        raise ConfigError(f"adapter {name!r} ({factory.__module__}.{factory.__qualname__}) does not meet the "
                          f"adapter contract: {detail}")
    adapter = factory()
    if not isinstance(adapter, ModelAdapter):
        raise ConfigError(f"adapter {name!r}: its factory returned {type(adapter).__name__}, not a ModelAdapter")
    return adapter
