"""Export for inspection: readable Python, DOT/SVG drawings, ONNX of one scale step, and a manifest.

ONNX: the chosen scale's graph is copied, opaque ops are replaced by the adapter's plain-torch
decompositions and the functions passes inserted by their traceable forms (``rewrite.export_form``), and the
result goes through ``torch.onnx.export(dynamo=True)``. A graph no pass rewrote gets a dynamic token dimension
(the token count made symbolic by ``capture.dynamic``) and is checked at two token counts; a rewritten one keeps
the scale's token count as input (LHEP ranks the scale's grid) and its data-dependent sizes (kept tokens,
running rows) stay dynamic inside: it is checked on the passes' example inputs (e.g. every CFG row running, then
one dropped; two residuals keeping different token counts). The file is checked with
``onnx.checker.check_model(full_check=True)`` and run in onnxruntime against the PyTorch graph; the PyTorch
copy with traceable forms is also compared with the graph as it runs. torch.onnx's notices that concern no
export here (an optional torchvision it skips, a deprecation inside torch) are silenced; its errors are not.

The export is built in a hidden folder inside the target and moved into place only once complete: a failed
ONNX step, an error or an interrupt (SIGINT, SIGTERM) leaves the previous export there as it was.
"""
from __future__ import annotations

import copy
import html
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx

from .capture import CapturedModel, ScaleGraph
from .capture.dynamic import generalize_token_count
from .errors import ConfigError, GraphsurgeonError
from .graph_view import describe_target
from .jsonio import terminate_as_interrupt, to_strict_json
from .meta import annotations
from .rewrite import EXPORT_FORMS, example_value

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
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


def rewritten_by_passes(module: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """Nodes a pass inserted, counted per pass and role (what the manifest lists)."""
    inserted: dict[str, Counter] = defaultdict(Counter)
    for node in module.graph.nodes:
        info = annotations(node)
        if "pass" in info:
            inserted[info["pass"]][str(info.get("role", ""))] += 1
    return {name: dict(counts) for name, counts in sorted(inserted.items())}


def attention_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                   enable_gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention as plain matmul/softmax. In a rewritten graph the query and key lengths are
    data-dependent sizes, on which torch's fused attention selects its kernel; export traces this instead."""
    if dropout_p or is_causal or enable_gqa:
        raise GraphsurgeonError("export of a rewritten graph supports attention without dropout, causal mask or GQA")
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1) @ value


def _export_copy(scale: ScaleGraph, decompositions: dict) -> torch.fx.GraphModule:
    """A copy of the scale graph with opaque ops decomposed, inserted functions in traceable form, and (when no
    pass rewrote it) the token count symbolic."""
    module = torch.fx.GraphModule(scale.module, copy.deepcopy(scale.module.graph))
    module.training = False  # an inference step (the flag only: the submodules are the model's own)
    replacements = {**EXPORT_FORMS, **decompositions}
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in replacements:
            node.target = replacements[node.target]
    if not rewritten_by_passes(module):
        generalize_token_count(module, scale.token_input, scale.token_axis, scale.tokens)
    else:
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is torch.nn.functional.scaled_dot_product_attention:
                node.target = attention_math
    module.recompile()
    return module


def _example_inputs(module: torch.fx.GraphModule, tokens: int, token_input: str, token_axis: int,
                    real: dict[str, torch.Tensor], seed: int = 0, variant: int = 0) -> list[torch.Tensor]:
    """Inputs to run the graph on: real values where the adapter or a pass gave them (offsets, row indices,
    flags: ``variant`` picks among a pass's examples), seeded random numbers elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        given = example_value(node, variant)
        if given is not None:
            inputs.append(given)
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
    inserted = rewritten_by_passes(module)
    dynamic = None
    if not inserted:
        tokens_dim = torch.export.Dim("tokens", min=2, max=max(2 * scale.tokens, 4))
        dynamic = tuple({scale.token_axis: tokens_dim} if name == scale.token_input else None for name in names)
    with torch.no_grad(), _known_notices_silenced():
        try:
            program = torch.onnx.export(module, tuple(inputs), dynamo=True, dynamic_shapes=dynamic,
                                        input_names=names, verbose=False)
        except Exception as err:
            raise GraphsurgeonError(f"ONNX export of scale {scale_index} failed: {_root_cause(err)}") from err
    program.save(str(path))
    model = onnx.load(str(path))
    entry: dict[str, Any] = {
        "file": Path(path).name, "scale": scale_index, "grid": list(scale.grid),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "op_histogram": dict(Counter(n.op_type for n in model.graph.node).most_common()),
        "inputs": names, "outputs": scale.output_names + scale.state_outputs, "inserted_by_passes": inserted,
        "dynamic_dims": {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim if d.dim_param]
                         for i in list(model.graph.input) + list(model.graph.output)
                         if any(d.dim_param for d in i.type.tensor_type.shape.dim)},
    }
    if check:
        onnx.checker.check_model(model, full_check=True)
        entry["checker"] = "onnx.checker.check_model(full_check=True): passed"
        entry["onnxruntime"] = _compare_with_onnxruntime(path, module, scale, captured.example_values, bool(inserted))
    return entry


def _root_cause(err: BaseException) -> str:
    """The innermost cause of ``err`` on one line, without the terminal colour codes torch.onnx puts in its
    messages (its outer error is a page of advice around the cause)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(err)).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


