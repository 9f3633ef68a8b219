"""Run a benchmark: the baseline sampler and the optimized model per pass set, side by side in one process.

Every variant is captured and warmed up first; then the timed runs go round-robin (baseline, none, lhep, ...
then again), so slow drift of the machine spreads over all variants alike and the speed-up ratios compare
runs taken side by side. FLOPs and the time inside inserted nodes come from separate runs, so neither
counter slows the timed runs.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..adapters import ModelAdapter, get_adapter
from ..api import optimize
from ..cli_checks import check_device, check_dtype
from ..errors import ConfigError
from ..flops import FlopCounterRuntime, measure_flops
from ..images import ImagePipeline, ImageSources, SamplingSettings
from ..passes import resolve_passes
from .spec import BenchSpec, passes_of
from .timing import Clock, InsertedNodeTimer, PeakMemory, ScaleTimer

SCHEMA_VERSION = 1
BASELINE = "baseline"


def pass_settings(spec: BenchSpec, adapter: Any, names: list[str]) -> dict[str, dict]:
    """Settings of the enabled passes: the adaptive config, or the fixed operating point on top of it."""
    fixed: dict[str, dict] = {}
    if spec.operating_point is not None:
        points = adapter.operating_points
        if spec.operating_point not in points:
            raise ConfigError(f"operating_point {spec.operating_point!r} is not one the {spec.adapter} adapter names "
                              f"({sorted(points)})")
        fixed = {name: dict(values) for name, values in points[spec.operating_point].items()}
    if spec.keep_fraction is not None:
        fixed.setdefault("lhep", {})["keep_fraction"] = dict(spec.keep_fraction)
    if spec.stop_scale is not None:
        fixed.setdefault("sats", {})["stop_scale"] = spec.stop_scale
    return {name: {**spec.pass_config.get(name, {}), **fixed.get(name, {})} for name in names}


class Variant:
    """One thing to time: the adapter's baseline sampler, or the optimized model with a pass set."""

    def __init__(self, name: str, model: Any, adapter: Any, settings: Optional[dict]):
        self.name, self.model, self.adapter, self.settings = name, model, adapter, settings
        self.fast = None if settings is None else optimize(model, adapter=adapter, passes=list(settings),
                                                          config=settings)
        self.times: list[float] = []
        self.per_scale: list[dict[int, float]] = []
        self.memory: list[Optional[float]] = []

    def generate(self, kwargs: dict, timer: Optional[ScaleTimer] = None) -> Any:
        if self.fast is None:
            args = self.adapter.validate(self.model, **kwargs)
            runner = self.adapter.baseline_runner(self.model, args)
            return self.adapter.sample(self.model, args, timer.wrap(runner) if timer else runner)
        self.fast.runner_wrappers = [timer.wrap] if timer else []
        try:
            return self.fast.generate(**kwargs)
        finally:
            self.fast.runner_wrappers = []


@dataclass
class CheckedBenchmark:
    """A spec checked against its adapter before anything is built."""

    adapter: ModelAdapter
    config: str
    settings: dict[str, dict[str, dict]]
    """Pass settings by pass set."""
    device: torch.device
    dtype: torch.dtype
    sources: Optional[ImageSources]
    """The user's files (None: random weights from ``config``)."""


def check_benchmark(spec: BenchSpec) -> CheckedBenchmark:
    """Every check that needs no model: the passes of each set (names, settings, composition), the schedule preset,
    the device and the dtype on it, and the user's files (by the adapter)."""
    adapter = get_adapter(spec.adapter)
    settings = {s: pass_settings(spec, adapter, passes_of(s)) for s in spec.pass_sets}
    for values in settings.values():
        resolve_passes(list(values), values)
    adapter.check_settings(SamplingSettings(h_div_w=spec.h_div_w, pn=spec.pn))
    device = check_device(spec.device)
    dtype = check_dtype(adapter, spec.dtype, device)
    sources = None
    if spec.sources_given:
        sources = ImageSources(config=spec.config, checkpoint=spec.checkpoint, vae=spec.vae,
                               text_encoder=spec.text_encoder, device=spec.device, seed=spec.seed)
        adapter.check_sources(sources, [])
    config = spec.config or adapter.default_config
    if config is None:
        raise ConfigError(f"adapter {spec.adapter!r} names no default config: give --config")
    return CheckedBenchmark(adapter=adapter, config=config, settings=settings, device=device, dtype=dtype,
                            sources=sources)


def load_model(spec: BenchSpec, checked: CheckedBenchmark, images: bool = False) -> tuple[Any, Optional[ImagePipeline]]:
    """The model to time: through the adapter's image pipeline when the user named files (or ``images`` asks for
    its decoder: random stand-ins then), else the adapter's random weights for the config."""
    if checked.sources is None and not images:
        return checked.adapter.build_model(checked.config, device=spec.device, seed=spec.seed,
                                           draw_on_device=checked.device.type == "cuda"), None
    sources = checked.sources or ImageSources(config=checked.config, device=spec.device, seed=spec.seed)
    pipeline = checked.adapter.image_pipeline(sources)
    return pipeline.model, pipeline


