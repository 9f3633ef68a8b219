"""Export for inspection: readable Python, DOT/SVG drawings, ONNX of one scale step, and a manifest.

ONNX: the chosen scale's graph is copied, opaque ops are replaced by the adapter's plain-torch
decompositions, the token count is made symbolic (``capture.dynamic``), and the result goes through
``torch.onnx.export(dynamo=True)`` with a dynamic token dimension. The file is checked with
``onnx.checker.check_model(full_check=True)`` and run in onnxruntime against PyTorch at two token counts.
"""
from __future__ import annotations

import copy
import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx

from .capture import CapturedModel, ScaleGraph
from .capture.dynamic import generalize_token_count
from .errors import GraphsurgeonError
from .graph_view import describe_target
from .meta import annotations

MANIFEST_SCHEMA_VERSION = 1
_ROLE_COLOURS = {"token_side_input": "#fde2b8", "kv_cache_append": "#cfe3ff", "token_count": "#e2f0d9"}


def to_dot(module: torch.fx.GraphModule, title: str = "graph") -> str:
    """The graph in DOT: one box per node (name, op, target, shape), coloured by graphsurgeon role."""
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, fontname=monospace, fontsize=9];"]
    for node in module.graph.nodes:
        info = annotations(node)
        value = node.meta.get("val")
        shape = f"\\n{tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
        colour = _ROLE_COLOURS.get(info.get("role"), "#e8e8e8" if node.op in ("placeholder", "output") else "white")
        label = f"{node.name}\\n{node.op}: {describe_target(node)[:48]}{shape}".replace('"', "'")
        lines.append(f'  "{node.name}" [label="{label}", style=filled, fillcolor="{colour}"];')
        for source in node.all_input_nodes:
            lines.append(f'  "{source.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)


def to_svg(module: torch.fx.GraphModule) -> str:
    """A self-contained layered drawing (rank = longest path from the inputs); no graphviz needed."""
    rank: dict[str, int] = {}
    for node in module.graph.nodes:
        rank[node.name] = 1 + max((rank[s.name] for s in node.all_input_nodes), default=-1)
    rows: dict[int, list[torch.fx.Node]] = defaultdict(list)
    for node in module.graph.nodes:
        rows[rank[node.name]].append(node)
    box_w, box_h, gap_x, gap_y = 200, 34, 20, 26
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + gap_x
    height = len(rows) * (box_h + gap_y) + gap_y
    position = {}
    for r, nodes in rows.items():
        for i, node in enumerate(nodes):
            position[node.name] = (gap_x + i * (box_w + gap_x), gap_y + r * (box_h + gap_y))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">']
    for node in module.graph.nodes:
        x, y = position[node.name]
        for source in node.all_input_nodes:
            sx, sy = position[source.name]
            parts.append(f'<line x1="{sx + box_w / 2}" y1="{sy + box_h}" x2="{x + box_w / 2}" y2="{y}" stroke="#999"/>')
    for node in module.graph.nodes:
        x, y = position[node.name]
        colour = _ROLE_COLOURS.get(annotations(node).get("role"), "#f4f4f4" if node.op in ("placeholder", "output") else "#fff")
        value = node.meta.get("val")
        shape = str(tuple(value.shape)) if isinstance(value, torch.Tensor) else ""
        parts.append(f'<g><title>{html.escape(node.format_node() or node.name)}</title>'
                     f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" fill="{colour}" stroke="#555"/>'
                     f'<text x="{x + 4}" y="{y + 13}">{html.escape(node.name[:30])}</text>'
                     f'<text x="{x + 4}" y="{y + 27}" fill="#555">{html.escape((describe_target(node)[:16] + " " + shape)[:32])}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def _export_copy(scale: ScaleGraph, decompositions: dict) -> torch.fx.GraphModule:
    """A copy of the scale graph with opaque ops decomposed and the token count symbolic."""
    module = torch.fx.GraphModule(scale.module, copy.deepcopy(scale.module.graph))
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in decompositions:
            node.target = decompositions[node.target]
    generalize_token_count(module, scale.token_input, scale.token_axis, scale.tokens)
    return module


def _example_inputs(module: torch.fx.GraphModule, tokens: int, token_input: str, token_axis: int,
                    real: dict[str, torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target in real:
            inputs.append(real[node.target])
            continue
        value = node.meta["val"]
        shape = list(value.shape)
        if node.target == token_input:
            shape[token_axis] = tokens
        inputs.append(torch.randn(shape, generator=generator).to(value.dtype))
    return inputs


def export_onnx(captured: CapturedModel, scale_index: int, path: Union[str, Path], check: bool = True) -> dict[str, Any]:
    """Export one scale step with a dynamic token dimension; returns its manifest entry."""
    import onnx

    scale = captured.scales[scale_index]
    module = _export_copy(scale, captured.plan.export_decompositions)
    inputs = _example_inputs(module, scale.tokens, scale.token_input, scale.token_axis, captured.example_values)
    names = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    tokens_dim = torch.export.Dim("tokens", min=2, max=max(2 * scale.tokens, 4))
    dynamic = tuple({scale.token_axis: tokens_dim} if name == scale.token_input else None for name in names)
    with torch.no_grad():
        try:
            program = torch.onnx.export(module, tuple(inputs), dynamo=True, dynamic_shapes=dynamic,
                                        input_names=names, verbose=False)
        except Exception as err:
            raise GraphsurgeonError(f"ONNX export of scale {scale_index} failed: {type(err).__name__}: {err}") from err
    program.save(str(path))
    model = onnx.load(str(path))
    entry: dict[str, Any] = {
        "file": Path(path).name, "scale": scale_index, "grid": list(scale.grid),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "op_histogram": dict(Counter(n.op_type for n in model.graph.node).most_common()),
        "inputs": names, "outputs": scale.output_names + scale.state_outputs,
        "dynamic_dims": {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim if d.dim_param]
                         for i in list(model.graph.input) + list(model.graph.output)
                         if any(d.dim_param for d in i.type.tensor_type.shape.dim)},
    }
    if check:
        onnx.checker.check_model(model, full_check=True)
        entry["checker"] = "onnx.checker.check_model(full_check=True): passed"
        entry["onnxruntime"] = _compare_with_onnxruntime(path, module, scale, captured.example_values)
    return entry


def _compare_with_onnxruntime(path, module: torch.fx.GraphModule, scale: ScaleGraph, real: dict) -> list[dict[str, Any]]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    results = []
    for tokens in (scale.tokens, max(2, scale.tokens // 2)):
        inputs = _example_inputs(module, tokens, scale.token_input, scale.token_axis, real, seed=tokens)
        with torch.no_grad():
            expected = module(*[t.clone() for t in inputs])
        got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})
        pairs = [(torch.from_numpy(g), e) for g, e in zip(got, expected)]
        results.append({"tokens": tokens, "outputs": len(got),
                         "max_abs_err": max(float((g - e).abs().max()) for g, e in pairs),
                         "max_rel_l2": max(float((g - e).norm() / e.norm().clamp_min(1e-30)) for g, e in pairs)})
    return results


def export_captured(captured: CapturedModel, directory: Union[str, Path], onnx_scale: Optional[int] = -1,
                    check: bool = True) -> dict[str, Any]:
    """Write every scale graph as readable Python, DOT and SVG, one scale as ONNX, and ``manifest.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    graphs = []
    for scale in captured.scales:
        stem = f"scale_{scale.index:02d}"
        (directory / f"{stem}.py").write_text(scale.module.print_readable(print_output=False))
        (directory / f"{stem}.dot").write_text(to_dot(scale.module, stem))
        (directory / f"{stem}.svg").write_text(to_svg(scale.module))
        graphs.append({"scale": scale.index, "grid": list(scale.grid), "tokens": scale.tokens,
                       "nodes": len(scale.module.graph.nodes), "files": [f"{stem}.py", f"{stem}.dot", f"{stem}.svg"]})
    manifest: dict[str, Any] = {"schema_version": MANIFEST_SCHEMA_VERSION, "torch": torch.__version__, "graphs": graphs}
    if onnx_scale is not None:
        index = onnx_scale % len(captured.scales)
        manifest["onnx"] = export_onnx(captured, index, directory / f"scale_{index:02d}.onnx", check=check)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
