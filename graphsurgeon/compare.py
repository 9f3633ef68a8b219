"""`graphsurgeon compare`: several acceleration methods on one model, one schedule, the same inputs and seeds.

Per method (a pass set such as ``lhep+sats``): latency per image side by side with the baseline (warm-up,
round-robin repeats), FLOPs and token-rows per scale (the benchmark runner, graphsurgeon.bench), and the distance
to the unaccelerated model (graphsurgeon.fidelity): teacher-forced per-scale logit error and choice agreement,
free-running latent PSNR/SSIM. One JSON and one Markdown table, and with decoded images an HTML page showing
them side by side. With random weights the figures show cost and
distance to the unaccelerated model, never image quality; the output says so.
"""
from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any, Optional

import torch

from .bench.runner import BASELINE, run_benchmark
from .images import ImageSources
from .bench.spec import make_spec, passes_of
from .cli_checks import check_file_target
from .errors import ConfigError
from .jsonio import write_json_atomic

RANDOM_WEIGHTS_NOTE = ("Random weights: these figures show what each method costs and how far it moves the output "
                       "from the unaccelerated model; they say nothing about image quality.")
FILES_NOTE = ("Loaded weights, random conditions (the adapter's benchmark inputs): these figures show what each method "
              "costs and how far it moves the output from the unaccelerated model on these inputs.")


def run_compare(adapter_name: str, config: Optional[str], methods: list[str],
                method_config: Optional[dict[str, dict]] = None, h_div_w: float = 1.0, pn: str = "1M", batch: int = 1,
                device: str = "cpu", dtype: str = "float32", warmup: int = 1, repeats: int = 3, seed: int = 0,
                flops: bool = True, images: bool = False, pictures: Optional[dict[str, torch.Tensor]] = None,
                checkpoint: Optional[Path] = None, vae: Optional[Path] = None, text_encoder: Optional[Path] = None,
                log=print) -> dict[str, Any]:
    """Benchmark ``methods`` side by side, then measure each one's fidelity; returns the result (JSON-ready).
    ``checkpoint``, ``vae``, ``text_encoder``: the user's files, loaded by the adapter's image pipeline as
    ``generate`` loads them (random weights without them). ``images``: also decode both runs with that pipeline's
    decoder (a seeded random one without a file) and compare the pictures; the decoded images, uint8 (B, H, W, 3),
    by method (and "baseline"), go into ``pictures`` when given. Everything is checked before any model is built."""
    from .adapters import ModelAdapter, get_adapter
    from .api import optimize
    from .bench.runner import check_benchmark, load_model
    from .fidelity import fidelity

    if not methods:
        raise ConfigError("--methods: give at least one method (pass names joined by '+', comma-separated)")
    method_config = method_config or {}
    if config is None and checkpoint is None:  # with a checkpoint the adapter asks for the layout by name
        config = get_adapter(adapter_name).default_config
    spec = make_spec(adapter=adapter_name, config=config, h_div_w=h_div_w, pn=pn, batch=batch, device=device,
                     dtype=dtype, pass_sets=tuple(methods), pass_config=method_config, warmup=warmup,
                     repeats=repeats, seed=seed, flops=flops, inserted_timing=False, checkpoint=checkpoint, vae=vae,
                     text_encoder=text_encoder)
    checked = check_benchmark(spec)
    adapter = checked.adapter
    if type(adapter).output_view is ModelAdapter.output_view or type(adapter).forced_args is ModelAdapter.forced_args:
        raise ConfigError(f"adapter {adapter_name!r} does not implement output_view/forced_args: it cannot be "
                          "compared (before any run)")
    if images and checked.sources is None:
        adapter.check_sources(ImageSources(config=checked.config, device=device, seed=seed), [])
    model, pipeline = loaded = load_model(spec, checked, images=images)
    result = run_benchmark(spec, log=log, checked=checked, loaded=loaded)
    kwargs = adapter.benchmark_args(model, batch_size=batch, h_div_w=h_div_w, pn=pn, seed=seed)
    result["kind"] = "graphsurgeon.compare"
    result["note"] = RANDOM_WEIGHTS_NOTE if checked.sources is None or spec.checkpoint is None else FILES_NOTE
    result["fidelity"] = {}
    decode = pipeline.images if images else None
    for method in methods:
        passes = passes_of(method)
        settings = {name: method_config[name] for name in passes if name in method_config}
        fast = optimize(model, adapter=adapter, passes=passes, config=settings or None)
        if pipeline is not None:
            fast.decoder = pipeline.preview_decoder()
        measured = fidelity(adapter, model, fast, kwargs, decode)
        result["fidelity"][method] = measured.figures
        if pictures is not None and measured.images is not None:
            pictures.setdefault(BASELINE, measured.baseline_images)
            pictures[method] = measured.images
        log(f"{method}: fidelity measured")
    return result


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's header and rows (one per method, the baseline first), as text cells."""
    variants, fid = result["variants"], result["fidelity"]
    with_images = any(f.get("images") for f in fid.values())
    header = ["method", "s/image", "speed-up", "GFLOP", "FLOPs vs baseline", "token-rows (last scale)",
              "block work (last scale)", "attention entries (last scale)", "TF logit rel-L2", "TF agreement",
              "latent PSNR dB", "latent SSIM"] + (["image PSNR dB", "image SSIM"] if with_images else [])
    rows = []
    base_flops = variants[BASELINE].get("flops", {}).get("total")
    for name, v in variants.items():
        flops = v.get("flops", {}).get("total")
        row = [name, f"{v['time_per_image_s']['median']:.3f}", f"{v['speedup_vs_baseline']:.2f}x",
               _num(flops and flops / 1e9, ".1f"), _num(flops and base_flops and flops / base_flops, ".3f"),
               str(v["tokens_per_scale"][-1])]
        f = fid.get(name)
        for key in ("token_layers_vs_dense", "attention_entries_vs_dense"):
            values = (f or {}).get(key)
            row.append(_num(values[-1] if values and values[-1] is not None else 1.0, ".3f"))
        if f is None:
            row += ["0 (itself)", "1.000", "identical", "1.000"] + (["identical", "1.000"] if with_images else [])
        else:
            tf, free = f["teacher_forced"], f["free_running"]
            psnr = free["latent_psnr_db"]
            row += [f"{_mean_last(tf['logit_rel_l2']):.2e}", f"{_mean_last(tf['choice_agreement']):.3f}",
                    "identical" if psnr is None else f"{psnr:.2f}", f"{free['latent_ssim']:.3f}"]
            if with_images:
                image = f["images"]
                row += ["identical" if image["psnr_db"] is None else f"{image['psnr_db']:.2f}", f"{image['ssim']:.3f}"]
        rows.append(row)
    return header, rows


