"""Make a captured scale graph generic in its token count.

Capture specialises every shape. Where the token count appears as a literal (a reshape extent, a slice
bound of a per-token side input, a slice of the token input), this replaces it with ``tokens.size(axis)``
(times the other extents folded into the same dimension), guided by the token-axis annotations. The graph
then runs on any number of tokens: what LHEP needs after a gather, and what ONNX export with a dynamic token
dimension needs. Literals it cannot attribute to the token axis are left alone and listed.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.fx

from ..meta import annotations
from .token_axes import _index_map

_RESHAPES = {"view", "reshape", "expand"}


def generalize_token_count(module: torch.fx.GraphModule, token_input: str, token_axis: int, tokens: int) -> list[str]:
    """Rewrite ``module`` in place; returns the names of nodes whose token-count literal was replaced."""
    placeholder = next(n for n in module.graph.nodes if n.op == "placeholder" and n.target == token_input)
    return generalize_axis(module, placeholder, token_axis, tokens, key="token_axis", role="token_count")


def generalize_axis(module: torch.fx.GraphModule, source: torch.fx.Node, axis: int, extent: int, key: str,
                    role: str, keep_roles: tuple[str, ...] = (), within: Optional[Iterable[torch.fx.Node]] = None
                    ) -> list[str]:
    """Replace literals equal to ``extent`` on the dimension annotated ``key`` by ``source.size(axis)``.

    ``key`` names an axis annotation (``token_axis``, or one made by ``propagate_axis``); the size node is
    inserted right after ``source`` (after the last input when ``source`` is one). Nodes whose role is in
    ``keep_roles`` keep their literals (e.g. side inputs that a pass gathers from at full extent); ``within``:
    only these nodes are rewritten (e.g. one block whose tokens a pass gathered), else every node.
    """
    graph = module.graph
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1] if source.op == "placeholder" else source
    with graph.inserting_after(anchor):
        count = graph.call_method("size", (source, axis))
    annotations(count)["role"] = role
    count.meta["val"] = extent
    changed = []
    scope = set(within) if within is not None else None
    for node in list(graph.nodes):
        if node is count or annotations(node).get("role") in keep_roles or (scope is not None and node not in scope):
            continue
        if node.op == "call_method" and node.target in _RESHAPES:
            changed += _reshape(graph, node, count, extent, key)
        elif node.op == "call_function" and node.target in (operator.getitem, operator.setitem):
            changed += _slice(graph, node, count, extent, key)
    graph.lint()
    module.recompile()
    return changed


def _extent_expression(graph: torch.fx.Graph, node: torch.fx.Node, count: torch.fx.Node, factor: int) -> Any:
    if factor == 1:
        return count
    with graph.inserting_before(node):
        return graph.call_function(operator.mul, (count, factor))


def _reshape(graph: torch.fx.Graph, node: torch.fx.Node, count: torch.fx.Node, tokens: int, key: str) -> list[str]:
    info = annotations(node)
    axis, merged = info.get(key), info.get(f"{key}_merged")
    shape = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else list(node.args[1:])
    if isinstance(axis, int) and axis < len(shape) and shape[axis] == tokens:
        shape[axis] = count
    elif merged and merged[0] < len(shape) and isinstance(shape[merged[0]], int) and shape[merged[0]] % tokens == 0:
        shape[merged[0]] = _extent_expression(graph, node, count, shape[merged[0]] // tokens)
    elif isinstance(axis, int) and axis < len(shape) and shape[axis] == -1:
        return []
    else:
        return []
    node.args = (node.args[0], *shape)
    return [node.name]


def _slice(graph: torch.fx.Graph, node: torch.fx.Node, count: torch.fx.Node, tokens: int, key: str) -> list[str]:
    """``x[..., a:a+n, ...]`` along the token axis of the result -> ``x[..., a:a+size, ...]``."""
    source, index = node.args[0], node.args[1]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return []
    items = list(index) if isinstance(index, tuple) else [index]
    mapping = _index_map(index, value.dim())
    target_axis = annotations(node).get(key) if node.target is operator.getitem else None
    changed = False
    dims_seen = 0
    new_items = []
    for item in items:
        if item is Ellipsis:
            dims_seen += value.dim() - sum(1 for it in items if it is not None and it is not Ellipsis)
            new_items.append(item)
            continue
        if item is None:
            new_items.append(item)
            continue
        in_dim = dims_seen
        dims_seen += 1
        if isinstance(item, slice) and item.step in (None, 1) and isinstance(item.stop, int):
            start = item.start or 0
            out_dim = mapping[in_dim] if in_dim < len(mapping) else None
            on_token_axis = (target_axis is not None and out_dim == target_axis) or (
                node.target is operator.setitem and annotations(source).get(key) == in_dim)
            if on_token_axis and item.stop - start == tokens:
                stop = count if start == 0 else _offset(graph, node, count, start)
                new_items.append(slice(item.start, stop, None))
                changed = True
                continue
        new_items.append(item)
    if not changed:
        return []
    node.args = (source, tuple(new_items) if isinstance(index, tuple) else new_items[0], *node.args[2:])
    return [node.name]


def _offset(graph: torch.fx.Graph, node: torch.fx.Node, count: torch.fx.Node, start: int) -> torch.fx.Node:
    with graph.inserting_before(node):
        return graph.call_function(operator.add, (count, start))
