"""Token-axis analysis: which dimension of each value is the current scale's token axis.

Starting from the scale's token input, the axis is carried through every node by rules for the ops that
move dimensions (permute, transpose, view/reshape, (un)squeeze, stack/unbind, indexing, attention,
matmul) and by right-aligned broadcasting for the rest. Results go to ``node.meta["graphsurgeon"]``:

- ``token_axis``: the dimension (int) of the current scale's tokens, ``None`` if the value has none;
  a list for tuple-valued nodes;
- ``kv_axis``: set on a concatenation that appends this scale's tokens to earlier ones (a KV cache);
- ``role = "token_side_input"``: a value without its own token axis that meets the token axis in a
  broadcasting op with one entry per token (rotary or learned position slices, per-token embeddings). ``side_input_root`` marks
  where such a value is cut from a larger tensor (the node a token gather must replace).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx

from ..meta import annotate, annotations

_SHAPE_MOVERS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "prod", "norm", "logsumexp", "var", "std", "all", "any"}
_PASS_THROUGH = {"to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach", "expand",
                 "expand_as", "__getitem__"}


@dataclass
class TokenAxisSummary:
    tokens: int
    annotated: int = 0
    unresolved: list[str] = field(default_factory=list)
    side_inputs: list[dict[str, Any]] = field(default_factory=list)
    side_values: list[tuple[str, int, str]] = field(default_factory=list)
    """Every (side value, its token axis, the node where it meets the token axis): what a gather must cover."""
    kv_appends: list[str] = field(default_factory=list)


def _name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_module":
        return "module"
    return getattr(node.target, "__name__", str(node.target))


def _rank(value: Any) -> Optional[int]:
    return value.dim() if isinstance(value, torch.Tensor) else None


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _dim_arg(node: torch.fx.Node, position: int, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get("dim", default)


def _index_map(index: Any, in_rank: int) -> list[Optional[int]]:
    """For ``x[index]``: the output dim of each input dim (None where an int removes it)."""
    items = list(index) if isinstance(index, tuple) else [index]
    n_consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    mapping: list[Optional[int]] = []
    out_dim = 0
    for it in items:
        if it is Ellipsis:
            for _ in range(in_rank - n_consumed):
                mapping.append(out_dim)
                out_dim += 1
        elif it is None:
            out_dim += 1
        elif isinstance(it, int):
            mapping.append(None)
        else:  # slice or tensor index: keeps a dimension
            mapping.append(out_dim)
            out_dim += 1
    while len(mapping) < in_rank:
        mapping.append(out_dim)
        out_dim += 1
    return mapping


@dataclass(frozen=True)
class Merged:
    """The axis folded into a larger dimension ``dim`` (e.g. batch x tokens): consecutive indices of the axis are
    ``stride`` apart inside that dimension (1: it varies fastest, as tokens do in batch x tokens)."""

    dim: int
    extent: int
    stride: int = 1


def _reshape_axis(src_shape: torch.Size, axis: Any, out_shape: torch.Size, extent: int) -> Any:
    """Where the axis lands after a reshape, found by the element distance between its consecutive indices."""
    dim, stride = (axis.dim, axis.stride) if isinstance(axis, Merged) else (axis, 1)
    inner = stride
    for e in src_shape[dim + 1:]:
        inner *= e
    for j in range(len(out_shape)):
        out_inner = 1
        for e in out_shape[j + 1:]:
            out_inner *= e
        if out_inner == inner and out_shape[j] == extent:
            return j
        if inner % out_inner == 0 and (out_shape[j] * out_inner) % (inner * extent) == 0:
            return Merged(j, extent, inner // out_inner)
    return None


def _infer(node: torch.fx.Node, axes: dict[torch.fx.Node, Any]) -> tuple[Any, Optional[str]]:
    """(token axis of the node's value, note) from its inputs' axes."""
    value = node.meta.get("val")
    carriers = [a for a in node.all_input_nodes if isinstance(axes.get(a), (int, list, Merged))]
    if not carriers:
        return None, None
    name = _name(node)
    src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else carriers[0]
    src_axis = axes.get(src)
    src_value = src.meta.get("val") if isinstance(src, torch.fx.Node) else None

    if name in ("getitem",) and isinstance(src_axis, list):
        index = node.args[1]
        return (src_axis[index] if isinstance(index, int) and index < len(src_axis) else None), None
    if isinstance(value, (tuple, list)):
        if name in ("unbind", "split", "chunk") and isinstance(src_axis, int):
            dim = _norm(_dim_arg(node, 1 if name == "unbind" else 2, 0) or 0, src_value.dim())
            if name == "unbind":
                return [None if dim == src_axis else src_axis - (dim < src_axis) for _ in value], None
            return [None if dim == src_axis else src_axis for _ in value], None
        return None, None
    if not isinstance(value, torch.Tensor):
        return None, None
    if not isinstance(src_axis, (int, Merged)):
        src = next((a for a in carriers if isinstance(axes.get(a), (int, Merged))), None)
        if src is None:
            return None, None
        src_axis, src_value = axes[src], src.meta.get("val")
    if not isinstance(src_value, torch.Tensor):
        return None, None
    out = value.shape
    if isinstance(src_axis, Merged):  # only reshapes and same-shape ops carry a folded token axis
        extent = src_axis.extent
        if name in _SHAPE_MOVERS or name == "squeeze":
            return _reshape_axis(src_value.shape, src_axis, out, extent), None
        if value.dim() == src_value.dim() and out[src_axis.dim] == src_value.shape[src_axis.dim]:
            return src_axis, None
        return None, None
    extent = src_value.shape[src_axis]

    def checked(dim: Optional[int]) -> Optional[int]:
        return dim if dim is not None and 0 <= dim < len(out) and out[dim] == extent else None

    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        dims = [_norm(d, src_value.dim()) for d in dims]
        return checked(dims.index(src_axis)), None
    if name in ("transpose", "swapaxes"):
        a, b = (_norm(d, src_value.dim()) for d in node.args[1:3])
        return checked(b if src_axis == a else a if src_axis == b else src_axis), None
    if name in _SHAPE_MOVERS or name == "squeeze":
        return _reshape_axis(src_value.shape, src_axis, out, extent), None
    if name == "unsqueeze":
        dim = _norm(_dim_arg(node, 1), value.dim())
        return checked(src_axis + (dim <= src_axis)), None
    if name == "getitem":
        mapping = _index_map(node.args[1], src_value.dim())
        return checked(mapping[src_axis] if src_axis < len(mapping) else None), None
    if name in ("cat", "concat", "concatenate"):
        tensors = node.args[0]
        dim = _norm(_dim_arg(node, 1, 0), value.dim())
        carrier_axes = [axes.get(t) for t in tensors if isinstance(t, torch.fx.Node)]
        if dim in carrier_axes:
            return None, "kv_append"
        return checked(next(a for a in carrier_axes if isinstance(a, int))), None
    if name == "stack":
        dim = _norm(_dim_arg(node, 1, 0), value.dim())
        return checked(src_axis + (dim <= src_axis)), None
    if name in ("scaled_dot_product_attention",):
        query = node.args[0] if node.args else node.kwargs.get("query")
        q_axis = axes.get(query)
        return checked(q_axis if isinstance(q_axis, int) else None), None
    if name in ("matmul", "bmm", "matmul_") or node.target is operator.matmul:
        first = node.args[0]
        if first is src and src_axis < src_value.dim() - 1:
            return checked(src_axis + value.dim() - src_value.dim()), None
        return None, None
    if name in _REDUCTIONS and _dim_arg(node, 1) is not None:
        dims = _dim_arg(node, 1)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if src_axis in [_norm(d, src_value.dim()) for d in dims]:
            return None, None
    # elementwise, broadcasting, modules that act on the last dim, softmax, normalize, linear ...
    aligned = checked(src_axis + value.dim() - src_value.dim())
    if aligned is not None:
        return aligned, None
    candidates = [j for j, e in enumerate(out) if e == extent]
    return (candidates[0], "guessed") if len(candidates) == 1 else (None, "lost")


def _side_inputs(node: torch.fx.Node, axes: dict, summary: TokenAxisSummary, origin: dict) -> None:
    """Inputs that broadcast against the token axis one entry per token without coming from the token input:
    values with no token axis of their own, or values derived from a side input already found."""
    axis = axes.get(node)
    value = node.meta.get("val")
    if not isinstance(axis, int) or not isinstance(value, torch.Tensor) or node.op not in ("call_function", "call_method"):
        return
    if origin.get(node) != "token":
        return
    for arg in node.all_input_nodes:
        arg_value = arg.meta.get("val")
        if not isinstance(arg_value, torch.Tensor) or arg_value.dim() == 0:
            continue
        if origin.get(arg) == "side":
            summary.side_values.append((arg.name, axes[arg], node.name))
            continue
        if axes.get(arg) is not None:
            continue
        aligned = axis - (value.dim() - arg_value.dim())
        if 0 <= aligned < arg_value.dim() and arg_value.shape[aligned] == value.shape[axis] and value.shape[axis] > 1:
            summary.side_values.append((arg.name, aligned, node.name))
            root = _trace_side_input(arg, aligned, axes, origin)
            entry = {"meets": node.name, "value": arg.name, "axis": aligned, "root": root.name,
                     "root_source": _source_of(root)}
            if entry["root"] not in {e["root"] for e in summary.side_inputs}:
                summary.side_inputs.append(entry)


def _trace_side_input(node: torch.fx.Node, axis: int, axes: dict, origin: dict) -> torch.fx.Node:
    """Walk back from a per-token side value to the node that cuts it from a larger tensor."""
    while True:
        annotate(node, token_axis=axis, role="token_side_input")
        axes[node] = axis
        origin[node] = "side"
        name = _name(node)
        parent = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        parent_value = parent.meta.get("val") if parent is not None else None
        if parent is None or not isinstance(parent_value, torch.Tensor) or name not in _PASS_THROUGH | {"getitem"}:
            annotate(node, side_input_root=True)
            return node
        parent_axis = axis
        if name == "getitem":
            mapping = _index_map(node.args[1], parent_value.dim())
            if axis not in mapping:
                annotate(node, side_input_root=True)
                return node
            parent_axis = mapping.index(axis)
        if parent_value.shape[parent_axis] != node.meta["val"].shape[axis]:
            annotate(node, side_input_root=True)  # this node selects the scale's entries from a larger table
            return node
        node, axis = parent, parent_axis


def _source_of(node: torch.fx.Node) -> str:
    while node.all_input_nodes and node.op not in ("placeholder", "get_attr"):
        node = node.all_input_nodes[0]
    return f"{node.op}:{node.target}"


def propagate_token_axes(graph: torch.fx.Graph, token_input: str, token_axis: int, tokens: int,
                         overrides: Optional[dict[str, Any]] = None) -> TokenAxisSummary:
    """Annotate every node of ``graph``; ``overrides`` (node name -> axis) lets an adapter correct the result."""
    summary = TokenAxisSummary(tokens=tokens)
    axes: dict[torch.fx.Node, Any] = {}
    origin: dict[torch.fx.Node, str] = {}  # where a node's token axis comes from: the token input or a side input
    overrides = overrides or {}
    for node in graph.nodes:
        if node.op == "placeholder":
            axis, note = (token_axis if node.target == token_input else None), None
            if axis is not None:
                origin[node] = "token"
        elif node.op == "output":
            continue
        else:
            axis, note = _infer(node, axes)
            carriers = [a for a in node.all_input_nodes if a in origin]
            if carriers:
                origin[node] = "token" if any(origin[a] == "token" for a in carriers) else "side"
        if node.name in overrides:
            axis, note = overrides[node.name], "adapter"
        axes[node] = axis
        info = annotations(node)
        info["token_axis"] = axis if isinstance(axis, (int, list)) or axis is None else None
        if isinstance(axis, Merged):
            info["token_axis_merged"] = (axis.dim, axis.extent, axis.stride)
        if note == "kv_append":
            info["kv_axis"] = _norm(_dim_arg(node, 1, 0), node.meta["val"].dim())
            info["role"] = "kv_cache_append"
            summary.kv_appends.append(node.name)
        elif note in ("guessed", "lost"):
            summary.unresolved.append(f"{node.name} ({note})")
        if isinstance(axis, (int, Merged)):
            summary.annotated += 1
        _side_inputs(node, axes, summary, origin)
    return summary


def propagate_axis(graph: torch.fx.Graph, source: torch.fx.Node, axis: int, extent: int, key: str) -> int:
    """Annotate ``key`` (and ``key + "_merged"``) on every node downstream of ``source``'s dimension ``axis``
    (e.g. the batch rows of the token input, or the packed rows of a packed per-row input). Returns the count annotated."""
    axes: dict[torch.fx.Node, Any] = {}
    seen = False
    annotated = 0
    for node in graph.nodes:
        if node is source:
            axis_value, seen = axis, True
        elif not seen or node.op in ("placeholder", "output"):
            continue
        else:
            axis_value, _ = _infer(node, axes)
        axes[node] = axis_value
        info = annotations(node)
        info[key] = axis_value if isinstance(axis_value, (int, list)) or axis_value is None else None
        if isinstance(axis_value, Merged):
            info[f"{key}_merged"] = (axis_value.dim, axis_value.extent, axis_value.stride)
        annotated += isinstance(axis_value, (int, Merged))
    return annotated
