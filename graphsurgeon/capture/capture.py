"""Capture: per-scale torch.fx graphs of a model, with the state that crosses scales made explicit."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..meta import annotate
from .plan import RESIDUAL, CapturePlan, ScaleSpec, StateSlot
from .report import CaptureReport, ScaleReport
from .token_axes import propagate_token_axes
from .locks import model_lock
from .tracer import CAPTURE_LOCK, CaptureError, ShapeTracer, to_meta

_INPLACE_FUNCTIONS = {"setitem", "iadd", "isub", "imul", "itruediv"}


@dataclass
class ScaleGraph:
    """The captured step of one scale. Inputs: ``input_names`` then ``state_inputs``; outputs likewise."""

    index: int
    grid: tuple[int, ...]
    tokens: int
    token_input: Optional[str]
    token_axis: Optional[int]
    module: torch.fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    state_inputs: list[str]
    state_outputs: list[str]
    row_inputs: tuple[str, ...] = ()
    packed_inputs: Optional[tuple[str, str]] = None
    side_values: list[tuple[str, int, str]] = field(default_factory=list)
    """(value, token axis, meeting node) for every per-token side value found by the token-axis analysis."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Input name -> the node a pass put in its place (e.g. the guarded rows of an input)."""
    active_rows: Optional[str] = None
    """Node holding the batch rows that run, when a pass selects rows."""
    logits_output: Optional[str] = None
    """The declared roles of the step (see :class:`ScaleSpec`): logits of a scale step; drawn values, their grid
    dimensions, the residual map and the accumulated latent of a residual step."""
    sampled_input: Optional[str] = None
    sampled_axes: Optional[tuple[int, int]] = None
    residual_output: Optional[str] = None
    accumulated: Optional[str] = None


@dataclass
class CapturedModel:
    scales: list[ScaleGraph]
    state: list[StateSlot]
    report: CaptureReport
    plan: CapturePlan = field(repr=False)
    regions: dict[str, list[ScaleGraph]] = field(default_factory=dict)
    """Per-scale regions by name, one graph per scale: the plan's residual steps (:data:`RESIDUAL`) and any
    further regions it declares."""
    example_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Real example values the adapter gave for inputs that must hold valid data (e.g. sequence offsets)."""

    def graph_modules(self) -> list[torch.fx.GraphModule]:
        return [scale.module for scale in self.scales]

    @property
    def residual(self) -> list[ScaleGraph]:
        """The residual step graphs, one per scale that runs (empty when the plan declares none)."""
        return self.regions.get(RESIDUAL, [])


def _make_root(model: torch.nn.Module, spec: ScaleSpec, state: list[StateSlot], with_state_inputs: bool):
    """A module whose ``forward`` takes the step's inputs as named arguments (fx traces the signature)."""
    names = list(spec.inputs) + ([slot.name for slot in state] if with_state_inputs else [])
    source = f"def forward(self, {', '.join(names)}):\n    return self.run_step({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - generated from identifiers we control

    def run_step(self, values: dict[str, Any]):
        modules = [self.model.get_submodule(slot.module) for slot in state]
        for slot, module in zip(state, modules):
            _set_state(module, slot, values.get(slot.name))
        outputs = spec.step(self.model, {name: values[name] for name in spec.inputs})
        self.output_keys = list(outputs)
        for slot, module in zip(state, modules):
            outputs[slot.name] = _get_state(module, slot)
        return tuple(outputs.values())

    cls = type(f"Scale{spec.index}Step", (torch.nn.Module,), {"forward": namespace["forward"], "run_step": run_step})
    root = cls()
    root.model = model
    return root, names


def _get_state(module: torch.nn.Module, slot: StateSlot) -> Any:
    value = _fetch(module, slot.attribute)
    if slot.key is None:
        return value
    if not isinstance(value, dict):
        raise CaptureError(f"capture: state {slot.name}: {slot.module}.{slot.attribute} is a "
                           f"{type(value).__name__}, not the dict the StateSlot's key {slot.key!r} indexes")
    return value.get(slot.key)


def _fetch(module: torch.nn.Module, attribute: str) -> Any:
    return module._buffers[attribute] if attribute in module._buffers else vars(module).get(attribute)


def _set_state(module: torch.nn.Module, slot: StateSlot, value: Any) -> None:
    """Put ``value`` where ``slot`` says the module keeps it (an attribute, a buffer or a dict entry)."""
    if slot.key is not None:
        _get_state(module, slot)  # a missing or non-dict container is refused, named
        container = _fetch(module, slot.attribute)
        if value is None:
            container.pop(slot.key, None)
        else:
            container[slot.key] = value
    elif slot.attribute in module._buffers:
        module._buffers[slot.attribute] = value
    else:
        object.__setattr__(module, slot.attribute, value)


