"""Emit: the optimized model. It runs the adapter's sampler with captured (and rewritten) scale graphs."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .adapters import ModelAdapter
from .capture import CapturedModel, CaptureReport, capture
from .errors import ConfigError
from .passes import order_passes
from .report import snapshot, stats_entries_with
from .runner import GraphRunner

DEFAULT_MAX_GRAPH_SETS = 8
"""Graph sets kept per optimized model. A set costs what its constants and code cost (about 8 MiB each on
the tiny text-conditional test model: 20 prompt lengths took 167 MiB), not the weights, which every set shares with the model."""


@dataclass(frozen=True)
class _GraphSet:
    """One specialisation's graphs, as the passes rewrote them, with what the report needs of them."""

    captured: CapturedModel
    edits: list[dict]
    snapshots: dict


@dataclass(frozen=True)
class GraphCacheInfo:
    """The graph-set cache of an optimized model (:meth:`OptimizedModel.cache_info`)."""

    hits: int
    """Calls (``generate``, ``capture``) whose specialisation key was cached."""
    captures: int
    """Graph sets captured (each a call whose key was not cached)."""
    evictions: int
    """Sets dropped, least recently used first, to keep at most ``max_size``."""
    size: int
    max_size: int


class OptimizedModel:
    """The result of :func:`graphsurgeon.optimize`.

    ``generate`` has the adapter's baseline signature and validates its arguments as the baseline does, before
    any work. Graphs are specialised (see the capture report), so a call whose specialisation key differs from
    earlier calls (another schedule, batch size or prompt lengths) captures a new set first. The last
    ``max_graph_sets`` sets used are cached; a new one beyond that evicts the least recently used
    (:meth:`cache_info` counts hits, captures and evictions). Prompt lengths are not bucketed: padding a prompt's
    text to a bucket length behind masked keys changes the text attention's reduction, hence its last-place results (35 of the
    lengths 1-39 padded to a multiple of 16, CPU SDPA), and a pass-free optimized model equals the baseline bit
    for bit; so each tuple of prompt lengths is its own set.

    Threads: ``generate`` may be called from several threads at once. What a call changes (the passes' runtimes,
    its stats) is its own; the cached graph sets are shared, hold no per-call state, and are captured once per
    key (a second thread needing the same key waits for the first). A call holds the set it runs on, so a set
    evicted meanwhile by another thread's capture stays whole for that call. ``extra_runtimes`` and
    ``runner_wrappers`` are observers set before calls; every call running while they are set uses them.
    """

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, passes: list,
                 max_graph_sets: int = DEFAULT_MAX_GRAPH_SETS):
        if isinstance(max_graph_sets, bool) or not isinstance(max_graph_sets, int) or max_graph_sets < 1:
            raise ConfigError(f"max_graph_sets must be an integer >= 1, got {max_graph_sets!r}")
        self.model, self.adapter, self.passes = model, adapter, passes
        self._ordered = order_passes(passes)  # applied in the order their runs_before constraints give
        self.max_graph_sets = max_graph_sets
        self._sets: OrderedDict[Any, _GraphSet] = OrderedDict()  # least recently used first
        self._last: Optional[tuple[Any, _GraphSet]] = None  # the last call's key and set (kept even when evicted)
        self._hits = self._captures = self._evictions = 0
        self._cache_lock = threading.Lock()  # the cache's state; held only for short bookkeeping
        self._capture_lock = threading.Lock()  # one capture at a time; taken before _cache_lock, never after
        self._last_stats: dict[str, Any] = {}
        self._stats_lock = threading.Lock()
        self.extra_runtimes: list = []  # observers that change nothing (e.g. a FLOP counter)
        self.runner_wrappers: list = []  # callables runner -> runner that only observe (e.g. a per-scale timer)
        self.decoder = None  # a picture decoder for passes that look at pictures (else the adapter's preview_decoder)
        self.last_flops: Optional[dict] = None

    def capture(self, **generate_kwargs: Any) -> CapturedModel:
        """The graph set for these generation arguments, captured on first use. The arguments are validated
        first, so a rejected call captures and caches nothing."""
        return self._graphs_for(self.adapter.validate(self.model, **generate_kwargs)).captured

    def cache_info(self) -> GraphCacheInfo:
        """Hits, captures and evictions of the graph-set cache so far, and its size now."""
        with self._cache_lock:
            return GraphCacheInfo(self._hits, self._captures, self._evictions, len(self._sets), self.max_graph_sets)

    def _graphs_for(self, args: Any) -> _GraphSet:
        """The graph set for checked arguments (the adapter's ``validate`` result), from the cache or captured."""
        key = self.adapter.capture_key(self.model, args)
        graph_set = self._lookup(key)
        if graph_set is None:
            with self._capture_lock:
                graph_set = self._lookup(key)  # another thread may have captured it while this one waited
                if graph_set is None:
                    graph_set = self._capture(args)
                    self._store(key, graph_set)
        with self._cache_lock:
            self._last = (key, graph_set)
        return graph_set

    def _lookup(self, key: Any) -> Optional[_GraphSet]:
        """The cached set for ``key`` (now the most recently used), or None."""
        with self._cache_lock:
            graph_set = self._sets.get(key)
            if graph_set is not None:
                self._sets.move_to_end(key)
                self._hits += 1
            return graph_set

    def _store(self, key: Any, graph_set: _GraphSet) -> None:
        """Cache a complete set, evicting the least recently used beyond ``max_graph_sets``. An evicted set is
        only unreferenced here: a call running on it keeps it."""
        with self._cache_lock:
            self._sets[key] = graph_set
            self._captures += 1
            while len(self._sets) > self.max_graph_sets:
                self._sets.popitem(last=False)
                self._evictions += 1

    def _capture(self, args: Any) -> _GraphSet:
        """Capture, snapshot and rewrite one graph set; it is cached only once complete, so a failure caches
        nothing and no reader ever sees a half-made set."""
        captured = capture(self.adapter.capture_plan(self.model, args))
        snapshots = {("scale", s.index): snapshot(s.module) for s in captured.scales}
        snapshots.update({(name, g.index): snapshot(g.module)
                          for name, graphs in captured.regions.items() for g in graphs})
        edits = []
        for graph_pass in self._ordered:
            edits += [edit.as_dict() for edit in graph_pass(captured).edits]
        return _GraphSet(captured, edits, snapshots)

    def generate(self, **kwargs: Any):
        """The adapter's sampler on the graphs. The returned output's ``stats`` are this call's (as ``stats``
        describes); ``fast.stats`` becomes them when the call completes."""
        args = self.adapter.validate(self.model, **kwargs)
        captured = self._graphs_for(args).captured  # held to the end of the call, evicted or not
        with_runtime = [(p, p.runtime(captured)) for p in self.passes]
        passes = [p for p, runtime in with_runtime if runtime is not None]
        runtimes = [runtime for _, runtime in with_runtime if runtime is not None]
        decoder = self.decoder or self.adapter.preview_decoder(self.model, args)
        for runtime in runtimes:
            runtime.decoder = decoder
        runner = GraphRunner(captured, runtimes + list(self.extra_runtimes))
        for wrap in list(self.runner_wrappers):
            runner = wrap(runner)
        output = self.adapter.sample(self.model, args, runner)
        stats: dict[str, Any] = {p.name: runtime.stats for p, runtime in zip(passes, runtimes)}
        if runtimes:
            stats["summary"] = _summary(captured, stats)
        output.stats = stats
        with self._stats_lock:
            self._last_stats = stats
        return output

    @property
    def stats(self) -> dict[str, Any]:
        """What the last completed ``generate`` ran (``{}`` before any, or without passes): per pass (raw), and
        ``summary``: per scale and per sample the tokens computed, whether the unconditional half ran,
        Delta/gamma of the CFG guard, and the cost against the baseline (token-rows computed, kept and
        padding, / the baseline's; measured FLOPs after ``measure_flops``). Each output carries its own call's
        stats as ``out.stats``; with several threads, use those."""
        with self._stats_lock:
            stats = self._last_stats
        if not self.last_flops or "summary" not in stats:
            return stats
        flops = self.last_flops
        measured = len(flops["optimized"])  # the scales the measured call ran
        summary = [dict(entry, flops=flops["optimized"][entry["scale"]], flops_baseline=flops["baseline"][entry["scale"]])
                   if entry["scale"] < measured else entry for entry in stats["summary"]]
        return {**stats, "summary": summary}

    @property
    def report(self):
        """The graph diff report of the current graphs (``.markdown()``, ``.html()``, ``.json()``, ``.write(path)``),
        with the last generation's stats and the last :func:`graphsurgeon.flops.measure_flops` figures."""
        from .report import DiffReport, build_report

        return DiffReport(build_report(self, self.last_flops))

    @property
    def edits(self) -> list[dict]:
        """The graph edits the passes made to the current graph set (nodes added, inputs rewired, …)."""
        return self._current_set().edits

    def _current_set(self) -> _GraphSet:
        """The set the last call used (the adapter's default capture before any call)."""
        with self._cache_lock:
            last = self._last
        if last is None:
            return self._graphs_for(self.adapter.validate(self.model, **self.adapter.capture_args(self.model)))
        return last[1]

    def _current(self) -> CapturedModel:
        return self._current_set().captured

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