class _DropTorchvisionNotice(logging.Filter):
    """torch.onnx logs, on every export, that it skips torchvision's ops when torchvision is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextmanager
def _known_notices_silenced() -> Iterator[None]:
    """Silence the third-party notices every export prints that concern nothing exported here: torch.onnx's
    "torchvision is not installed" log lines and torch's own ``LeafSpec`` deprecation warning (raised inside
    torch.export). Every other warning and every error still shows."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _DropTorchvisionNotice()
    registration.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.removeFilter(notice)


def _compare_with_onnxruntime(path, module: torch.fx.GraphModule, scale: ScaleGraph, real: dict,
                              rewritten: bool) -> list[dict[str, Any]]:
    """onnxruntime against the PyTorch export copy: at two token counts, or (a rewritten graph) on the passes'
    two example variants, where the copy is also compared with the graph as it runs (its own functions)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    results = []
    cases = [(scale.tokens, 0), (scale.tokens, 1)] if rewritten else [(scale.tokens, 0), (max(2, scale.tokens // 2), 0)]
    for tokens, variant in cases:
        inputs = _example_inputs(module, tokens, scale.token_input, scale.token_axis, real, seed=tokens, variant=variant)
        with torch.no_grad():
            expected = module(*[t.clone() for t in inputs])
        got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})
        result = {"tokens": tokens, "outputs": len(got), **_errors(got, expected)}
        if rewritten:
            with torch.no_grad():
                ran = scale.module(*[t.clone() for t in inputs])
            result["variant"] = variant
            result["vs_graph"] = _errors([r.numpy() for r in ran], expected)
        results.append(result)
    return results


def _errors(got: list, expected: list[torch.Tensor]) -> dict[str, float]:
    """Largest absolute error and relative L2 over outputs (non-float outputs: compared exactly, as 0 or inf)."""
    pairs = [(torch.from_numpy(g).double(), e.double()) for g, e in zip(got, expected)]
    if any(g.shape != e.shape for g, e in pairs):
        return {"max_abs_err": float("inf"), "max_rel_l2": float("inf")}
    pairs = [(torch.nan_to_num(g, nan=0.0), torch.nan_to_num(e, nan=0.0)) for g, e in pairs]
    return {"max_abs_err": max((float((g - e).abs().max()) if g.numel() else 0.0) for g, e in pairs),
            "max_rel_l2": max(float((g - e).norm() / e.norm().clamp_min(1e-30)) for g, e in pairs)}




def resolve_onnx_scale(onnx_scale: int, n_scales: int) -> int:
    """The scale index ``onnx_scale`` names (negative: from the end); a ConfigError when out of range."""
    if not -n_scales <= onnx_scale < n_scales:
        raise ConfigError(f"onnx_scale={onnx_scale} is outside the {n_scales} scales (valid: {-n_scales}..{n_scales - 1})")
    return onnx_scale % n_scales


def _earlier_export_files(directory: Path) -> list[str]:
    """The names of the files an earlier export's ``manifest.json`` in ``directory`` lists (without the manifest);
    a ``manifest.json`` that is not an export's is refused, saying what to do."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return []
    manifest: Any = None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        names = [name for entry in manifest["graphs"] for name in entry["files"]]
        names += [name for entries in manifest.get("regions", {}).values() for entry in entries for name in entry["files"]]
        if "onnx" in manifest:
            names += [manifest["onnx"]["file"], manifest["onnx"]["file"] + ".data"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        found = ("a graphsurgeon generate run's" if isinstance(manifest, dict) and "images" in manifest
                 else f"{type(err).__name__}: {err}")
        raise ConfigError(f"{manifest_path} is not a graphsurgeon export manifest ({found}); export into a new or "
                          f"empty folder, e.g. {directory / 'export'}") from None
    return [name for name in names if isinstance(name, str) and Path(name).name == name
            and name not in ("", ".", "..", MANIFEST) and (directory / name).is_file()]


def prepare_export_directory(directory: Union[str, Path]) -> Path:
    """Check that ``directory`` can take an export and create it: refuse a file, or a ``manifest.json`` that is not
    an export's. Nothing in it is removed here (see :func:`export_captured`)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"export directory {directory} is an existing file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"export directory {directory} cannot be created: {err.strerror}") from None
    _earlier_export_files(directory)
    return directory


@contextmanager
def _staging_folder(directory: Path) -> Iterator[Path]:
    """A hidden folder in ``directory`` to build the export in (the same file system, so moving a file out of it
    is a rename); removed afterwards, whatever happened."""
    staging = directory / f".export.{uuid.uuid4().hex[:12]}.part"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, directory: Path, earlier: list[str]) -> None:
    """Move the complete export from ``staging`` into ``directory``: the earlier manifest goes first (it must never
    list a file already replaced), then every new file is renamed into place, the files the earlier export listed
    and this one does not are removed (nothing else), and the new manifest comes last."""
    names = sorted(path.name for path in staging.iterdir() if path.name != MANIFEST)
    (directory / MANIFEST).unlink(missing_ok=True)
    for name in names:
        os.replace(staging / name, directory / name)
    for name in sorted(set(earlier) - set(names)):
        (directory / name).unlink(missing_ok=True)
    os.replace(staging / MANIFEST, directory / MANIFEST)


def _write_graph(directory: Path, stem: str, module: torch.fx.GraphModule) -> list[str]:
    (directory / f"{stem}.py").write_text(module.print_readable(print_output=False))
    (directory / f"{stem}.dot").write_text(to_dot(module, stem))
    (directory / f"{stem}.svg").write_text(to_svg(module))
    return [f"{stem}.py", f"{stem}.dot", f"{stem}.svg"]


def export_captured(captured: CapturedModel, directory: Union[str, Path], onnx_scale: Optional[int] = -1,
                    check: bool = True) -> dict[str, Any]:
    """Write every scale graph (and every region graph, e.g. the residual step) as readable Python, DOT and
    SVG, one scale as ONNX, and ``manifest.json`` (strict JSON) listing per graph the nodes passes inserted. The
    export is built aside and moved in only once complete; the files an earlier export's manifest in
    ``directory`` lists are then removed, so none is left stale beside the new one (other files are kept)."""
    index = resolve_onnx_scale(onnx_scale, len(captured.scales)) if onnx_scale is not None else None
    directory = prepare_export_directory(directory)
    earlier = _earlier_export_files(directory)
    with terminate_as_interrupt(), _staging_folder(directory) as staging:
        graphs = []
        for scale in captured.scales:
            graphs.append({"scale": scale.index, "grid": list(scale.grid), "tokens": scale.tokens,
                           "nodes": len(scale.module.graph.nodes), "inserted_by_passes": rewritten_by_passes(scale.module),
                           "files": _write_graph(staging, f"scale_{scale.index:02d}", scale.module)})
        regions = {name: [{"scale": graph.index, "nodes": len(graph.module.graph.nodes),
                           "inserted_by_passes": rewritten_by_passes(graph.module),
                           "files": _write_graph(staging, f"{name}_{graph.index:02d}", graph.module)} for graph in region]
                   for name, region in captured.regions.items()}
        manifest: dict[str, Any] = {"schema_version": MANIFEST_SCHEMA_VERSION, "torch": torch.__version__,
                                    "graphs": graphs, "regions": regions}
        if index is not None:
            manifest["onnx"] = export_onnx(captured, index, staging / f"scale_{index:02d}.onnx", check=check)
        (staging / MANIFEST).write_text(to_strict_json(manifest), encoding="utf-8")
        _swap_in(staging, directory, earlier)
    return manifest
