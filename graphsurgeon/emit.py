"""Emit: the optimized model. It runs the adapter's sampler with captured (and rewritten) scale graphs."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .adapters import ModelAdapter
from .capture import CapturedModel, CaptureReport, capture
from .report import snapshot


class OptimizedModel:
    """The result of :func:`graphsurgeon.optimize`.

    ``generate`` has the adapter's baseline signature. Graphs are specialised (see the capture report), so
    a call whose specialisation key differs from earlier calls (another schedule, batch size or prompt
    lengths) captures a new set first; sets are cached.
    """

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, passes: list):
        self.model, self.adapter, self.passes = model, adapter, passes
        self._captured: dict[Any, CapturedModel] = {}
        self._edits: dict[Any, list[dict]] = {}
        self._snapshots: dict[Any, dict] = {}
        self._last_key: Optional[Any] = None
        self._runtimes: list = []
        self.extra_runtimes: list = []  # observers that change nothing (e.g. a FLOP counter)
        self.runner_wrappers: list = []  # callables runner -> runner that only observe (e.g. a per-scale timer)
        self.last_flops: Optional[dict] = None

    def capture(self, **generate_kwargs: Any) -> CapturedModel:
        """The graph set for these generation arguments (captured on first use)."""
        key = self.adapter.capture_key(self.model, **generate_kwargs)
        if key not in self._captured:
            captured = capture(self.adapter.capture_plan(self.model, **generate_kwargs))
            self._snapshots[key] = {("scale", s.index): snapshot(s.module) for s in captured.scales}
            self._snapshots[key].update({(name, g.index): snapshot(g.module)
                                         for name, graphs in captured.regions.items() for g in graphs})
            ordered = sorted(self.passes, key=lambda p: getattr(p, "order", 0))
            self._edits[key] = [edit for graph_pass in ordered for edit in graph_pass.apply(captured)]
            self._captured[key] = captured
        self._last_key = key
        return self._captured[key]

    def generate(self, **kwargs: Any):
        captured = self.capture(**kwargs)
        self._runtimes = [p.runtime(captured) for p in self.passes if hasattr(p, "runtime")]
        runner = self.adapter.graph_runner(self.model, captured, kwargs["scale_schedule"],
                                           self._runtimes + self.extra_runtimes)
        for wrap in self.runner_wrappers:
            runner = wrap(runner)
        return self.adapter.generate(self.model, scale_runner=runner, **kwargs)

    @property
    def stats(self) -> dict[str, list[dict]]:
        """What the last ``generate`` ran: per pass (raw), and ``summary``: per scale and per sample the tokens
        computed, whether the unconditional half ran, Delta/gamma of the CFG guard, and the estimated cost
        against the baseline (token-rows computed / the baseline's; measured FLOPs after ``measure_flops``)."""
        per_pass = {p.name: runtime.stats for p, runtime in zip([p for p in self.passes if hasattr(p, "runtime")],
                                                                 self._runtimes)}
        if self._last_key is not None and self._runtimes:
            per_pass["summary"] = _summary(self._captured[self._last_key], per_pass, self.last_flops)
        return per_pass

    @property
    def report(self):
        """The graph diff report of the current graphs (``.markdown()``, ``.html()``, ``.json()``, ``.write(path)``),
        with the last generation's stats and the last :func:`graphsurgeon.flops.measure_flops` figures."""
        from .report import DiffReport, build_report

        return DiffReport(build_report(self, self.last_flops))

    @property
    def edits(self) -> list[dict]:
        """The graph edits the passes made to the current graph set (nodes added, inputs rewired, …)."""
        self._current()
        return self._edits[self._last_key]

    def _current(self) -> CapturedModel:
        if self._last_key is None:
            self.capture(**self.adapter.capture_args(self.model))
        return self._captured[self._last_key]

    def graph_modules(self) -> list[torch.fx.GraphModule]:
        """The GraphModules the last ``generate`` ran (or the adapter's default capture), one per scale."""
        return self._current().graph_modules()

    @property
    def capture_report(self) -> CaptureReport:
        return self._current().report

    def export(self, directory, **options: Any):
        """Write readable code, drawings, ONNX and a manifest for the current graphs (see graphsurgeon.export)."""
        from .export import export_captured

        return export_captured(self._current(), directory, **options)


def _summary(captured: CapturedModel, per_pass: dict[str, list[dict]], flops: Optional[dict]) -> list[dict]:
    lhep = {s["scale"]: s["kept"] for s in per_pass.get("lhep", [])}
    sats = {s["scale"]: s for s in per_pass.get("sats", [])}
    batch = captured.plan.cfg_batch
    rows = next(n for n in captured.scales[0].module.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    samples = batch or rows
    summary = []
    for scale in captured.scales:
        kept = lhep.get(scale.index) or [scale.tokens] * samples
        guard = sats.get(scale.index, {})
        uncond = guard.get("uncond_ran", [batch is not None] * samples)
        per_sample = [{"tokens_computed": k, "uncond_ran": bool(u),
                       "delta": (guard.get("delta") or [None] * samples)[i],
                       "gamma": (guard.get("gamma") or [None] * samples)[i]} for i, (k, u) in enumerate(zip(kept, uncond))]
        computed = sum(k * (1 + int(u)) for k, u in zip(kept, uncond)) if batch else sum(kept)
        entry = {"scale": scale.index, "tokens": scale.tokens, "samples": per_sample,
                 "token_rows": computed, "token_rows_baseline": scale.tokens * rows,
                 "work_vs_baseline": computed / (scale.tokens * rows)}
        if flops:
            entry["flops"], entry["flops_baseline"] = flops["optimized"][scale.index], flops["baseline"][scale.index]
        summary.append(entry)
    return summary
