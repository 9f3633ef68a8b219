"""Graph diff report: what the passes changed, per pass and per scale, as Markdown, HTML and JSON.

The diff compares each graph before and after the passes (captured snapshots): nodes added, removed and
rewired (a node whose inputs changed), attributed to a pass by the ``pass`` tag inserted nodes carry (shape
helpers a pass derives, such as symbolic token counts, are listed as ``support``). With a generation's stats
and a FLOP measurement it adds tokens and FLOPs before/after per scale.
"""
from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch.fx

from .meta import annotations

REPORT_SCHEMA_VERSION = 1


def snapshot(module: torch.fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Node name -> names of its inputs: what the diff compares."""
    return {node.name: tuple(a.name for a in node.all_input_nodes) for node in module.graph.nodes}


def graph_diff(before: dict[str, tuple[str, ...]], module: torch.fx.GraphModule) -> dict[str, Any]:
    after = {node.name: node for node in module.graph.nodes}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    rewired = [n for n, node in after.items() if n in before and tuple(a.name for a in node.all_input_nodes) != before[n]]
    by_pass: dict[str, list[dict[str, str]]] = {}
    for name in added:
        info = annotations(after[name])
        by_pass.setdefault(info.get("pass", "support"), []).append({"node": name, "role": str(info.get("role", ""))})
    return {"added": by_pass, "removed": removed, "rewired": rewired, "nodes_before": len(before), "nodes_after": len(after)}


def build_report(fast, flops: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    captured = fast._current()
    snapshots = fast._snapshots[fast._last_key]
    stats = fast.stats
    kept = {s["scale"]: s["kept"] for s in stats.get("lhep", [])}
    rows = {s["scale"]: s["rows"] for s in stats.get("sats", [])}
    scales = []
    for index, scale in enumerate(captured.scales):
        regions = {"scale": graph_diff(snapshots[("scale", index)], scale.module)}
        for name, graphs in captured.regions.items():
            if index < len(graphs):
                regions[name] = graph_diff(snapshots[(name, index)], graphs[index].module)
        entry = {"scale": index, "grid": list(scale.grid), "tokens_before": scale.tokens,
                 "tokens_after": kept.get(index) or scale.tokens, "rows_after": rows.get(index), "regions": regions}
        if flops:
            entry["flops_before"], entry["flops_after"] = flops["baseline"][index], flops["optimized"][index]
            entry["flops_ideal"] = flops["ideal"][index]
        scales.append(entry)
    passes = []
    for graph_pass in fast.passes:
        touched = [s["scale"] for s in scales if any(graph_pass.name in r["added"] for r in s["regions"].values())]
        added = sum(len(r["added"].get(graph_pass.name, [])) for s in scales for r in s["regions"].values())
        roles = Counter(a["role"] for s in scales for r in s["regions"].values() for a in r["added"].get(graph_pass.name, []))
        passes.append({"name": graph_pass.name, "config": graph_pass.config.model_dump(), "scales": touched,
                       "nodes_added": added, "roles": dict(roles)})
    report = {"schema_version": REPORT_SCHEMA_VERSION, "adapter": fast.adapter.name, "passes": passes, "scales": scales,
              "edits": fast.edits}
    if flops:
        report["flops"] = {"total": flops["total"], "ratio": flops["ratio"]}
    return report


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in report["scales"]:
        added = sum(len(v) for r in s["regions"].values() for v in r["added"].values())
        rewired = sum(len(r["rewired"]) for r in s["regions"].values())
        after = s["tokens_after"]
        tokens_after = ", ".join(map(str, after)) if isinstance(after, list) else str(after)
        row = [str(s["scale"]), "x".join(map(str, s["grid"][-2:])), str(s["tokens_before"]), tokens_after,
               "" if s["rows_after"] is None else str(s["rows_after"]), str(added), str(rewired)]
        if "flops_before" in s:
            row += [f"{s['flops_before'] / 1e9:.2f}", f"{s['flops_after'] / 1e9:.2f}", f"{s['flops_ideal'] / 1e9:.2f}"]
        rows.append(row)
    return rows


def _header(report: dict[str, Any]) -> list[str]:
    header = ["scale", "grid", "tokens before", "tokens after (per sample)", "rows after", "nodes added", "nodes rewired"]
    if report["scales"] and "flops_before" in report["scales"][0]:
        header += ["GFLOP before", "GFLOP after", "GFLOP ideal"]
    return header


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# graphsurgeon diff report ({report['adapter']})", ""]
    for p in report["passes"]:
        lines.append(f"- **{p['name']}** {json.dumps(p['config'])}: scales {p['scales']}, {p['nodes_added']} nodes added "
                     f"({', '.join(f'{k} x{v}' for k, v in p['roles'].items())})")
    if "flops" in report:
        r = report["flops"]["ratio"]
        lines.append(f"- FLOPs: optimized {r['optimized_vs_baseline']:.3f}x of the baseline, ideal {r['ideal_vs_baseline']:.3f}x")
    header = _header(report)
    lines += ["", "## Summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(report)]
    lines += ["", "## Changes per scale", ""]
    for s in report["scales"]:
        for region, diff in s["regions"].items():
            if not (diff["added"] or diff["removed"] or diff["rewired"]):
                continue
            lines.append(f"### scale {s['scale']} ({region}): {diff['nodes_before']} -> {diff['nodes_after']} nodes")
            for pass_name, nodes in diff["added"].items():
                lines.append(f"- added by {pass_name}: " + ", ".join(f"`{n['node']}` ({n['role']})" for n in nodes))
            if diff["removed"]:
                lines.append("- removed: " + ", ".join(f"`{n}`" for n in diff["removed"]))
            if diff["rewired"]:
                lines.append(f"- rewired ({len(diff['rewired'])}): " + ", ".join(f"`{n}`" for n in diff["rewired"][:40])
                             + (" ..." if len(diff["rewired"]) > 40 else ""))
            lines.append("")
    return "\n".join(lines)


def to_html(report: dict[str, Any]) -> str:
    """One self-contained page: inline CSS, no scripts, no external resources."""
    e = html.escape
    header = "".join(f"<th>{e(h)}</th>" for h in _header(report))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _summary_rows(report))
    passes = "".join(f"<li><b>{e(p['name'])}</b> <code>{e(json.dumps(p['config']))}</code>: scales {e(str(p['scales']))}, "
                     f"{p['nodes_added']} nodes added</li>" for p in report["passes"])
    details = []
    for s in report["scales"]:
        for region, diff in s["regions"].items():
            if not (diff["added"] or diff["removed"] or diff["rewired"]):
                continue
            items = "".join(f"<li>added by {e(k)}: " + ", ".join(f"<code>{e(n['node'])}</code> <i>{e(n['role'])}</i>" for n in v)
                            + "</li>" for k, v in diff["added"].items())
            if diff["rewired"]:
                items += f"<li>rewired ({len(diff['rewired'])}): " + ", ".join(f"<code>{e(n)}</code>" for n in diff["rewired"][:40]) + "</li>"
            details.append(f"<details><summary>scale {s['scale']} ({e(region)}): {diff['nodes_before']} &rarr; "
                           f"{diff['nodes_after']} nodes</summary><ul>{items}</ul></details>")
    flops = ""
    if "flops" in report:
        r = report["flops"]["ratio"]
        flops = f"<p>FLOPs: optimized {r['optimized_vs_baseline']:.3f}&times; of the baseline, ideal {r['ideal_vs_baseline']:.3f}&times;</p>"
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>graphsurgeon diff report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;"
            "padding:2px 8px;text-align:right}code{font-size:90%}</style></head><body>"
            f"<h1>graphsurgeon diff report ({e(report['adapter'])})</h1><ul>{passes}</ul>{flops}"
            f"<h2>Summary</h2><table id=\"summary\"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
            f"<h2>Changes per scale</h2>{''.join(details)}</body></html>")


def write_report(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write as HTML, Markdown or JSON, chosen by the file suffix."""
    path = Path(path)
    text = {".html": to_html, ".md": to_markdown, ".json": lambda r: json.dumps(r, indent=2, default=str)}.get(path.suffix)
    if text is None:
        raise ValueError(f"report path {path} must end in .html, .md or .json")
    path.write_text(text(report))
    return path


class DiffReport:
    """``fast.report``: the report's data with its three renderings."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def markdown(self) -> str:
        return to_markdown(self.data)

    def html(self) -> str:
        return to_html(self.data)

    def json(self) -> str:
        return json.dumps(self.data, indent=2, default=str)

    def write(self, path: Union[str, Path]) -> Path:
        return write_report(self.data, path)
