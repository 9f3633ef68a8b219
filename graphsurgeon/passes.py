"""Pass framework: a registry of graph passes, each with a pydantic config, validated before any work.

A pass module (one per pass, under the top-level ``passes`` package) defines a ``GraphPass`` subclass with
a ``name`` and a ``Config`` model and registers it with :func:`register_pass`. ``optimize`` resolves pass
names and their settings here; a bad value is a ``ConfigError`` naming the pass and the key.
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar, Optional, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class PassConfig(BaseModel):
    """Base of every pass's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_scales(scales: Optional[Sequence[int]], last: int, n_scales: int, pass_name: str) -> tuple[int, ...]:
    """Explicit scale indices (negative counts from the end), else the last ``last`` scales of the schedule."""
    if scales is not None:
        bad = [s for s in scales if not -n_scales <= s < n_scales]
        if bad:
            raise ConfigError(f"{pass_name}.scales {bad} are outside the schedule's {n_scales} scales")
        return tuple(sorted({s % n_scales for s in scales}))
    if not 0 <= last <= n_scales:
        raise ConfigError(f"{pass_name}.last={last} is outside the schedule's {n_scales} scales")
    return tuple(range(n_scales - last, n_scales))


class GraphPass:
    """A pass: its settings, and the scales it acts on once a schedule is known."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    order: ClassVar[int] = 0
    """Passes are applied in this order whatever order the user lists them in."""

    def __init__(self, config: PassConfig):
        self.config = config

    def scales(self, n_scales: int) -> tuple[int, ...]:
        """The scales this pass acts on in a schedule of ``n_scales`` (a ConfigError if they do not fit)."""
        return resolve_scales(self.config.scales, self.config.last, n_scales, self.name)


_REGISTRY: dict[str, type[GraphPass]] = {}
_BUILTIN_MODULES = ("passes.lhep", "passes.sats")


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> list[str]:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return sorted(_REGISTRY)


def resolve_passes(names: Sequence[str], config: Optional[dict[str, Any]] = None) -> list[GraphPass]:
    """Pass instances for ``names`` with their settings from ``config`` (dict by pass name, or config objects)."""
    known = available_passes()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; available: {known}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a pass is listed twice in {list(names)}")
    config = dict(config or {})
    extra = sorted(set(config) - set(names))
    if extra:
        raise ConfigError(f"config has settings for passes that are not enabled: {extra} (enabled: {list(names)})")
    resolved = []
    for name in names:
        cls = _REGISTRY[name]
        settings = config.get(name, {})
        if isinstance(settings, cls.Config):
            resolved.append(cls(settings))
            continue
        if not isinstance(settings, dict):
            raise ConfigError(f"config[{name!r}] must be a dict or {cls.Config.__name__}, got {type(settings).__name__}")
        try:
            resolved.append(cls(cls.Config(**settings)))
        except ValidationError as err:
            problems = "; ".join(f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"invalid settings for pass {name!r}: {problems}") from None
    return resolved
