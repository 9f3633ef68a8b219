"""The blocks of a captured scale graph: which nodes each declared block computes, and its token stream.

A plan's ``blocks`` (module paths) name the layers a scale step runs on its token stream. Tracing records, for
every node, the modules it was called in (``meta["nn_module_stack"]``); a block's region is the nodes recorded
inside its module. A pass that works per layer (gathers a different token set before each block) needs, per
block, where the stream enters (the one external input that carries the token axis and has the stream's shape)
and where it leaves (the one node of the region, on the token axis, that later nodes read). Anything else (two
streams, a block called twice, blocks out of order) is refused with the block named: the pass could not tell
which value to gather.

Inside a block, :func:`sublayers` follows the stream through its residual additions ``s + f(s)`` (attention, cross-
attention, MLP of a pre-norm block): a pass that selects tokens per sub-layer gathers ``s`` for ``f`` and puts
``f``'s output back before the addition.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx

from ..errors import ConfigError
from ..meta import annotations

ROOT = "model"
"""The capture root's attribute holding the plan's model (so module paths in the graph start with it)."""


@dataclass(frozen=True)
class BlockRegion:
    """One block's part of a scale graph."""

    path: str
    nodes: tuple[torch.fx.Node, ...]
    """The region's nodes, in graph order."""
    stream_in: torch.fx.Node
    """The token stream (rows, tokens, C) the block reads."""
    stream_out: torch.fx.Node
    """The updated stream the block returns (what the next block or the head reads)."""


def block_regions(graph: torch.fx.Graph, paths: Sequence[str], scale_index: int, pass_name: str) -> list[BlockRegion]:
    """The regions of the blocks ``paths`` in ``graph`` (a scale step), in order; a ConfigError names what does
    not fit (see the module docstring)."""
    if not paths:
        raise ConfigError(f"pass '{pass_name}' works per block: the capture plan declares no blocks "
                          "(CapturePlan.blocks, the module paths of the blocks in order)")
    order = {node: position for position, node in enumerate(graph.nodes)}
    members: dict[str, list[torch.fx.Node]] = {path: [] for path in paths}
    keys = {f"{ROOT}.{path}": path for path in paths}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        owner = next((keys[k] for k in stack if k in keys), None)
        if owner is not None:
            members[owner].append(node)
    regions, previous_end = [], -1
    for path in paths:
        nodes = members[path]
        where = f"pass '{pass_name}': block {path!r} of scale {scale_index}"
        if not nodes:
            raise ConfigError(f"{where} computes nothing in the graph (is the path right? CapturePlan.blocks)")
        first, last = order[nodes[0]], order[nodes[-1]]
        if last - first + 1 != len(nodes) or first <= previous_end:
            raise ConfigError(f"{where} is not one contiguous call after the previous block (called twice, or "
                              "interleaved with other code)")
        previous_end = last
        regions.append(_region(path, nodes, where))
    return regions


def _region(path: str, nodes: list[torch.fx.Node], where: str) -> BlockRegion:
    inside = set(nodes)
    leaving = [n for n in nodes if _on_tokens(n) and any(u not in inside and u.op != "output" for u in n.users)]
    if len(leaving) != 1:
        raise ConfigError(f"{where}: {len(leaving)} values on the token axis leave the block "
                          f"({[n.name for n in leaving]}); a per-block pass needs exactly one (the stream)")
    stream_out = leaving[0]
    shape = stream_out.meta["val"].shape
    entering = {a for n in nodes for a in n.all_input_nodes if a not in inside and _on_tokens(a)
                and tuple(a.meta["val"].shape) == tuple(shape)}
    if len(entering) != 1:
        raise ConfigError(f"{where}: {len(entering)} inputs of the stream's shape {tuple(shape)} enter the block "
                          f"({sorted(n.name for n in entering)}); a per-block pass needs exactly one")
    return BlockRegion(path=path, nodes=tuple(nodes), stream_in=entering.pop(), stream_out=stream_out)


def _on_tokens(node: torch.fx.Node) -> bool:
    return isinstance(annotations(node).get("token_axis"), int) and isinstance(node.meta.get("val"), torch.Tensor)


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a block: ``add = stream_in + delta``, ``delta`` computed from ``stream_in``."""

    stream_in: torch.fx.Node
    delta: torch.fx.Node
    add: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]
    """The nodes computing ``delta`` from ``stream_in`` (what a per-sub-layer gather must feed), in graph order."""


_ADDS = (operator.add, torch.add)


def sublayers(region: BlockRegion, scale_index: int, pass_name: str) -> list[Sublayer]:
    """The residual branches of ``region`` in order, from its stream in to its stream out. An addition whose branch
    does not read the stream (e.g. a per-row condition added to every token) is followed but not listed; a stream
    that is read elsewhere in the block, or that no single addition continues, is refused with the block named."""
    inside = set(region.nodes)
    where = f"pass '{pass_name}': block {region.path!r} of scale {scale_index}"
    shape = tuple(region.stream_out.meta["val"].shape)
    result, stream = [], region.stream_in
    while stream is not region.stream_out:
        adds = [u for u in stream.users if u in inside and _is_add(u) and _other(u, stream) is not None
                and tuple(u.meta["val"].shape) == shape]
        if len(adds) != 1:
            raise ConfigError(f"{where}: cannot follow the token stream from {stream.name} ({len(adds)} residual "
                              "additions continue it)")
        add = adds[0]
        delta = _other(add, stream)
        branch = _between(stream, delta, inside)
        readers = {u for u in stream.users if u in inside} - {add} - set(branch)
        if readers:
            raise ConfigError(f"{where}: the stream {stream.name} is read outside its residual branch "
                              f"({sorted(u.name for u in readers)})")
        if branch:
            result.append(Sublayer(stream_in=stream, delta=delta, add=add, nodes=tuple(branch)))
        stream = add
    return result


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")


def _other(add: torch.fx.Node, stream: torch.fx.Node):
    """The other operand of ``add`` when ``stream`` is one of its two and the other is a node."""
    operands = list(add.args[:2])
    if len(operands) != 2 or stream not in operands or operands[0] is operands[1]:
        return None
    other = operands[1] if operands[0] is stream else operands[0]
    return other if isinstance(other, torch.fx.Node) else None


def _between(source: torch.fx.Node, target: torch.fx.Node, inside: set) -> list[torch.fx.Node]:
    """Nodes of ``inside`` that depend on ``source`` and that ``target`` depends on (``target`` included), in graph
    order; empty when ``target`` does not depend on ``source``."""
    ancestors, todo = set(), [target]
    while todo:
        node = todo.pop()
        if node in ancestors or node is source or node not in inside:
            continue
        ancestors.add(node)
        todo += node.all_input_nodes
    descendants, todo = set(), [u for u in source.users if u in ancestors]
    while todo:
        node = todo.pop()
        if node in descendants:
            continue
        descendants.add(node)
        todo += [u for u in node.users if u in ancestors]
    order = {node: i for i, node in enumerate(next(iter(inside)).graph.nodes)}
    return sorted(descendants, key=order.__getitem__)