def _contains_proxy(value: Any) -> bool:
    if isinstance(value, torch.fx.Proxy):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.fx.Proxy) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, torch.fx.Proxy) for v in value.values())
    return False


def _find_leaks(model: torch.nn.Module, before: dict[int, dict[str, Any]]) -> list[str]:
    """Module attributes left holding traced values; each is put back as it was (or removed)."""
    leaks = []
    for path, module in model.named_modules():
        for store in (vars(module), module._buffers, module._parameters):
            for attribute, value in list(store.items()):
                if isinstance(value, dict) and _contains_proxy(value):  # a container: name and drop the entries
                    for key in [k for k, v in value.items() if isinstance(v, torch.fx.Proxy)]:
                        leaks.append(f"{path or '<root>'}.{attribute}[{key!r}] ({type(module).__name__}; a dict "
                                     f"entry: StateSlot(..., attribute={attribute!r}, key={key!r}))")
                        del value[key]
                elif _contains_proxy(value):
                    leaks.append(f"{path or '<root>'}.{attribute} ({type(module).__name__})")
                    previous = before.get(id(module), {})
                    if attribute in previous:
                        store[attribute] = previous[attribute]
                    else:
                        del store[attribute]
    return leaks


@contextlib.contextmanager
def _eager_compiled_helpers(model: torch.nn.Module, replaced: list[str]) -> Iterator[None]:
    """Swap ``torch.compile``-wrapped callables held in module attributes for the functions they wrap."""
    saved = []
    for path, module in model.named_modules():
        for attribute, value in list(vars(module).items()):
            original = getattr(value, "_torchdynamo_orig_callable", None)
            if callable(value) and original is not None:
                saved.append((module, attribute, value))
                object.__setattr__(module, attribute, original)
                replaced.append(f"{path}.{attribute}" if path else attribute)
    try:
        yield
    finally:
        for module, attribute, value in saved:
            object.__setattr__(module, attribute, value)


def _state_mutations(graph: torch.fx.Graph) -> list[str]:
    """In-place writes whose target is a model tensor (a get_attr), found through views."""
    problems = []
    for node in graph.nodes:
        inplace = (node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")) or (
            node.op == "call_function" and getattr(node.target, "__name__", "") in _INPLACE_FUNCTIONS)
        if not inplace or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        base = node.args[0]
        while base.op in ("call_method", "call_function") and base.args and isinstance(base.args[0], torch.fx.Node):
            base = base.args[0]
        if base.op == "get_attr":
            problems.append(f"{node.name} writes into model tensor '{base.target}' in place")
    return problems


def _trace_scale(plan: CapturePlan, spec: ScaleSpec, device: torch.device, state_values: Optional[list[Any]],
                 memo: dict, state: Optional[list[StateSlot]] = None):
    state = plan.state if state is None else state
    root, names = _make_root(plan.model, spec, state, with_state_inputs=state_values is not None)
    tracer = ShapeTracer(device, plan.leaf_types, plan.leaf_functions)
    tracer.share_memo(memo)
    tracer.placeholder_values = {name: to_meta(value) for name, value in spec.inputs.items()}
    if state_values is not None:
        tracer.placeholder_values.update({slot.name: v for slot, v in zip(state, state_values)})
    modules = [plan.model.get_submodule(slot.module) for slot in state]
    originals = [_get_state(module, slot) for slot, module in zip(state, modules)]
    before = {id(m): dict(vars(m)) for m in plan.model.modules()}
    try:
        graph = tracer.trace(root)
    finally:
        for slot, module, value in zip(state, modules, originals):
            _set_state(module, slot, value)
    leaks = _find_leaks(plan.model, before)
    if leaks:
        raise CaptureError(
            f"capture: scale {spec.index} left traced values in module attributes that the adapter does not declare "
            f"as state: {', '.join(leaks)}. Declare them as StateSlot (explicit graph input/output) or make the "
            "module a leaf.")
    mutations = _state_mutations(graph)
    if mutations:
        raise CaptureError(f"capture: scale {spec.index} mutates model state: {'; '.join(mutations)}")
    return _graph_module(root, graph, f"Scale{spec.index}Step"), names, root.output_keys, tracer


def _graph_module(root: torch.nn.Module, graph: torch.fx.Graph, class_name: str) -> torch.fx.GraphModule:
    """A GraphModule that holds the model itself as ``model`` (fx would copy every attribute path the graph
    reads). Its Python code is generated on first use (``_LazyGraphModule``): ``check`` never needs it, and a
    pass that rewrites the graph would regenerate it anyway."""
    module = _LazyGraphModule(torch.nn.Module(), torch.fx.Graph(), class_name=class_name)
    module.model = root.model
    for node in graph.nodes:
        if node.op == "get_attr" and not node.target.startswith("model."):
            setattr(module, node.target, getattr(root, node.target))  # constants created while tracing
    module.graph = graph
    return module


