"""Pass framework: a registry of graph passes, each with a pydantic config, validated before any work.

A pass module (one per pass, under the top-level ``passes`` package) defines a ``GraphPass`` subclass with
a ``name``, a ``Config`` model, its preconditions and its rewrite, and registers it with :func:`register_pass`. ``optimize`` resolves pass
names and their settings here; a bad value is a ``ConfigError`` naming the pass and the key.
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from .capture import CapturedModel
from .errors import ConfigError
from .rewrite import lint_pass
from .runner import PassRuntime


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


@dataclass(frozen=True)
class GraphEdit:
    """One graph a pass changed: which, and how (node names, so the diff report and the manifest can show them)."""

    pass_name: str
    region: str
    """"scale" or the region's name (e.g. "residual")."""
    scale: int
    added: tuple[str, ...] = ()
    """Nodes the pass inserted."""
    rewired: tuple[str, ...] = ()
    """Nodes whose users now read a node the pass inserted."""
    generalized: tuple[str, ...] = ()
    """Nodes whose fixed sizes became sizes read at run time (e.g. the kept token count)."""

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "region": self.region, "scale": self.scale, "added": list(self.added),
                "rewired": list(self.rewired), "generalized": list(self.generalized)}


@dataclass(frozen=True)
class PassResult:
    """What one pass did to a graph set (torch.fx's ``PassResult``, with the edits listed)."""

    pass_name: str
    edits: tuple[GraphEdit, ...]

    @property
    def modified(self) -> bool:
        return bool(self.edits)


class GraphPass(abc.ABC):
    """A pass, after torch.fx's ``PassBase``: preconditions, the rewrite, postconditions, a typed result.

    ``requires`` refuses a graph set the pass cannot handle with a ConfigError naming what is missing (a role
    the adapter did not declare, a layout the pass does not support) before any graph is edited; ``rewrite``
    edits the graphs; ``ensures`` checks the pass's own promises afterwards (the node contract of
    :mod:`graphsurgeon.rewrite` is checked for every pass). Order among passes comes from ``runs_before``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    runs_before: ClassVar[tuple[str, ...]] = ()
    """Passes that must run after this one when both are enabled (e.g. a row guard before a token gather)."""
    runs_after: ClassVar[tuple[str, ...]] = ()
    """Passes that must run before this one when both are enabled (e.g. a pass that empties whole scales checks
    that no other pass edited them)."""
    provides: ClassVar[tuple[str, ...]] = ()
    """What the pass takes over in a scale graph, each at most once per pass set: "token_selection" (which tokens
    of a scale are computed), "row_selection" (which batch rows run), "attention_pattern" (which keys each query
    attends to). Two enabled passes providing the same thing are refused before capture, naming both."""

    def __init__(self, config: PassConfig):
        self.config = config

    def scales(self, n_scales: int) -> tuple[int, ...]:
        """The scales this pass acts on in a schedule of ``n_scales`` (a ConfigError if they do not fit)."""
        return resolve_scales(self.config.scales, self.config.last, n_scales, self.name)

    def requires(self, captured: CapturedModel) -> None:
        """Preconditions: raise a ConfigError naming what this graph set lacks for the pass."""

    @abc.abstractmethod
    def rewrite(self, captured: CapturedModel) -> list[GraphEdit]:
        """Edit the graphs in place; return what changed."""

    def ensures(self, captured: CapturedModel) -> None:
        """Postconditions of this pass beyond the shared node contract (raise PassContractError)."""

    def __call__(self, captured: CapturedModel) -> PassResult:
        self.requires(captured)
        edits = tuple(self.rewrite(captured))
        lint_pass(captured, self.name)  # a pass that breaks the node contract fails here, named
        self.ensures(captured)
        return PassResult(self.name, edits)

    def runtime(self, captured: CapturedModel) -> Optional[PassRuntime]:
        """The per-call state the rewritten graphs need (None: the graphs run on the sampler's inputs alone)."""
        return None


def order_passes(passes: Sequence[GraphPass]) -> list[GraphPass]:
    """``passes`` in an order meeting every ``runs_before``/``runs_after`` among them (otherwise as listed); a cycle
    is refused."""
    remaining = list(passes)
    ordered: list[GraphPass] = []
    while remaining:
        names = {p.name for p in remaining}
        blocked = {after for p in remaining for after in p.runs_before if after in names}
        blocked |= {p.name for p in remaining if any(before in names for before in p.runs_after)}
        ready = [p for p in remaining if p.name not in blocked]
        if not ready:
            raise ConfigError(f"passes {sorted(names)} declare a cycle in runs_before/runs_after")
        ordered.append(ready[0])
        remaining.remove(ready[0])
    return ordered


_REGISTRY: dict[str, type[GraphPass]] = {}
_PASS_PACKAGE = "passes"
"""Every module of this package is a pass module (one pass each); they register themselves on import."""


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> list[str]:
    package = importlib.import_module(_PASS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{_PASS_PACKAGE}.{info.name}")
    return sorted(_REGISTRY)


def _check_composition(names: Sequence[str]) -> None:
    """Refuse pass sets where two passes provide the same thing (they would both rewrite it)."""
    owner: dict[str, str] = {}
    for name in names:
        for capability in _REGISTRY[name].provides:
            if capability in owner:
                raise ConfigError(f"passes {owner[capability]!r} and {name!r} cannot be combined: both provide "
                                  f"{capability!r} (each decides it in its own way)")
            owner[capability] = name


def resolve_passes(names: Sequence[str], config: Optional[dict[str, Any]] = None) -> list[GraphPass]:
    """Pass instances for ``names`` with their settings from ``config`` (dict by pass name, or config objects)."""
    known = available_passes()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; available: {known}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a pass is listed twice in {list(names)}")
    _check_composition(names)
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
