"""Graph diff report: what the passes changed, per pass and per scale, as Markdown, HTML and JSON.

The diff compares each graph before and after the passes (captured snapshots): nodes added, removed and
rewired (a node whose inputs changed), attributed to a pass by the ``pass`` tag inserted nodes carry (shape
helpers a pass derives, such as symbolic token counts, are listed as ``support``). With a generation's stats
and a FLOP measurement it adds tokens and FLOPs before/after per scale.

The HTML also has pictures, inline (PNG ``data:`` URIs and SVG, no scripts, nothing fetched), so the page is
one file that can be mailed or attached to CI: per LHEP scale and sample the keep mask (``lhep_masks`` in the
data, recorded by the LHEP runtime as strings of "0"/"1"), per sample and scale the SATS decision
(``sats_decisions``), and per scale the FLOPs as bars once :func:`graphsurgeon.flops.measure_flops` ran. The JSON
carries the masks and decisions, not the pictures; the Markdown says where the pictures are. The JSON is strict:
a value that is not a finite number (gamma at a sample's first SATS scale, Delta where the branch did not run)
is ``null``, never ``NaN``, so a browser's ``JSON.parse`` reads it. Files are written through a temporary name,
so an interrupted write leaves the earlier report whole.

Decoded images: the report only sees graphs and stats, not the decoder, so a caller that decoded the last
``generate`` passes its images, uint8 (B, H, W, 3) RGB, one per sample; the masks are then drawn over them
(skipped tokens dimmed, the token grid stretched over the image)::

    out = fast.generate(**kwargs)
    images = decode(out)                                     # the caller's decoder, uint8 (B, H, W, 3)
    DiffReport(build_report(fast, fast.last_flops, images=images)).write("report.html")

``labels`` names the samples in the pictures (default "sample 0", ...; ``generate --report`` gives the image's
index and prompt).

``fast.report`` is the same without images.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx
from PIL import Image, ImageDraw

from .jsonio import to_strict_json, write_text_atomic
from .meta import annotations

REPORT_SCHEMA_VERSION = 1

PICTURE_SIDE = 256
"""Longest side of a keep-mask picture in pixels: token grids are scaled up by a whole factor (nearest) to about
this, so an 8x8 grid is not 8 pixels wide; decoded images larger than this are scaled down, so a 1024x1024
image does not put megabytes per picture into the page."""
KEPT_RGB = (255, 183, 27)
SKIPPED_RGB = (44, 50, 62)
GRID_RGB = (82, 90, 106)
FLOP_COLOURS = {"baseline": "#8a94a6", "optimized": "#2f6fd6", "ideal": "#3fa866"}
SATS_COLOURS = {"ran": "#b9e4c4", "stops": "#f2a7a0", "skipped": "#d4d7dd"}


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


def stats_entries_with(per_pass: dict[str, list[dict]], key: str) -> dict[int, dict]:
    """By scale, the stats entries of the pass whose entries carry ``key`` (kept tokens, or rows that ran)."""
    for entries in per_pass.values():
        if isinstance(entries, list) and entries and isinstance(entries[0], dict) and key in entries[0]:
            return {entry["scale"]: entry for entry in entries}
    return {}


def build_report(fast, flops: Optional[dict[str, Any]] = None, images: Optional[torch.Tensor] = None,
                 labels: Optional[list[str]] = None) -> dict[str, Any]:
    """The report's data for ``fast``'s current graphs and last ``generate``; ``flops``: a
    :func:`graphsurgeon.flops.measure_flops` result; ``images``: that generation decoded, uint8 (B, H, W, 3),
    kept under ``images`` for the HTML only (see the module docstring); ``labels``: one name per sample."""
    graph_set = fast._current_set()  # one read: another thread's call may change the current set meanwhile
    captured, snapshots = graph_set.captured, graph_set.snapshots
    stats = fast.stats
    selected = list(stats_entries_with(stats, "kept").values())  # the token-selecting pass (LHEP, StepVAR, ...)
    guarded = list(stats_entries_with(stats, "uncond_ran").values())  # the row-selecting pass (SATS)
    kept = {s["scale"]: s["kept"] for s in selected}
    rows = {s["scale"]: s["rows"] for s in guarded}
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
    report["lhep_masks"] = [{"scale": s["scale"], "grid": s["grid"], "tokens": s["tokens"], "kept": s["kept"],
                             "masks": s["mask"]} for s in selected if s.get("mask")]
    report["sats_decisions"] = [{key: s[key] for key in ("scale", "uncond_ran", "stopped_after", "delta", "gamma")}
                                for s in guarded]
    if images is not None:
        report["images"] = _checked_images(images, stats)
    if labels is not None:
        report["sample_labels"] = _checked_labels(labels, stats)
    return report


def _checked_images(images: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    """The caller's decoded images on the CPU, refused unless uint8 (B, H, W, 3) with one per sample of the last
    ``generate`` (a wrong count would draw one sample's mask over another's image)."""
    images = torch.as_tensor(images).detach().cpu()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3) RGB, got {images.dtype} {tuple(images.shape)}")
    summary = stats.get("summary")
    if summary and len(summary[0]["samples"]) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images for a generation of {len(summary[0]['samples'])} samples")
    return images


def _checked_labels(labels: list[str], stats: dict[str, Any]) -> list[str]:
    """The caller's sample names, refused unless one string per sample of the last ``generate``."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"labels must be a list of strings, got {labels!r}")
    summary = stats.get("summary")
    if summary and len(summary[0]["samples"]) != len(labels):
        raise ValueError(f"{len(labels)} labels for a generation of {len(summary[0]['samples'])} samples")
    return labels


