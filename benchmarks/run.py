"""Benchmark the baseline sampler against the optimized model per pass set (same as ``graphsurgeon bench``).

    .venv/bin/python benchmarks/run.py --config infinity-tiny --pn 1M --operating-point paper --out out/bench_tiny

Writes <out>.json (schema in docs/BENCHMARKS.md) and <out>.md; ``--help`` lists every option.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphsurgeon.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