def run_benchmark(spec: BenchSpec, log=print, checked: Optional[CheckedBenchmark] = None,
                  loaded: Optional[tuple[Any, Optional[ImagePipeline]]] = None) -> dict[str, Any]:
    """Run ``spec`` and return the result (see docs/BENCHMARKS.md for the schema). ``checked`` and ``loaded``:
    what :func:`check_benchmark` and :func:`load_model` returned, when the caller ran them already."""
    checked = checked or check_benchmark(spec)
    adapter, settings, device = checked.adapter, checked.settings, checked.device
    started = time.perf_counter()
    model, pipeline = loaded or load_model(spec, checked)
    for note in pipeline.notes if pipeline is not None else ():
        log(f"note: {note}")
    precision = adapter.precision(model, checked.dtype)
    kwargs = adapter.benchmark_args(model, batch_size=spec.batch, h_div_w=spec.h_div_w, pn=spec.pn, seed=spec.seed)
    log(f"built {checked.config} on {spec.device} ({spec.dtype}) in {time.perf_counter() - started:.1f} s")
    variants = [Variant(BASELINE, model, adapter, None)]
    variants += [Variant(s, model, adapter, settings[s]) for s in spec.pass_sets]
    if pipeline is not None:  # passes that look at pictures mid-generation see the loaded decoder
        for variant in variants[1:]:
            variant.fast.decoder = pipeline.preview_decoder()
    clock = Clock(device)
    result: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": "graphsurgeon.bench",
                              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine_info(device), "spec": spec.model_dump(mode="json"), "mode": spec.mode,
                              "variants": {}}
    with torch.inference_mode(), precision():
        for variant in variants:  # every capture first: settings that only the schedule refutes fail before any run
            entry = result["variants"][variant.name] = {"passes": list(variant.settings or {}),
                                                        "pass_config": variant.settings, "capture_s": None}
            if variant.fast is not None:
                start = time.perf_counter()
                variant.fast.capture(**kwargs)
                entry["capture_s"] = time.perf_counter() - start
        for variant in variants:
            for _ in range(spec.warmup):
                variant.generate(kwargs)
            clock.sync()
            log(f"{variant.name}: captured and warmed up")
        for repeat in range(spec.repeats):
            for variant in variants:
                timer = ScaleTimer(clock)
                with PeakMemory(device) as memory:
                    clock.sync()
                    start = time.perf_counter()
                    variant.generate(kwargs, timer)
                    clock.sync()
                    variant.times.append(time.perf_counter() - start)
                variant.per_scale.append(timer.per_scale_ms())
                variant.memory.append(memory.peak_mib())
            log(f"repeat {repeat + 1}/{spec.repeats}: " + ", ".join(f"{v.name} {v.times[-1]:.3f} s" for v in variants))
        captured = variants[1].fast.capture(**kwargs)  # every variant ran these shapes: all tokens of all rows
        all_tokens = [s.tokens * _rows(s) for s in captured.scales]
        for variant in variants:
            result["variants"][variant.name].update(_timings(variant, spec.batch))
            summary = variant.fast.stats.get("summary") if variant.fast is not None else None
            result["variants"][variant.name]["tokens_per_scale"] = (
                [entry["token_rows"] for entry in summary] if summary else all_tokens)
        if spec.flops:
            _count_flops(variants, kwargs, result, log)
        if spec.inserted_timing:
            for variant in variants:
                if variant.fast is not None and variant.settings:
                    result["variants"][variant.name]["inserted"] = _inserted_time(variant, kwargs, clock, spec.repeats)
                    log(f"{variant.name}: inserted nodes timed")
    _ratios(result)
    result["paper_latency_s"] = adapter.paper_latency_s.get(checked.config)
    result["seconds"] = time.perf_counter() - started
    return result


def _timings(variant: Variant, batch: int) -> dict[str, Any]:
    times = variant.times
    scales = sorted(variant.per_scale[0])
    return {
        "time_s": {"runs": times, "median": statistics.median(times), "min": min(times), "max": max(times)},
        "time_per_image_s": {"median": statistics.median(times) / batch, "min": min(times) / batch,
                             "max": max(times) / batch},
        "per_scale_ms": [statistics.median(run[s] for run in variant.per_scale) for s in scales],
        "peak_memory_mib": statistics.median(variant.memory) if None not in variant.memory else None,
    }


def _rows(scale: Any) -> int:
    tokens = next(n for n in scale.module.graph.nodes if n.op == "placeholder" and n.target == scale.token_input)
    return tokens.meta["val"].shape[0]


