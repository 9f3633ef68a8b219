"""Demo: LD-Pruning (LHEP + SATS) on a seeded random-weight Infinity model, against the baseline sampler.

Prints per-scale tokens (baseline vs kept per prompt), rows that ran, FLOPs (torch's counter) and wall time,
and writes the graph diff report. Random text features stand in for a text encoder (none is bundled).
Run with `make demo`, or `python examples/demo.py --help`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from graphsurgeon import get_adapter, optimize
from graphsurgeon.flops import measure_flops
from model_adapters.infinity import PIXEL_PRESETS, build_infinity, get_scale_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="infinity-tiny", help="named config (infinity-tiny, infinity-2b, infinity-8b)")
    parser.add_argument("--h-div-w", type=float, default=1.0, help="aspect ratio height/width (snapped to a template)")
    parser.add_argument("--pn", default="1M", choices=list(PIXEL_PRESETS), help="pixel preset; 1M = 1024x1024 at 1:1")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--report", default="out/demo_report.html", help="where to write the graph diff report")
    args = parser.parse_args()

    model = build_infinity(args.config, seed=0)
    schedule = get_scale_schedule(args.h_div_w, args.pn)
    lens = [7, 12]
    kv = torch.randn(sum(lens), model.Ct5, generator=torch.Generator().manual_seed(1))
    text = (kv, lens, torch.tensor([0, 7, 19], dtype=torch.int32), max(lens))
    kwargs = dict(text=text, scale_schedule=schedule, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=args.seed)

    start = time.perf_counter()
    baseline = get_adapter("infinity").generate(model, **kwargs)
    baseline_time = time.perf_counter() - start
    fast = optimize(model, adapter="infinity", passes=["lhep", "sats"])  # paper defaults: rho 0.5, delta 0.15
    start = time.perf_counter()
    fast.capture(**kwargs)
    capture_time = time.perf_counter() - start
    start = time.perf_counter()
    out = fast.generate(**kwargs)
    fast_time = time.perf_counter() - start
    flops = measure_flops(fast, **kwargs)  # runs both once more, with torch's FLOP counter
    report = fast.report.write(Path(args.report).parent.mkdir(parents=True, exist_ok=True) or args.report)

    _, H, W = schedule[-1]
    print(f"graphsurgeon demo: {args.config} (random weights), {len(lens)} prompts, CFG 3.0, LHEP rho 0.5 + SATS delta 0.15")
    print(f"schedule: h/w {args.h_div_w} preset {args.pn}, {len(schedule)} scales, final grid {H}x{W} ({H * 16}x{W * 16} px)")
    kept = {s["scale"]: s["kept"] for s in fast.stats["lhep"]}
    rows = {s["scale"]: s["rows"] for s in fast.stats["sats"]}
    print(f"{'scale':>5} {'grid':>7} {'tokens':>7} {'kept per prompt':>16} {'rows':>5} {'GFLOP base':>10} {'GFLOP fast':>10}")
    for si, (_, h, w) in enumerate(schedule):
        kept_text = "/".join(map(str, kept[si])) if kept.get(si) else "all"
        print(f"{si:>5} {f'{h}x{w}':>7} {h * w:>7} {kept_text:>16} {rows.get(si, 2 * len(lens)):>5} "
              f"{flops['baseline'][si] / 1e9:>10.2f} {flops['optimized'][si] / 1e9:>10.2f}")
    total = flops["total"]
    print(f"FLOPs: baseline {total['baseline'] / 1e9:.1f} G, optimized {total['optimized'] / 1e9:.1f} G "
          f"({flops['ratio']['optimized_vs_baseline']:.3f}x), ideal {total['ideal'] / 1e9:.1f} G")
    print(f"wall time: baseline {baseline_time:.2f} s, optimized {fast_time:.2f} s "
          f"({baseline_time / fast_time:.2f}x), capture once {capture_time:.2f} s; {torch.get_num_threads()} CPU threads")
    changed = sum(int((a != b).sum()) for a, b in zip(out.bits, baseline.bits))
    print(f"bits that differ from the baseline: {changed} of {sum(b.numel() for b in out.bits)}")
    print(f"graph diff report: {report}")


if __name__ == "__main__":
    main()