def _legend(result: dict[str, Any]) -> list[str]:
    spec = result["spec"]
    return [f"{spec['warmup']} warm-up + {spec['repeats']} timed runs per method, round-robin; seed {spec['seed']}; "
            f"machine: {result['machine'].get('gpu') or result['machine']['cpu']}, torch {result['machine']['torch']}",
            "teacher-forced: every scale forced to the baseline's drawn values; logit error = relative L2 of the "
            "guided logits, agreement = same most likely choice; both averaged over the last 3 scales",
            "free-running: the method samples on its own; PSNR/SSIM of the final latent (peak = the baseline "
            "latent's value range)",
            "block work: token-layers a per-token-depth method computes at the last scale, over every token through "
            "every block",
            "attention entries: (query, key) pairs a sparse-attention method keeps at the last scale, over dense "
            "(its dense masked reference still computes every pair, so its FLOPs and time do not drop yet)"]


def _title(result: dict[str, Any]) -> str:
    spec = result["spec"]
    return (f"compare: {spec['adapter']} {spec['config']}, pn {spec['pn']}, batch {spec['batch']}, "
            f"{spec['dtype']} on {spec['device']}")


def markdown(result: dict[str, Any]) -> str:
    """The comparison table (one row per method, the baseline first) and the note on random weights."""
    header, rows = table(result)
    lines = [f"### {_title(result)}", "", f"_{result['note']}_", ""] + [f"- {line}" for line in _legend(result)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_html(result: dict[str, Any], pictures: dict[str, torch.Tensor]) -> str:
    """One self-contained page: the table, then per sample the decoded images of the baseline and of every method
    side by side (inline PNGs, each captioned with its PSNR/SSIM to the baseline's)."""
    from .images import psnr, ssim
    from .report import fit_image, png_uri

    header, rows = table(result)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    names = [BASELINE] + [m for m in result["fidelity"] if m in pictures]
    baseline = pictures[BASELINE]
    figures = []
    for sample in range(baseline.shape[0]):
        items = []
        for name in names:
            image = pictures[name][sample]
            value = psnr(baseline[sample], image)
            caption = (html.escape(name) if name == BASELINE else
                       f"{html.escape(name)}<br>PSNR {'identical' if value == math.inf else f'{value:.2f} dB'}, "
                       f"SSIM {ssim(baseline[sample], image):.3f}")
            picture = fit_image(image)
            items.append(f'<figure><img class="compare-image" data-sample="{sample}" data-method="{html.escape(name)}" '
                         f'src="{png_uri(picture)}" width="{picture.width}" height="{picture.height}" '
                         f'alt="{html.escape(name)}"><figcaption>{caption}</figcaption></figure>')
        figures.append(f'<h3>sample {sample}</h3><div class="row">{"".join(items)}</div>')
    legend = "".join(f"<li>{html.escape(line)}</li>" for line in _legend(result))
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>graphsurgeon compare</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}.row{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
            f"figcaption{{font-size:12px}}</style></head><body><h1>{html.escape(_title(result))}</h1>"
            f"<p><em>{html.escape(result['note'])}</em></p><ul>{legend}</ul><table><tr>{cells}</tr>{body}</table>"
            f"<h2>Images (decoded from each free run)</h2>{''.join(figures)}</body></html>")


def _mean_last(values: list[float], count: int = 3) -> float:
    tail = values[-count:]
    return sum(tail) / len(tail)


def _num(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def run_and_write(args: argparse.Namespace) -> dict[str, Any]:
    """Check the output paths, run, print the table, write the files."""
    out = Path(args.out)
    if out.suffix in (".json", ".md", ".html") or out.name in ("", "..", "."):
        raise ConfigError(f"--out {args.out!r}: give a stem such as out/compare; <out>.json and <out>.md (and with "
                          "--images <out>.html) are written")
    json_path, md_path = (check_file_target(out.with_suffix(suffix)) for suffix in (".json", ".md"))
    html_path = check_file_target(out.with_suffix(".html")) if args.images else None
    pictures: dict[str, torch.Tensor] = {}
    result = run_compare(args.adapter, args.config, [m for m in args.methods.split(",") if m], args.pass_config,
                         h_div_w=args.h_div_w, pn=args.pn, batch=args.batch_size, device=args.device,
                         dtype=args.dtype, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                         flops=not args.no_flops, images=args.images, pictures=pictures, checkpoint=args.checkpoint,
                         vae=args.vae, text_encoder=args.text_encoder)
    text = markdown(result)
    print(text)
    write_json_atomic(json_path, result)
    md_path.write_text(text)
    written = [json_path, md_path]
    if html_path is not None:
        html_path.write_text(to_html(result, pictures))
        written.append(html_path)
    print("wrote " + ", ".join(map(str, written)))
    return result
