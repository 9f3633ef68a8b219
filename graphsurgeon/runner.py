"""Scale runners: what a model family's sampler calls once per scale, eagerly (the baseline) or on graphs.

A sampler is written once against :class:`ScaleRunner`; the baseline gives it the family's eager runner and
graphsurgeon gives it a :class:`GraphRunner` over the captured (and rewritten) graphs, so the unaccelerated and
the optimized model share every line of sampling::

    with runner as r:
        for si in scales:
            logits = r.scale(si, {"tokens": x, ...})["logits"]          # the transformer step
            logits = r.guide(si, logits, batch, lambda c, u: ...)      # CFG on the doubled batch, by its rule
            drawn = sample(logits)
            out = r.residual(si, {"drawn": drawn, ...})                 # drawn values -> R_k -> next input
            drawn = out["drawn"]                                        # what was used (a pass may replace it)

Inputs and outputs are matched by the names the capture plan declares, never by position; what the passes
need of them they find through the roles the plan declares (:class:`graphsurgeon.capture.ScaleSpec`).
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch

from .capture import CapturedModel, ScaleGraph
from .capture.locks import model_lock
from .errors import GraphsurgeonError

GuidanceRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``rule(cond, uncond) -> guided`` on the rows of one or more samples; row-wise (a sample's guided logits
depend on its own two rows only), so it applies unchanged to any subset of samples."""


@contextlib.contextmanager
def stateful_mode(model: Any, switch: Callable[[bool], None]) -> Iterator[None]:
    """Hold :func:`model_lock` and keep the model's stateful mode on (``switch(True)``, e.g. KV caching) for the
    duration; ``switch(False)`` afterwards, whatever happened. The context of an eager runner or of a capture."""
    with model_lock(model):
        switch(True)
        try:
            yield
        finally:
            switch(False)