def _count_flops(variants: list[Variant], kwargs: dict, result: dict, log) -> None:
    """FLOPs per variant (one counted run each). The baseline sampler's are counted on the pass-free graphs,
    which compute exactly what it computes (bit-identical outputs, tests/test_capture.py)."""
    from ..emit import OptimizedModel

    counter = FlopCounterRuntime()
    pass_free = [v.fast for v in variants if v.fast is not None and not v.fast.passes]  # reuse its capture
    reference = pass_free[0] if pass_free else OptimizedModel(variants[0].model, variants[0].adapter, [])
    reference.extra_runtimes = [counter]
    try:
        reference.generate(**kwargs)
    finally:
        reference.extra_runtimes = []
    baseline = counter.per_scale()
    result["variants"][BASELINE]["flops"] = {"total": sum(baseline), "per_scale": baseline}
    for variant in variants[1:]:
        counted = measure_flops(variant.fast, baseline_flops=baseline, **kwargs)
        result["variants"][variant.name]["flops"] = {"total": counted["total"]["optimized"],
                                                     "per_scale": counted["optimized"],
                                                     "ideal_total": counted["total"]["ideal"]}
    log("FLOPs counted")


def _inserted_time(variant: Variant, kwargs: dict, clock: Clock, repeats: int) -> dict[str, Any]:
    """Time inside the inserted nodes and the passes' host runtimes, in instrumented runs (median of ``repeats``
    by total), as milliseconds and as a share of the instrumented run's wall time."""
    fast = variant.fast
    timer = InsertedNodeTimer(clock)
    captured = fast.capture(**kwargs)
    graphs = [(g.module, "scale", g.index) for g in captured.scales]
    graphs += [(g.module, region, g.index) for region, gs in captured.regions.items() for g in gs]
    originals = {p.name: p.runtime for p in fast.passes}
    for module, region, index in graphs:
        timer.instrument(module, region, index)
    for graph_pass in fast.passes:
        if graph_pass.name in originals:
            graph_pass.runtime = _timed_runtime_factory(originals[graph_pass.name], graph_pass.name, timer)
    runs = []
    try:
        variant.generate(kwargs)  # warm-up of the instrumented code
        for _ in range(repeats):
            timer.reset()
            with timer:
                clock.sync()
                start = time.perf_counter()
                variant.generate(kwargs)
                clock.sync()
                wall = time.perf_counter() - start
            runs.append((sum(timer.ms.values()), wall, dict(timer.ms)))
    finally:
        for module, _, _ in graphs:
            timer.remove(module)
        for graph_pass in fast.passes:
            if graph_pass.name in originals:
                del graph_pass.runtime  # the class's method again
    total, wall, by_key = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    per_scale: dict[int, float] = {}
    for (name, role, region, scale), ms in by_key.items():
        if scale >= 0:
            per_scale[scale] = per_scale.get(scale, 0.0) + ms
    by_role: dict[str, float] = {}
    for (name, role, region, scale), ms in by_key.items():
        by_role[f"{name}:{role}"] = by_role.get(f"{name}:{role}", 0.0) + ms
    graph_ms = sum(ms for (_, _, region, _), ms in by_key.items() if region != "host")
    return {"ms_total": total, "graph_nodes_ms": graph_ms, "host_runtime_ms": total - graph_ms,
            "run_s": wall, "share_of_run": total / (wall * 1e3),
            "per_scale_ms": [per_scale[s] for s in sorted(per_scale)], "scales": sorted(per_scale),
            "max_per_scale_ms": max(per_scale.values()) if per_scale else 0.0,
            "by_role_ms": dict(sorted(by_role.items(), key=lambda kv: -kv[1]))}


def _timed_runtime_factory(make_runtime, name: str, timer: InsertedNodeTimer):
    def make(captured):
        runtime = make_runtime(captured)
        if runtime is not None:
            for method in ("inputs", "observe", "guide"):  # the PassRuntime hooks
                setattr(runtime, method, timer.timed(name, getattr(runtime, method)))
        return runtime
    return make


def _ratios(result: dict) -> None:
    variants = result["variants"]
    base = variants[BASELINE]["time_s"]["median"]
    none = variants.get("none", {}).get("time_s", {}).get("median")
    base_flops = variants[BASELINE].get("flops", {}).get("total")
    for entry in variants.values():
        median = entry["time_s"]["median"]
        entry["speedup_vs_baseline"] = base / median
        entry["speedup_vs_none"] = none / median if none else None
        flops = entry.get("flops")
        if flops and base_flops:
            entry["ideal_speedup"] = base_flops / flops["total"]
            entry["achieved_fraction_of_ideal"] = entry["speedup_vs_baseline"] / entry["ideal_speedup"]
            ideal_total = flops.get("ideal_total")
            entry["ideal_speedup_no_padding"] = base_flops / ideal_total if ideal_total else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured: CPU model and threads, versions, and the GPU with its driver."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    driver=_nvidia_driver())
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
