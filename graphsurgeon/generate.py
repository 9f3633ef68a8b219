"""`graphsurgeon generate`: conditions in, PNGs and a manifest out, optimized (and with ``compare``, unaccelerated
beside it with the same seeds), on one process or sharded over ``torchrun`` ranks.

Run order: everything the user gave is checked first (settings, passes, files, the output folder), then the
model is loaded once per process, then each process generates its share of the images (image i goes to rank
i mod world size) and rank 0 writes the merged manifest. Seeds are per image (:func:`graphsurgeon.images.image_seeds`),
so an image does not depend on the number of processes.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .adapters import ModelAdapter, get_adapter
from .cli_checks import check_dir_target, check_file_target
from .errors import ConfigError
from .images import ImagePipeline, ImageSources, SamplingSettings, image_seeds, psnr, side_by_side, ssim, write_png
from .runner import GuidanceRule, ScaleRunner


REPORT_SUFFIXES = (".html", ".md", ".json")


class GenerateJob(BaseModel):
    """One `graphsurgeon generate` run (the command line and the Python call build the same object)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = "infinity"
    sources: ImageSources = ImageSources()
    conditions: list[str] = Field(..., description="prompts (or class labels as text), one image each")
    seed: int = 0
    settings: SamplingSettings = SamplingSettings()
    passes: list[str] = []
    pass_config: dict[str, dict[str, Any]] = {}
    dtype: str = "float32"
    out: Path
    compare: bool = False
    report: Optional[Path] = Field(None, description="graph diff report of the last image rank 0 made "
                                                     "(.html/.md/.json), its keep masks drawn over that image")

    @field_validator("conditions")
    @classmethod
    def _some_conditions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no prompts: give --prompt (repeatable) or a --prompts file with one prompt per line")
        return value


def make_job(**fields: Any) -> GenerateJob:
    """A :class:`GenerateJob`, or a ConfigError naming the field."""
    try:
        return GenerateJob(**fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"generate: {problems}") from None


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file; an empty file is refused."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path}: the file holds no prompt (one per line)")
    return prompts


@dataclass
class _Plan:
    """What was checked before anything loads."""

    adapter: ModelAdapter
    dtype: torch.dtype
    out: Path
    report: Optional[Path]


def check_job(job: GenerateJob) -> _Plan:
    """Every check that needs no model: the adapter, the passes and their settings, the dtype, the files (by the
    adapter: they exist and fit each other), and a writable output folder (created last)."""
    from .passes import resolve_passes

    adapter = get_adapter(job.adapter)
    resolve_passes(job.passes, job.pass_config)
    dtype = getattr(torch, job.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"--dtype {job.dtype!r} is not a torch dtype (float32, bfloat16)")
    adapter.check_sources(job.sources, job.conditions)
    report = check_file_target(job.report, "--report", REPORT_SUFFIXES) if job.report is not None else None
    return _Plan(adapter=adapter, dtype=dtype, out=check_dir_target(job.out), report=report)


class _Progress:
    """A progress bar per image over its scales on a terminal (tqdm); plain lines in a log."""

    def __init__(self, total: int, rank: int, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.rank = total, rank
        self.interactive = self.stream.isatty()

    def image(self, label: str) -> "_ImageProgress":
        return _ImageProgress(self, label)


class _ImageProgress:
    def __init__(self, progress: _Progress, label: str):
        self.progress, self.label, self.bar = progress, label, None

    def wrap(self, runner: ScaleRunner) -> ScaleRunner:
        return _TickingRunner(runner, self)

    def tick(self, scale: int) -> None:
        if self.progress.interactive:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(desc=self.label, unit="scale", file=self.progress.stream, leave=False)
            self.bar.update(1)

    def done(self, message: str) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"[rank {self.progress.rank}] {message}" if self.progress.rank else message, file=self.progress.stream,
              flush=True)


class _TickingRunner(ScaleRunner):
    """Delegates to ``inner`` and ticks the progress bar once per scale."""

    def __init__(self, inner: ScaleRunner, progress: _ImageProgress):
        self._inner, self._progress = inner, progress

    def __enter__(self) -> "_TickingRunner":
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        return self._inner.__exit__(*exc)

    def scale(self, index: int, inputs: dict) -> dict:
        self._progress.tick(index)
        return self._inner.scale(index, inputs)

    def residual(self, index: int, inputs: dict) -> dict:
        return self._inner.residual(index, inputs)

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> torch.Tensor:
        return self._inner.guide(index, logits, batch, rule)