def _sample_label(report: dict[str, Any], sample: int) -> str:
    labels = report.get("sample_labels")
    return labels[sample] if labels else f"sample {sample}"


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


def _has_flops(report: dict[str, Any]) -> bool:
    return bool(report["scales"]) and "flops_before" in report["scales"][0]


def _header(report: dict[str, Any]) -> list[str]:
    header = ["scale", "grid", "tokens before", "tokens after (per sample)", "rows after", "nodes added", "nodes rewired"]
    if _has_flops(report):
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
    kinds = _picture_kinds(report)
    if kinds:
        lines.append(f"- Pictures ({', '.join(kinds)}) are in the HTML report (write it to a `.html` path).")
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


def _picture_kinds(report: dict[str, Any]) -> list[str]:
    """What the HTML draws for this report, in page order."""
    kinds = []
    if report.get("lhep_masks"):
        kinds.append("LHEP keep masks")
    if "images" in report:
        kinds.append("decoded images")
    if report.get("sats_decisions"):
        kinds.append("SATS decisions")
    if _has_flops(report):
        kinds.append("FLOP bars")
    return kinds


def mask_picture(rows: list[str], background: Optional[Image.Image] = None) -> Image.Image:
    """One recorded keep mask (h strings of "0"/"1") drawn as RGB.

    Without a background: kept tokens in ``KEPT_RGB`` over a grid of ``SKIPPED_RGB`` cells, each token a square of
    ``PICTURE_SIDE // max(h, w)`` pixels (nearest), grid lines on each cell's top and left edge when cells are 4
    pixels or more. Over a decoded image (at picture size, see :func:`fit_image`): the token grid stretched over
    it (nearest), skipped tokens' pixels dimmed to 30 %, kept ones untouched.
    """
    height, width = len(rows), len(rows[0])
    mask = Image.frombytes("L", (width, height), bytes(255 if c == "1" else 0 for c in "".join(rows)))
    if background is not None:
        stretched = mask.resize(background.size, Image.Resampling.NEAREST)
        return Image.composite(background, Image.eval(background, lambda v: v * 3 // 10), stretched)
    cell = max(1, PICTURE_SIDE // max(height, width))
    size = (width * cell, height * cell)
    picture = Image.composite(Image.new("RGB", size, KEPT_RGB), Image.new("RGB", size, SKIPPED_RGB),
                              mask.resize(size, Image.Resampling.NEAREST))
    if cell >= 4:
        draw = ImageDraw.Draw(picture)
        for x in range(0, size[0], cell):
            draw.line([(x, 0), (x, size[1] - 1)], fill=GRID_RGB)
        for y in range(0, size[1], cell):
            draw.line([(0, y), (size[0] - 1, y)], fill=GRID_RGB)
    return picture


def fit_image(image: torch.Tensor) -> Image.Image:
    """A decoded image, uint8 (H, W, 3), at picture size: scaled down (Lanczos) when its longer side exceeds
    ``PICTURE_SIDE``, else up by the whole factor that keeps it within (nearest, so pixels stay sharp)."""
    picture = Image.fromarray(image.contiguous().numpy())
    side = max(picture.size)
    if side > PICTURE_SIDE:
        size = tuple(max(1, round(n * PICTURE_SIDE / side)) for n in picture.size)
        return picture.resize(size, Image.Resampling.LANCZOS)
    factor = PICTURE_SIDE // side
    return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)


def png_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(picture: Image.Image, css_class: str, label: str, **data: int) -> str:
    """An inline PNG at its own size (width/height set, so the browser never rescales it)."""
    attributes = "".join(f' data-{k}="{v}"' for k, v in data.items())
    return (f'<img class="{css_class}"{attributes} src="{png_uri(picture)}" width="{picture.width}" '
            f'height="{picture.height}" alt="{html.escape(label)}" title="{html.escape(label)}">')


def _masks_html(report: dict[str, Any]) -> str:
    """Table of keep masks: a row per sample, a column per LHEP scale (and the decoded image first, if given)."""
    masks, images = report.get("lhep_masks", []), report.get("images")
    backgrounds = [fit_image(image) for image in images] if images is not None else [None] * len(masks[0]["masks"])
    head = "<th>sample</th>" + ("<th>decoded</th>" if images is not None else "") + "".join(
        f"<th>scale {m['scale']} ({m['grid'][0]}&times;{m['grid'][1]} tokens)</th>" for m in masks)
    rows = []
    for sample, background in enumerate(backgrounds):
        name = _sample_label(report, sample)
        cells = [f"<th>{html.escape(name)}</th>"]
        if background is not None:
            cells.append(f"<td>{_img(background, 'decoded', f'{name} decoded', sample=sample)}</td>")
        for m in masks:
            kept = m["kept"][sample]
            label = f"scale {m['scale']}, {name}: {kept} of {m['tokens']} tokens kept"
            picture = mask_picture(m["masks"][sample], background)
            cells.append(f"<td>{_img(picture, 'keep-mask', label, scale=m['scale'], sample=sample)}"
                         f"<br>{kept}/{m['tokens']} kept</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    legend = "skipped tokens dimmed" if images is not None else "kept tokens amber, skipped ones dark"
    return (f"<h3>LHEP keep masks</h3><p>Per sample and LHEP scale, the tokens computed ({legend}).</p>"
            f'<table id="keep-masks"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _sats_threshold(report: dict[str, Any]) -> str:
    """The SATS threshold as the report's pass list gives it (its setting is named ``delta``)."""
    config = next((p["config"] for p in report["passes"] if p["name"] == "sats"), {})
    return f" delta = {config['delta']:.4g}" if "delta" in config else ""


def _sats_html(report: dict[str, Any]) -> str:
    """The SATS strip: a row per sample, a column per scale; a cell says whether the sample's unconditional branch
    ran there and whether the guard stopped it after, and shows gamma (what the stop is decided on) above Delta
    (the branches' discrepancy gamma is computed from)."""
    decisions = report["sats_decisions"]
    head = "<th>sample</th>" + "".join(f"<th>{d['scale']}</th>" for d in decisions)
    rows = []
    for sample in range(len(decisions[0]["uncond_ran"])):
        name = _sample_label(report, sample)
        cells = [f"<th>{html.escape(name)}</th>"]
        for d in decisions:
            ran, stops = d["uncond_ran"][sample], d["stopped_after"][sample]
            state = "stops" if ran and stops else "ran" if ran else "skipped"
            delta = d["delta"][sample] if d["delta"] is not None else None
            gamma = d["gamma"][sample] if d["gamma"] is not None else None
            what = {"ran": "unconditional branch ran", "stops": "unconditional branch ran, stopped after this scale",
                    "skipped": "unconditional branch stopped (conditional logits only)"}[state]
            title = f"scale {d['scale']}, {name}: {what}; gamma {_number(gamma)}, Delta {_number(delta)}"
            text = {"ran": "ran", "stops": "stop", "skipped": "&ndash;"}[state]
            if gamma is not None and math.isfinite(gamma):
                text += f"<br><small>&gamma; {_number(gamma)}</small>"
            if delta is not None and math.isfinite(delta):
                text += f"<br><small>&Delta; {_number(delta)}</small>"
            cells.append(f'<td class="sats-cell {state}" data-sample="{sample}" data-scale="{d["scale"]}" '
                         f'data-uncond="{int(ran)}" data-stopped-after="{int(stops)}" title="{html.escape(title)}">'
                         f"{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<h3>SATS: unconditional branch per sample and scale</h3><p><span class="swatch ran"></span> ran '
            '&nbsp;<span class="swatch stops"></span> ran, then stopped by the guard &nbsp;'
            '<span class="swatch skipped"></span> stopped</p>'
            f'<p id="sats-rule"><b>&gamma; decides</b>: a sample&rsquo;s unconditional branch stops after the first '
            f'scale where &gamma; = |&Delta;<sub>k</sub> &minus; &Delta;<sub>prev</sub>| / &Delta;<sub>prev</sub> is below '
            f'the threshold{html.escape(_sats_threshold(report))}. Each cell shows &gamma; (none at a sample&rsquo;s first '
            'scale: there is no &Delta;<sub>prev</sub>) and below it &Delta;, the RMS difference of the two branches&rsquo; '
            'logits.</p>'
            f'<table id="sats-strip"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _flop_text(value: float) -> str:
    for unit, size in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} FLOP"


def _flops_svg(report: dict[str, Any]) -> str:
    """Per scale three horizontal bars (baseline, optimized, ideal) on one linear axis, values written beside."""
    label, longest, bar, gap, group, top = 70, 480, 10, 2, 44, 24
    scales = report["scales"]
    largest = max(max(s["flops_before"], s["flops_after"], s["flops_ideal"]) for s in scales) or 1
    parts = []
    for i, kind in enumerate(FLOP_COLOURS):
        parts.append(f'<rect x="{label + 120 * i}" y="4" width="10" height="10" fill="{FLOP_COLOURS[kind]}"></rect>'
                     f'<text x="{label + 120 * i + 14}" y="13">{kind}</text>')
    for row, s in enumerate(scales):
        y0 = top + row * group
        parts.append(f'<text x="0" y="{y0 + 2 * bar + gap}">scale {s["scale"]}</text>')
        values = {"baseline": s["flops_before"], "optimized": s["flops_after"], "ideal": s["flops_ideal"]}
        for i, (kind, value) in enumerate(values.items()):
            y, width = y0 + i * (bar + gap), round(value / largest * longest, 1)
            text = f"scale {s['scale']} {kind}: {_flop_text(value)}"
            parts.append(f'<rect class="flop-bar {kind}" data-scale="{s["scale"]}" data-value="{value}" x="{label}" '
                         f'y="{y}" width="{width}" height="{bar}" fill="{FLOP_COLOURS[kind]}"><title>{text}</title></rect>'
                         f'<text x="{label + width + 4}" y="{y + bar - 1}">{_flop_text(value)}</text>')
    height = top + len(scales) * group
    return (f'<h3>FLOPs per scale</h3><svg id="flop-bars" width="{label + longest + 110}" height="{height}" '
            f'font-size="10" font-family="sans-serif">{"".join(parts)}</svg>')


def _pictures_html(report: dict[str, Any]) -> str:
    parts = []
    if report.get("lhep_masks") or "images" in report:
        parts.append(_masks_html(report))
    if report.get("sats_decisions"):
        parts.append(_sats_html(report))
    if _has_flops(report):
        parts.append(_flops_svg(report))
    return f'<h2>Pictures</h2><div id="pictures">{"".join(parts)}</div>' if parts else ""


def to_html(report: dict[str, Any]) -> str:
    """One self-contained page: inline CSS, pictures as data: URIs and inline SVG, no scripts, no external
    resources."""
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
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;"
             "padding:2px 8px;text-align:right}code{font-size:90%}#keep-masks td,#keep-masks th{text-align:center}"
             "#keep-masks td{font-size:85%}#keep-masks img{display:block}.sats-cell{text-align:center;min-width:3em}"
             ".swatch{display:inline-block;width:1em;height:1em;vertical-align:middle;border:1px solid #999}"
             + "".join(f".{state}{{background:{colour}}}" for state, colour in SATS_COLOURS.items()))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>graphsurgeon diff report</title>"
            f"<style>{style}</style></head><body>"
            f"<h1>graphsurgeon diff report ({e(report['adapter'])})</h1><ul>{passes}</ul>{flops}{_pictures_html(report)}"
            f"<h2>Summary</h2><table id=\"summary\"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
            f"<h2>Changes per scale</h2>{''.join(details)}</body></html>")


def to_json(report: dict[str, Any]) -> str:
    """The data as strict JSON (non-finite numbers as null): masks as their strings; decoded images are left out
    (they are the caller's pixels, drawn only in the HTML)."""
    return to_strict_json({k: v for k, v in report.items() if k != "images"})


def write_report(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write as HTML, Markdown or JSON, chosen by the file suffix (through a temporary name in the same folder)."""
    path = Path(path)
    text = {".html": to_html, ".md": to_markdown, ".json": to_json}.get(path.suffix)
    if text is None:
        raise ValueError(f"report path {path} must end in .html, .md or .json")
    return write_text_atomic(path, text(report))


class DiffReport:
    """``fast.report``: the report's data with its three renderings. With decoded images:
    ``DiffReport(build_report(fast, fast.last_flops, images=images))`` (see the module docstring)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def markdown(self) -> str:
        return to_markdown(self.data)

    def html(self) -> str:
        return to_html(self.data)

    def json(self) -> str:
        return to_json(self.data)

    def write(self, path: Union[str, Path]) -> Path:
        return write_report(self.data, path)
