"""FLOPs of LD-Pruning (LHEP + SATS, defaults) against the baseline and the ideal, measured with torch's counter.

    .venv/bin/python benchmarks/ld_pruning_flops.py --config infinity-tiny --pn 1M
    .venv/bin/python benchmarks/ld_pruning_flops.py --adapter var --config var-d16 [--operating-point paper]

Random weights, batch 2, seed 1234. Infinity: random text features (two prompts, 7 and 12 tokens), CFG 3, tau 0.5
(the inputs of the figures in docs/BENCHMARKS.md since issue 4); any other adapter: its ``benchmark_args``.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from graphsurgeon import get_adapter, optimize
from graphsurgeon.flops import measure_flops
from graphsurgeon.jsonio import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="infinity")
    parser.add_argument("--config", help="named config (default: the adapter's default_config)")
    parser.add_argument("--pn", default="1M")
    parser.add_argument("--passes", default="lhep,sats")
    parser.add_argument("--operating-point", help="the adapter's fixed pass settings of this name (e.g. paper)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    adapter = get_adapter(args.adapter)
    args.config = args.config or adapter.default_config
    model = adapter.build_model(args.config, device="cpu", seed=0)
    if args.adapter == "infinity":
        text_kwargs = adapter.capture_args(model, batch_size=2, pn=args.pn)
        lens = [7, 12]
        kv = torch.randn(sum(lens), model.Ct5, generator=torch.Generator().manual_seed(1))
        text = (kv, lens, torch.tensor([0, 7, 19], dtype=torch.int32), 12)
        kwargs = dict(text=text, scale_schedule=text_kwargs["scale_schedule"], cfg=3.0, tau=0.5, top_k=900,
                      top_p=0.97, seed=1234)
    else:
        kwargs = adapter.benchmark_args(model, batch_size=2, pn=args.pn, seed=1234)
    passes = [p for p in args.passes.split(",") if p]
    config = adapter.operating_points[args.operating_point] if args.operating_point else None
    fast = optimize(model, adapter=adapter, passes=passes, config=config)
    start = time.perf_counter()
    result = measure_flops(fast, **kwargs)
    result["seconds"] = time.perf_counter() - start
    result["stats"] = fast.stats
    print(f"{args.config}, pn {args.pn}, passes {args.passes} ({args.operating_point or 'adaptive defaults'}): FLOPs baseline {result['total']['baseline'] / 1e9:.1f} G, "
          f"optimized {result['total']['optimized'] / 1e9:.1f} G ({result['ratio']['optimized_vs_baseline']:.3f}x), "
          f"ideal {result['total']['ideal'] / 1e9:.1f} G ({result['ratio']['ideal_vs_baseline']:.3f}x)")
    print("per scale (GFLOP) baseline / optimized / ideal:")
    for scale, (b, o, i) in enumerate(zip(result["baseline"], result["optimized"], result["ideal"])):
        print(f"  {scale:>2}: {b / 1e9:9.2f} {o / 1e9:9.2f} {i / 1e9:9.2f}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
