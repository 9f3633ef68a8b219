"""Clocks for benchmarks: per-scale time of a generation, time inside the nodes a pass inserted, peak memory.

On CUDA, per-scale times come from CUDA events recorded in stream order (no synchronisation inside the run);
inserted nodes are timed synchronously (synchronize before and after each node), which is their full cost
including any host synchronisation they need, at the price of the overlap the run would otherwise have.
"""
from __future__ import annotations

import operator
import os
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
import torch.fx

from ..meta import annotations
from ..runner import GuidanceRule, ScaleRunner


class Clock:
    """Marks in time: host ``perf_counter`` on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


class ScaleTimer:
    """Wraps a scale runner (the object a sampler calls ``scale(index, inputs)`` on) and marks the start of every
    scale and the end of the loop: a scale's time runs from its ``scale`` call to the next one, so it includes
    the transformer, the CFG mix, sampling and the residual update of that scale."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: list[tuple[Any, Any]] = []

    def wrap(self, runner: Any) -> "_TimedRunner":
        return _TimedRunner(runner, self)

    def per_scale_ms(self) -> dict[int, float]:
        self.clock.sync()
        return {scale: self.clock.elapsed_ms(start, end)
                for (scale, start), (_, end) in zip(self.marks, self.marks[1:])}


class _TimedRunner(ScaleRunner):
    """A scale runner that marks the time of each ``scale`` call and delegates everything to ``inner``."""

    def __init__(self, inner: ScaleRunner, timer: ScaleTimer):
        self._inner, self._timer = inner, timer

    def __enter__(self) -> "_TimedRunner":
        self._inner.__enter__()
        self._timer.marks = []
        return self

    def __exit__(self, *exc) -> Any:
        self._timer.marks.append(("end", self._timer.clock.mark()))
        return self._inner.__exit__(*exc)

    def scale(self, index: int, inputs: dict) -> dict:
        self._timer.marks.append((index, self._timer.clock.mark()))
        return self._inner.scale(index, inputs)

    def residual(self, index: int, inputs: dict) -> dict:
        return self._inner.residual(index, inputs)

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> torch.Tensor:
        return self._inner.guide(index, logits, batch, rule)


# -- time inside inserted nodes ---------------------------------------------------------------------------
_ACTIVE: Optional["InsertedNodeTimer"] = None


def inserted_node_start(key: tuple) -> None:
    """Graph node placed before an inserted node (a no-op unless an InsertedNodeTimer is active)."""
    if _ACTIVE is not None:
        _ACTIVE.start()


def inserted_node_stop(key: tuple, value: Any) -> None:
    """Graph node placed after an inserted node; ``value`` (the node's result) orders it after the node."""
    if _ACTIVE is not None:
        _ACTIVE.stop(key)


class InsertedNodeTimer:
    """Time spent in the nodes passes inserted (tagged ``pass`` in ``node.meta["graphsurgeon"]``) and in the
    passes' host-side runtimes, per (pass, role, region, scale). Use ``instrument`` on the graphs, then run
    inside ``with timer:``; ``remove`` takes the timing nodes out again."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.ms: dict[tuple, float] = defaultdict(float)
        self._started: Optional[float] = None

    def __enter__(self) -> "InsertedNodeTimer":
        global _ACTIVE
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None

    def start(self) -> None:
        self.clock.sync()
        self._started = time.perf_counter()

    def stop(self, key: tuple) -> None:
        self.clock.sync()
        self.ms[key] += (time.perf_counter() - self._started) * 1e3

    def reset(self) -> None:
        self.ms = defaultdict(float)

    @staticmethod
    def instrument(module: torch.fx.GraphModule, region: str, scale: int) -> None:
        """Bracket every computing node a pass inserted with timing nodes (``getitem`` and inputs are free)."""
        graph = module.graph
        for node in list(graph.nodes):
            tags = annotations(node)
            if "pass" not in tags or node.op not in ("call_function", "call_method") or _is_getitem(node):
                continue
            key = (tags["pass"], tags.get("role", node.name), region, scale)
            with graph.inserting_before(node):
                annotations(graph.call_function(inserted_node_start, (key,)))["timing"] = True
            with graph.inserting_after(node):
                annotations(graph.call_function(inserted_node_stop, (key, node)))["timing"] = True
        module.recompile()

    @staticmethod
    def remove(module: torch.fx.GraphModule) -> None:
        graph = module.graph
        for node in list(graph.nodes):
            if annotations(node).get("timing"):
                graph.erase_node(node)
        module.recompile()

    def timed(self, name: str, function: Callable) -> Callable:
        """``function`` with its calls added to this timer under (name, "host runtime")."""
        def call(*args: Any, **kwargs: Any) -> Any:
            if _ACTIVE is not self:
                return function(*args, **kwargs)
            self.start()
            try:
                return function(*args, **kwargs)
            finally:
                self.stop((name, "host runtime", "host", -1))
        return call


def _is_getitem(node: torch.fx.Node) -> bool:
    return node.target is operator.getitem


class PeakMemory:
    """Peak memory of a run: CUDA's allocator peak on a GPU; on the CPU the peak resident set size above the
    level at the start, sampled every millisecond from /proc (None where /proc is missing)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._peak = self._base = 0
        self._running = False
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = _rss_bytes() or 0
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, _rss_bytes() or 0)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._peak = torch.cuda.max_memory_allocated()
            return
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)

    def peak_mib(self) -> Optional[float]:
        """Peak (CUDA: allocated bytes, model included) or peak growth (CPU: resident set) in MiB."""
        if not self.cuda and _rss_bytes() is None:
            return None
        return (self._peak - (0 if self.cuda else self._base)) / 2**20


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
