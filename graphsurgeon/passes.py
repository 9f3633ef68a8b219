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
from typing import Annotated, Any, ClassVar, Optional, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from .capture import CapturedModel
from .errors import ConfigError
from .rewrite import lint_pass
from .runner import PassRuntime


class PassConfig(BaseModel):
    """Base of every pass's settings: unknown keys and NaN/Inf numbers are errors (a NaN threshold compares
    false with everything, so it would silently switch a rule off)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _distinct(scales: Optional[tuple[int, ...]]) -> Optional[tuple[int, ...]]:
    repeated = sorted({s for s in scales or () if scales.count(s) > 1})
    if repeated:
        raise ValueError(f"scale(s) {repeated} listed twice; list each scale once")
    return scales


ScaleList = Annotated[Optional[tuple[int, ...]], AfterValidator(_distinct)]
"""A pass config's ``scales`` field: scale indices (negative from the end), each at most once."""


def resolve_scales(scales: Optional[Sequence[int]], last: int, n_scales: int, pass_name: str) -> tuple[int, ...]:
    """Explicit scale indices (negative counts from the end), else the last ``last`` scales of the schedule. One
    scale named twice (5 and -2 of 7) is refused: the pass would act on it once, not as listed."""
    if scales is not None:
        bad = [s for s in scales if not -n_scales <= s < n_scales]
        if bad:
            raise ConfigError(f"{pass_name}.scales {bad} are outside the schedule's {n_scales} scales")
        resolved = [s % n_scales for s in scales]
        if len(set(resolved)) != len(resolved):
            raise ConfigError(f"{pass_name}.scales {list(scales)} name one scale of the schedule's {n_scales} twice")
        return tuple(sorted(resolved))
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
    traits: ClassVar[tuple[str, ...]] = ()
    """What else the rewrite does that another pass may not run beside (shared, unlike ``provides``):
    "scale_outputs" (adds outputs to the scale steps besides the logits and the state)."""
    cannot_run_beside: ClassVar[tuple[str, ...]] = ()
    """Capabilities (``provides``) or ``traits`` of other passes this pass cannot run with (e.g. a pass that needs
    every row of a scale cannot run beside "row_selection"); such a pass set is refused when it is resolved,
    naming both passes."""

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


_MEANING = {"row_selection": "a row guard choosing which batch rows run",
            "token_selection": "a choice of which tokens of a scale are computed",
            "attention_pattern": "a choice of the keys each query attends to",
            "per_scale_outputs": "outputs added to each scale step it rewrites"}
"""What each capability or trait means, for the refusal of a pass set."""


def _check_composition(names: Sequence[str]) -> None:
    """Refuse pass sets where two passes provide the same thing (they would both rewrite it), or where one pass
    cannot run beside what another provides or does (``cannot_run_beside``)."""
    owner: dict[str, str] = {}
    for name in names:
        for capability in _REGISTRY[name].provides:
            if capability in owner:
                raise ConfigError(f"passes {owner[capability]!r} and {name!r} cannot be combined: both provide "
                                  f"{capability!r} (each decides it in its own way)")
            owner[capability] = name
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            reasons = [f"{a!r} cannot run beside {clash!r} ({_MEANING.get(clash, 'see docs/passes.md')}), which {b!r} has"
                       for a, b in ((first, second), (second, first))
                       for clash in sorted(set(_REGISTRY[a].cannot_run_beside)
                                           & {*_REGISTRY[b].provides, *_REGISTRY[b].traits})]
            if reasons:
                raise ConfigError(f"passes {first!r} and {second!r} cannot be combined: {'; '.join(reasons)}")


def resolve_passes(names: Sequence[str], config: Optional[dict[str, Any]] = None) -> list[GraphPass]:
    """Pass instances for ``names`` with their settings from ``config`` (dict by pass name, or config objects)."""
    known = available_passes()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; available: {known}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"pass(es) {repeated} listed twice in {list(names)}; list each pass once")
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
