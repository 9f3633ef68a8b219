"""FLOPs of an optimized generation, per scale, measured with torch's FLOP counter.

``measure_flops(fast, **generate_kwargs)`` runs ``fast.generate`` with a counter around every graph call and,
beside it, the same model optimized with no passes (whose graphs compute exactly the baseline), then reports
per scale: baseline FLOPs, optimized FLOPs, and the ideal (baseline FLOPs scaled by the fraction of token-rows
actually needed: all skipped tokens and rows free, no padding, no overhead).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from torch.utils.flop_counter import FlopCounterMode

from .runner import PassRuntime


class FlopCounterRuntime(PassRuntime):
    """A pass runtime that only counts: it opens a FLOP counter before each graph call and closes it after."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[tuple[int, str], int] = defaultdict(int)
        self._counter: Optional[FlopCounterMode] = None

    def inputs(self, graph, region: str, device) -> dict:
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        return {}

    def observe(self, graph, region: str, outputs: dict) -> None:
        self._counter.__exit__(None, None, None)
        self.flops[(graph.index, region)] += self._counter.get_total_flops()
        self._counter = None

    def per_scale(self) -> list[int]:
        scales = sorted({scale for scale, _ in self.flops})
        return [sum(v for (s, _), v in self.flops.items() if s == scale) for scale in scales]


def measure_flops(fast, baseline_flops: Optional[list[int]] = None, **generate_kwargs: Any) -> dict[str, Any]:
    """Per-scale and total FLOPs of ``fast.generate(**generate_kwargs)`` vs the baseline and the ideal.
    ``baseline_flops`` (per scale, from an earlier call with the same arguments) saves the baseline run."""
    from .emit import OptimizedModel

    if baseline_flops is None:
        baseline = OptimizedModel(fast.model, fast.adapter, [])
        counter = FlopCounterRuntime()
        baseline.extra_runtimes = [counter]
        baseline.generate(**generate_kwargs)
        baseline_flops = counter.per_scale()
    base = list(baseline_flops)
    counter = FlopCounterRuntime()
    fast.extra_runtimes = [counter]
    try:
        fast.generate(**generate_kwargs)
    finally:
        fast.extra_runtimes = []
    optimized = counter.per_scale()
    summary = fast.stats.get("summary")  # kept token-rows vs the baseline's: an unpadded run's work
    ideal = [round(b * s["work_vs_baseline_unpadded"]) for b, s in zip(base, summary)] if summary else list(base)
    fast.last_flops = {"baseline": base, "optimized": optimized, "ideal": ideal,
                       "total": {"baseline": sum(base), "optimized": sum(optimized), "ideal": sum(ideal)},
                       "ratio": {"optimized_vs_baseline": sum(optimized) / sum(base),
                                 "ideal_vs_baseline": sum(ideal) / sum(base)}}
    return fast.last_flops
