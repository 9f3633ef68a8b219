"""FLOPs of LD-Pruning (LHEP + SATS, defaults) against the baseline and the ideal, measured with torch's counter.

    .venv/bin/python benchmarks/ld_pruning_flops.py --config infinity-tiny --pn 1M

Random weights and random text features (two prompts, 7 and 12 tokens), seed 1234, CFG 3, tau 0.5.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from graphsurgeon import get_adapter, optimize
from graphsurgeon.flops import measure_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="infinity-tiny")
    parser.add_argument("--pn", default="1M")
    parser.add_argument("--passes", default="lhep,sats")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    adapter = get_adapter("infinity")
    model = adapter.build_model(args.config, device="cpu", seed=0)
    text_kwargs = adapter.capture_args(model, batch_size=2, pn=args.pn)
    lens = [7, 12]
    kv = torch.randn(sum(lens), model.Ct5, generator=torch.Generator().manual_seed(1))
    text = (kv, lens, torch.tensor([0, 7, 19], dtype=torch.int32), 12)
    kwargs = dict(text=text, scale_schedule=text_kwargs["scale_schedule"], cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
                  seed=1234)
    fast = optimize(model, passes=[p for p in args.passes.split(",") if p])
    start = time.perf_counter()
    result = measure_flops(fast, **kwargs)
    result["seconds"] = time.perf_counter() - start
    result["stats"] = fast.stats
    print(f"{args.config}, pn {args.pn}, passes {args.passes}: FLOPs baseline {result['total']['baseline'] / 1e9:.1f} G, "
          f"optimized {result['total']['optimized'] / 1e9:.1f} G ({result['ratio']['optimized_vs_baseline']:.3f}x), "
          f"ideal {result['total']['ideal'] / 1e9:.1f} G ({result['ratio']['ideal_vs_baseline']:.3f}x)")
    print("per scale (GFLOP) baseline / optimized / ideal:")
    for scale, (b, o, i) in enumerate(zip(result["baseline"], result["optimized"], result["ideal"])):
        print(f"  {scale:>2}: {b / 1e9:9.2f} {o / 1e9:9.2f} {i / 1e9:9.2f}")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