class ScaleRunner(abc.ABC):
    """What a sampler calls per scale. A context manager: state that lives for one generation (KV caches)
    starts empty on entry and is dropped on exit."""

    def __enter__(self) -> "ScaleRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @abc.abstractmethod
    def scale(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run scale ``index``'s transformer step on ``inputs`` (by the names the plan declares); its outputs by name."""

    @abc.abstractmethod
    def residual(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run scale ``index``'s residual step; the outputs include the drawn values actually used, under the
        name of the step's ``sampled_input`` (a pass may have replaced some of them)."""

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> torch.Tensor:
        """Classifier-free guidance of a doubled batch (rows [0:B] conditional, [B:2B] unconditional)."""
        return rule(logits[:batch], logits[batch:])


class StepRunner(ScaleRunner):
    """The eager runner: the model's own step functions, the very ones the capture plan traces.

    ``context`` is entered around a generation (e.g. switching the model's KV caching on and holding its lock);
    ``sampled_input`` is the residual step's drawn-values input, handed back as the contract says."""

    def __init__(self, model: Any, scale_step: Callable[[Any, int, dict], dict],
                 residual_step: Callable[[Any, int, dict], dict], sampled_input: str,
                 context: Callable[[], ContextManager[Any]] = contextlib.nullcontext):
        self.model, self.scale_step, self.residual_step = model, scale_step, residual_step
        self.sampled_input, self.context = sampled_input, context
        self._entered: Optional[ContextManager[Any]] = None

    def __enter__(self) -> "StepRunner":
        entered = self.context()
        entered.__enter__()
        self._entered = entered
        return self

    def __exit__(self, *exc: Any) -> None:
        entered, self._entered = self._entered, None
        if entered is not None:
            entered.__exit__(*exc)

    def scale(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.scale_step(self.model, index, inputs)

    def residual(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = dict(self.residual_step(self.model, index, inputs))
        outputs.setdefault(self.sampled_input, inputs[self.sampled_input])
        return outputs


class PassRuntime:
    """What a pass carries between the graphs of one generation (masks, a guard's decisions) and its stats.

    One instance per ``generate`` call, so concurrent calls never share it. Every hook has a neutral default.
    """

    stats: list[dict]
    decoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """The call's picture decoder (accumulated latent -> (B, 3, H, W)) when it has one (set by the optimized model
    before the call; see ``ModelAdapter.preview_decoder``); None otherwise."""

    def __init__(self) -> None:
        self.stats = []

    def inputs(self, graph: ScaleGraph, region: str, device: torch.device) -> dict[str, torch.Tensor]:
        """Values for the inputs the pass added to ``graph`` (``region``: "scale" or a region name)."""
        return {}

    def observe(self, graph: ScaleGraph, region: str, outputs: dict[str, torch.Tensor]) -> None:
        """Read what ``graph`` returned (all of its outputs by name, the ones the pass added included)."""

    def answer(self, graph: ScaleGraph, region: str, device: torch.device) -> Optional[dict[str, torch.Tensor]]:
        """Outputs for a step this pass knows computes nothing (e.g. no batch row runs at a scale step): the graph
        is then not run and the state between scales stays as it is. None (the default): run the graph."""
        return None

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> Optional[torch.Tensor]:
        """Take over the guidance of scale ``index`` (e.g. when some unconditional rows did not run), or None."""
        return None


class GraphRunnerError(GraphsurgeonError):
    """A sampler called the graphs with inputs that do not match what the capture plan declared."""


class GraphRunner(ScaleRunner):
    """Runs captured graphs in place of the eager steps: the state the plan declares (KV caches) travels as graph
    values from one scale to the next, and each pass's runtime fills the inputs it added and reads the outputs."""

    def __init__(self, captured: CapturedModel, runtimes: Sequence[PassRuntime] = ()):
        self.captured, self.runtimes = captured, list(runtimes)
        self.state: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "GraphRunner":
        self.state = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state = {}

    def scale(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        graph = self.captured.scales[index]
        values = self._inputs(graph, "scale", inputs)
        device = _device(inputs)
        answered = next((a for a in (r.answer(graph, "scale", device) for r in self.runtimes) if a is not None), None)
        if answered is not None:
            outputs = dict(answered)
        else:
            values.update({name: self.state[name] for name in graph.state_inputs})
            outputs = dict(zip(graph.output_names + graph.state_outputs, graph.module(**values)))
            self.state = {name: outputs.pop(name) for name in graph.state_outputs}
        for runtime in self.runtimes:
            runtime.observe(graph, "scale", outputs)
        return outputs

    def residual(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        graph = self.captured.residual[index]
        outputs = dict(zip(graph.output_names, graph.module(**self._inputs(graph, "residual", inputs))))
        if graph.sampled_input is not None:
            outputs.setdefault(graph.sampled_input, inputs[graph.sampled_input])
        for runtime in self.runtimes:
            runtime.observe(graph, "residual", outputs)
        return outputs

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> torch.Tensor:
        for runtime in self.runtimes:
            guided = runtime.guide(index, logits, batch, rule)
            if guided is not None:
                return guided
        return rule(logits[:batch], logits[batch:])

    def _inputs(self, graph: ScaleGraph, region: str, given: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The sampler's inputs the graph declares, plus the passes' inputs; a missing one is named."""
        values: dict[str, Any] = {}
        for runtime in self.runtimes:
            values.update(runtime.inputs(graph, region, _device(given)))
        declared = [name for name in graph.input_names if name not in values]
        missing = [name for name in declared if name not in given]
        if missing:
            raise GraphRunnerError(f"{region} step {graph.index}: the sampler gave {sorted(given)} but the capture "
                                   f"plan declares the input(s) {missing}")
        values.update({name: given[name] for name in declared})
        return values


def _device(given: dict[str, Any]) -> torch.device:
    """Where the sampler's inputs live (the first tensor's device; CPU without one)."""
    return next((v.device for v in given.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