def _rows(captured: CapturedModel) -> int:
    """Batch rows the scale graphs were captured for (2B with CFG): the extent of the token input's row axis."""
    scale = captured.scales[0]
    token_input = next(n for n in scale.module.graph.nodes if n.op == "placeholder" and n.target == scale.token_input)
    return token_input.meta["val"].shape[0]


def _summary(captured: CapturedModel, per_pass: dict[str, list[dict]]) -> list[dict]:
    """Per scale: the token-rows computed, split into kept tokens and padding (LHEP pads every running row to the
    widest sample's kept count), against the baseline's; per sample what it kept.

    ``work_vs_baseline`` is what ran (padding included); ``work_vs_baseline_unpadded`` is what an unpadded run
    would compute, the FLOP ideal. A running row is every conditional row plus each unconditional row SATS
    still runs (none for a sample a pass halted); without CFG, one row per sample. A scale a pass skipped computes
    nothing.
    """
    selected = stats_entries_with(per_pass, "kept")  # the token-selecting pass (at most one: passes declare `provides`)
    guarded = stats_entries_with(per_pass, "uncond_ran")  # the row-selecting pass
    skipped = {k for k, entry in stats_entries_with(per_pass, "skipped").items() if entry["skipped"]}
    batch = captured.plan.cfg_batch
    rows = _rows(captured)
    samples = batch or rows
    summary = []
    ran = {entry["scale"] for entries in per_pass.values() for entry in entries}  # ``num_scales`` may stop early
    for scale in (s for s in captured.scales if s.index in ran):
        pruned = selected.get(scale.index, {})
        kept = pruned.get("kept") or [scale.tokens] * samples
        width = pruned.get("width") or max(kept)  # the padded token count every running row computes
        guard = guarded.get(scale.index, {})
        uncond = guard.get("uncond_ran", [batch is not None] * samples)
        halted = guard.get("halted") or [False] * samples  # a sample none of whose rows ran (SkipVAR's skip)
        sample_rows = [0 if h else 1 + int(u) for u, h in zip(uncond, halted)]
        kept_rows = 0 if scale.index in skipped else sum(k * r for k, r in zip(kept, sample_rows))
        computed = 0 if scale.index in skipped else width * sum(sample_rows)
        baseline = scale.tokens * rows
        per_sample = [{"tokens_computed": 0 if h else k, "padding_per_row": 0 if h else width - k, "uncond_ran": bool(u),
                       "delta": (guard.get("delta") or [None] * samples)[i],
                       "gamma": (guard.get("gamma") or [None] * samples)[i]}
                      for i, (k, u, h) in enumerate(zip(kept, uncond, halted))]
        summary.append({"scale": scale.index, "tokens": scale.tokens, "width": width, "rows": sum(sample_rows),
                        "samples": per_sample, "token_rows": computed, "token_rows_kept": kept_rows,
                        "token_rows_padding": computed - kept_rows, "token_rows_baseline": baseline,
                        "work_vs_baseline": computed / baseline, "work_vs_baseline_unpadded": kept_rows / baseline})
    return summary