def _world(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device). Under torchrun (WORLD_SIZE > 1) the process group is set up here:
    gloo on CPU, NCCL on CUDA (each rank on its LOCAL_RANK GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _gather(records: list[dict], world: int) -> list[dict]:
    """Every rank's records on rank 0 (others get [])."""
    if world == 1:
        return records
    import torch.distributed as dist

    gathered: Optional[list] = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    return [r for part in gathered for r in part] if gathered is not None else []


def run_generate(job: GenerateJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job`` (see the module docstring); returns the manifest (rank 0's merged one; other ranks: their part)."""
    from .api import optimize

    plan = check_job(job)
    rank, world, device = _world(job.sources.device)
    sources = job.sources.model_copy(update={"device": device})
    pipeline = plan.adapter.image_pipeline(sources)
    context = plan.adapter.precision(pipeline.model, plan.dtype)
    fast = optimize(pipeline.model, adapter=plan.adapter, passes=job.passes, config=job.pass_config or None)
    fast.decoder = pipeline.preview_decoder()  # passes that look at pictures mid-generation see the real decoder
    if rank == 0:
        for note in pipeline.notes:
            log(f"note: {note}")
    seeds = image_seeds(job.seed, len(job.conditions))
    mine = [i for i in range(len(job.conditions)) if i % world == rank]
    progress = _Progress(len(mine), rank)
    records, last_image = [], None
    for i in mine:
        record, last_image = _one_image(job, plan, pipeline, fast, context, i, seeds[i], progress)
        records.append(record)
    if plan.report is not None and rank == 0:
        from .report import DiffReport, build_report

        DiffReport(build_report(fast, fast.last_flops, images=last_image[None])).write(plan.report)
        log(f"graph diff report (image {mine[-1]}): {plan.report}")
    everything = sorted(_gather(records, world), key=lambda r: r["index"])
    manifest = _manifest(job, plan, pipeline, world, everything)
    if rank == 0:
        (plan.out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        log(f"wrote {len(everything)} image(s) and manifest.json to {plan.out}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return manifest


def _one_image(job: GenerateJob, plan: _Plan, pipeline: ImagePipeline, fast: Any, context: Callable, index: int,
               seed: int, progress: _Progress) -> tuple[dict[str, Any], torch.Tensor]:
    """Generate image ``index`` (optimized; with ``compare`` also the baseline) and write its files; returns its
    manifest record and the optimized image."""
    condition = job.conditions[index]
    kwargs = pipeline.sampler_args(condition, seed, job.settings)
    step = progress.image(f"image {index}")
    fast.runner_wrappers = [step.wrap]
    start = time.perf_counter()
    with context():  # decoding too: the official inference decodes in the model's precision (bf16 autocast on GPU)
        output = fast.generate(**kwargs)
        image = pipeline.images(output)[0]
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"index": index, "condition": condition, "seed": seed, "file": f"{index:04d}.png",
                              "seconds": seconds, "size": list(image.shape[:2]), "stats": _summary(output)}
    write_png(image, plan.out / record["file"])
    message = f"image {index}: {record['file']} ({seconds:.2f} s)"
    if job.compare:
        args = plan.adapter.validate(pipeline.model, **kwargs)
        start = time.perf_counter()
        with context():
            baseline = plan.adapter.sample(pipeline.model, args, step.wrap(plan.adapter.baseline_runner(pipeline.model, args)))
            reference = pipeline.images(baseline)[0]
        record.update(baseline_file=f"{index:04d}_baseline.png", compare_file=f"{index:04d}_compare.png",
                      baseline_seconds=time.perf_counter() - start, **_distance(reference, image))
        write_png(reference, plan.out / record["baseline_file"])
        write_png(side_by_side(reference, image), plan.out / record["compare_file"])
        message += (f", baseline {record['baseline_seconds']:.2f} s, PSNR {record['psnr_db'] if record['psnr_db'] is not None else 'inf'}"
                    f" dB, SSIM {record['ssim']:.4f}")
    step.done(message)
    return record, image


def _distance(reference: torch.Tensor, image: torch.Tensor) -> dict[str, Any]:
    value = psnr(reference, image)
    return {"psnr_db": None if value == float("inf") else round(value, 3), "identical": value == float("inf"),
            "ssim": round(ssim(reference, image), 5)}


def _summary(output: Any) -> Optional[list[dict]]:
    """Per-scale stats of the passes (the summary: tokens computed, rows run, work vs the baseline)."""
    return (output.stats or {}).get("summary")


def _manifest(job: GenerateJob, plan: _Plan, pipeline: ImagePipeline, world: int, records: list[dict]) -> dict:
    return {"adapter": job.adapter, "sources": json.loads(job.sources.model_dump_json()),
            "settings": json.loads(job.settings.model_dump_json()), "seed": job.seed, "passes": job.passes,
            "pass_config": job.pass_config, "dtype": job.dtype, "compare": job.compare, "processes": world,
            "notes": pipeline.notes, "images": records,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}