def capture(plan: CapturePlan, device: Optional[torch.device] = None) -> CapturedModel:
    """Trace every scale of ``plan`` into its own GraphModule and annotate token axes.

    Runs under ``CAPTURE_LOCK`` (captures take turns), then the model's lock (the declared state is swapped in and
    out of its modules; always taken in this order); other threads' module calls and graph runs are not intercepted (:mod:`.interception`).
    """
    if device is None:
        first = next(plan.model.parameters(), None)
        device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
    report = CaptureReport(notes=list(plan.notes), state=[f"{s.name} <- {s.module}.{s.attribute}" for s in plan.state])
    scales: list[ScaleGraph] = []
    state_values: Optional[list[Any]] = None
    memo: dict = {}  # example values of ops already seen, shared by all scales
    with CAPTURE_LOCK, model_lock(plan.model), plan.prepare(), _eager_compiled_helpers(plan.model, report.compiled_helpers):
        start = time.perf_counter()  # not counting the wait for the lock
        for spec in plan.scales:
            t0 = time.perf_counter()
            module, names, step_outputs, tracer = _trace_scale(plan, spec, torch.device(device), state_values, memo)
            output_node = next(n for n in reversed(module.graph.nodes) if n.op == "output")
            outputs = output_node.args[0]
            output_names = step_outputs + [slot.name for slot in plan.state]
            for node, name in zip(outputs, output_names):
                if isinstance(node, torch.fx.Node):
                    annotate(node, output=name)
            state_out = outputs[len(outputs) - len(plan.state):] if plan.state else ()
            state_values = [n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in state_out]
            if plan.state and any(v is None for v in state_values):
                missing = [s.name for s, v in zip(plan.state, state_values) if v is None]
                raise CaptureError(f"capture: scale {spec.index} did not produce declared state {missing}")
            axes = propagate_token_axes(module.graph, spec.token_input, spec.token_axis, spec.tokens)
            n_state_in = len(plan.state) if spec.index != plan.scales[0].index else 0
            scales.append(ScaleGraph(
                index=spec.index, grid=tuple(spec.grid), tokens=spec.tokens, token_input=spec.token_input,
                token_axis=spec.token_axis, module=module,
                input_names=list(spec.inputs), output_names=output_names[:len(output_names) - len(plan.state)],
                state_inputs=names[len(names) - n_state_in:] if n_state_in else [],
                state_outputs=[slot.name for slot in plan.state], row_inputs=tuple(spec.row_inputs),
                packed_inputs=spec.packed_inputs, side_values=list(axes.side_values), **_roles(spec)))
            report.add_scale(ScaleReport.from_graph(spec, module, axes, time.perf_counter() - t0))
            report.record_leaves(module, tracer)
        declared = {RESIDUAL: plan.residual, **plan.regions} if plan.residual else dict(plan.regions)
        regions = {name: [_capture_region(plan, spec, torch.device(device), memo) for spec in specs]
                   for name, specs in declared.items()}
    report.seconds = time.perf_counter() - start
    examples = {name: value for spec in plan.scales for name, value in spec.inputs.items()
                if isinstance(value, torch.Tensor) and value.device.type != "meta"}
    return CapturedModel(scales=scales, state=list(plan.state), report=report, plan=plan, regions=regions,
                         example_values=examples)


def _capture_region(plan: CapturePlan, spec: ScaleSpec, device: torch.device, memo: dict) -> ScaleGraph:
    module, names, outputs, _ = _trace_scale(plan, spec, device, None, memo, state=[])
    for node in module.graph.nodes:
        if node.op == "output":
            for value, name in zip(node.args[0], outputs):
                if isinstance(value, torch.fx.Node):
                    annotate(value, output=name)
    return ScaleGraph(index=spec.index, grid=tuple(spec.grid), tokens=spec.tokens, token_input=spec.token_input,
                      token_axis=spec.token_axis, module=module, input_names=list(spec.inputs), output_names=outputs,
                      state_inputs=[], state_outputs=[], **_roles(spec))


def _roles(spec: ScaleSpec) -> dict[str, Any]:
    return dict(logits_output=spec.logits_output, sampled_input=spec.sampled_input,
                sampled_axes=tuple(spec.sampled_axes) if spec.sampled_axes else None,
                residual_output=spec.residual_output, accumulated=spec.accumulated)
