"""Node annotations. Everything graphsurgeon records on a node lives in ``node.meta["graphsurgeon"]``."""
from __future__ import annotations

from typing import Any

import torch.fx

NAMESPACE = "graphsurgeon"


def annotations(node: torch.fx.Node) -> dict[str, Any]:
    """The node's graphsurgeon annotations (created empty on first use)."""
    return node.meta.setdefault(NAMESPACE, {})


def annotate(node: torch.fx.Node, **values: Any) -> torch.fx.Node:
    annotations(node).update(values)
    return node


def meta_value(node: Any) -> Any:
    """The example value (a meta tensor, or a Python value) recorded for a node during capture."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node
