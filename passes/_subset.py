"""Computing a token subset inside part of a scale graph (one block, one sub-layer of a block).

Shared by the passes that choose a different subset per block or per sub-layer (DepthVAR, FastVAR): the value
entering the part is gathered per row for the part's own uses only, per-token side values read inside the part
(position tables) are gathered with the same index, and token-count literals inside the part become the gathered
count. What leaves the part is the pass's to put back (each has its own restoration rule).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx
import torch.nn.functional as F

from graphsurgeon.capture.dynamic import generalize_axis
from graphsurgeon.errors import ConfigError
from graphsurgeon.rewrite import tag
from passes.lhep import copy_token_meta, gather_tokens, side_row_axis


def gather_inside(module: torch.fx.GraphModule, scale, source: torch.fx.Node, part: Iterable[torch.fx.Node],
                  index: torch.fx.Node, valid: torch.fx.Node, pass_name: str, count_role: str
                  ) -> tuple[torch.fx.Node, list[torch.fx.Node], list[str]]:
    """Gather ``source`` (rows, tokens, C) with ``index`` for the nodes of ``part`` (which must come after
    ``index`` in the graph). Returns the gathered node, every node added and the nodes whose literals changed."""
    graph = module.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    nodes = sorted(part, key=position.__getitem__)
    inside = set(nodes)
    with graph.inserting_before(nodes[0]):
        gathered = tag(graph.call_function(gather_tokens, (source, index, valid, 1, 0)), pass_name, "gather")
    source.replace_all_uses_with(gathered, delete_user_cb=lambda user: user in inside)
    copy_token_meta(source, gathered)
    added = [gathered] + _gather_side_values(graph, scale, inside, position, index, valid, pass_name)
    changed = generalize_axis(module, gathered, 1, scale.tokens, key="token_axis", role=count_role,
                              keep_roles=("token_side_input",), within=nodes)
    return gathered, added, changed


def _gather_side_values(graph: torch.fx.Graph, scale, inside: set, position: dict, index: torch.fx.Node,
                        valid: torch.fx.Node, pass_name: str) -> list[torch.fx.Node]:
    """Per-token side values read inside the part, gathered with its index; uses elsewhere keep the full values
    (another part gathers its own tokens from them)."""
    nodes = {n.name: n for n in graph.nodes}
    added, done = [], {}
    for value_name, axis, meets in scale.side_values:
        if meets not in nodes or nodes[meets] not in inside or value_name not in nodes:
            continue
        value = nodes[value_name]
        row_axis = side_row_axis(scale, value, nodes[meets], pass_name)
        key = (value, axis, row_axis)
        if key not in done:
            first_use = min((u for u in value.users if u in inside), key=position.__getitem__)
            with graph.inserting_before(first_use):
                done[key] = tag(graph.call_function(gather_tokens, (value, index, valid, axis, row_axis)), pass_name,
                                "gather_side_input")
            added.append(done[key])
        side = done[key]
        value.replace_all_uses_with(side, delete_user_cb=lambda user: user in inside and user is not side)
    return added


def refuse_attention_masks(scale, pass_name: str, part: str) -> None:
    """A mask the model gives its attention is made for every token of the scale; computing a subset (``part``:
    "the kept tokens", "a block's tokens", ...) would not fit it, so such a graph is refused, naming the node."""
    for node in scale.module.graph.nodes:
        if node.target is not F.scaled_dot_product_attention:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if mask is not None:
            raise ConfigError(f"pass '{pass_name}': attention {node.name} of scale {scale.index} has a mask made for "
                              f"every token of the scale; it would not fit {part}")
