"""Graph edits shared by passes, and the lint that checks them after every pass.

What the rest of the pipeline reads from a node a pass adds (the contract, checked by :func:`lint_pass`):
- every placeholder has ``meta["val"]`` (a meta tensor: its shape and dtype) and, when a pass added it, real
  example values in ``annotations["examples"]`` (export runs the graph on them: indices and flags must be valid,
  so random numbers will not do);
- every node a pass adds is tagged ``pass`` and ``role`` (the diff report, the manifest, the benchmark's timing);
- the scale's ``input_names`` + ``state_inputs`` name its placeholders, and ``output_names`` + ``state_outputs``
  its outputs in order (the graph runner matches inputs by name and outputs by position);
- a function a pass inserts that is not traceable by ``torch.export`` (Python branches on data, host copies)
  has a traceable equivalent registered with :func:`export_form`; ONNX export uses it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from .errors import GraphsurgeonError
from .meta import annotate, annotations

EXPORT_FORMS: dict[Callable, Callable] = {}
"""Inserted function -> an equivalent that ``torch.export`` can trace (no Python branches on tensor values)."""


TOKEN_VALIDITY_ARG = "token_validity_arg"
"""Annotation of a node that reduces over the token positions of its input (e.g. a per-sample discrepancy of
logits): the index of its argument that takes the per-row validity (rows, tokens) of those positions, ``None``
meaning all valid. A pass that pads token rows (each row to the widest of the batch) fills that argument, so
that the reduction covers each row's own tokens and not the padding."""


class PassContractError(GraphsurgeonError):
    """A pass left a graph that breaks the contract the pipeline relies on (a bug in the pass, not user input)."""


def export_form(function: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated function as the traceable form of ``function`` (used by ONNX export)."""
    def register(traceable: Callable) -> Callable:
        EXPORT_FORMS[function] = traceable
        return traceable
    return register


def tag(node: torch.fx.Node, pass_name: str, role: str) -> torch.fx.Node:
    """Mark ``node`` as inserted by ``pass_name`` with ``role``."""
    return annotate(node, **{"pass": pass_name, "role": role})


def add_input(graph: torch.fx.Graph, name: str, after: torch.fx.Node, pass_name: str, role: str,
              examples: Sequence[Any]) -> torch.fx.Node:
    """A new placeholder after ``after``, with its meta value and real example values (at least one)."""
    if not examples:
        raise PassContractError(f"pass '{pass_name}': input {name} needs at least one example value")
    with graph.inserting_after(after):
        node = graph.placeholder(name)
    node.meta["val"] = _meta(examples[0])
    annotations(node)["examples"] = list(examples)
    return tag(node, pass_name, role)


def add_outputs(scale: Any, named: Sequence[tuple[str, torch.fx.Node]]) -> None:
    """Declare ``named`` (name, node) as outputs of ``scale``'s graph after its own outputs and before its state
    outputs, where the runner reads them by position."""
    output = next(n for n in reversed(scale.module.graph.nodes) if n.op == "output")
    values = list(output.args[0])
    cut = len(values) - len(scale.state_outputs)
    output.args = (tuple(values[:cut] + [node for _, node in named] + values[cut:]),)
    scale.output_names = scale.output_names + [name for name, _ in named]


def _meta(value: Any) -> Any:
    return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value


def example_value(node: torch.fx.Node, variant: int = 0) -> Optional[Any]:
    """The ``variant``-th example a pass gave for placeholder ``node`` (cycling), or None."""
    examples = annotations(node).get("examples")
    return examples[variant % len(examples)] if examples else None


def lint_pass(captured: Any, pass_name: str) -> None:
    """Check every graph of ``captured`` after ``pass_name`` ran; a PassContractError names what is wrong."""
    graphs = [("scale", s) for s in captured.scales] + [
        (region, g) for region, graphs in captured.regions.items() for g in graphs]
    for region, scale in graphs:
        where = f"pass '{pass_name}' left {region} graph {scale.index}"
        try:
            scale.module.graph.lint()
        except Exception as err:  # fx raises RuntimeError / AssertionError subclasses
            raise PassContractError(f"{where} malformed: {err}") from err
        placeholders = [n for n in scale.module.graph.nodes if n.op == "placeholder"]
        names = list(scale.input_names) + list(scale.state_inputs)
        if sorted(n.target for n in placeholders) != sorted(names):
            raise PassContractError(f"{where} with inputs {[n.target for n in placeholders]} but declared {names}")
        for node in placeholders:
            if "val" not in node.meta:
                raise PassContractError(f"{where} with input {node.name} that has no meta['val']")
            if "pass" in annotations(node) and not annotations(node).get("examples"):
                raise PassContractError(f"{where} with input {node.name} that has no example values")
        output = next(n for n in reversed(scale.module.graph.nodes) if n.op == "output")
        declared = list(scale.output_names) + list(scale.state_outputs)
        if len(output.args[0]) != len(declared):
            raise PassContractError(f"{where} with {len(output.args[0])} outputs but declared {declared}")
        for node in scale.module.graph.nodes:
            info = annotations(node)
            if "pass" in info and "role" not in info:
                raise PassContractError(f"{where} with node {node.name} tagged pass '{info['pass']}' but no role")
