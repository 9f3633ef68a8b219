"""Time the capture of a model's full scale schedule (meta device: structure only, no weights).

    .venv/bin/python benchmarks/capture_time.py --config infinity-2b --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from graphsurgeon import get_adapter
from graphsurgeon.capture import capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="infinity")
    parser.add_argument("--config", default="infinity-2b")
    parser.add_argument("--pn", default="1M")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    adapter = get_adapter(args.adapter)
    model = adapter.build_model(args.config, device="meta")
    capture_args = adapter.capture_args(model, pn=args.pn)
    capture(adapter.capture_plan(model, adapter.validate(model, **capture_args)))  # warm-up: one-time lazy imports inside torch
    times, nodes = [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        captured = capture(adapter.capture_plan(model, adapter.validate(model, **capture_args)))
        times.append(time.perf_counter() - start)
        nodes = sum(len(s.module.graph.nodes) for s in captured.scales)
    start = time.perf_counter()
    for scale in captured.scales:
        scale.module.real_recompile()  # Python code generation, deferred by capture until a graph first runs
    codegen = time.perf_counter() - start
    print(f"{args.config}: {len(captured.scales)} scales, {nodes} nodes; capture median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}) over {args.repeats} runs; code generation on first use "
          f"{codegen:.2f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
