"""The blocks of a captured scale graph: which nodes each declared block computes, and its token stream.

A plan's ``blocks`` (module paths) name the layers a scale step runs on its token stream. Tracing records, for
every node, the modules it was called in (``meta["nn_module_stack"]``); a block's region is the nodes recorded
inside its module. A pass that works per layer (gathers a different token set before each block) needs, per
block, where the stream enters (the one external input that carries the token axis and has the stream's shape)
and where it leaves (the one node of the region, on the token axis, that later nodes read). Anything else (two
streams, a block called twice, blocks out of order) is refused with the block named: the pass could not tell
which value to gather.
"""
from __future__ import annotations

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
