"""A networkx view of a captured graph, for analysis and diffs."""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx

from .meta import annotations


def describe_target(node: torch.fx.Node) -> str:
    if node.op in ("call_module", "get_attr", "call_method", "placeholder", "output"):
        return str(node.target)
    return getattr(node.target, "__qualname__", None) or str(node.target)


def to_networkx(module: torch.fx.GraphModule) -> nx.DiGraph:
    """Nodes keyed by FX name, with op, target, shape, dtype and graphsurgeon annotations; data edges."""
    graph = nx.DiGraph()
    for node in module.graph.nodes:
        value = node.meta.get("val")
        graph.add_node(node.name, op=node.op, target=describe_target(node),
                       shape=tuple(value.shape) if isinstance(value, torch.Tensor) else None,
                       dtype=str(value.dtype) if isinstance(value, torch.Tensor) else None,
                       **{k: v for k, v in annotations(node).items() if isinstance(v, (int, str, bool, type(None)))})
        for position, source in enumerate(node.all_input_nodes):
            graph.add_edge(source.name, node.name, position=position)
    return graph
