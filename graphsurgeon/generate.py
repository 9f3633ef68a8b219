"""`graphsurgeon generate`: conditions in, PNGs and a manifest out, optimized (and with ``compare``, unaccelerated
beside it with the same seeds), on one process or sharded over ``torchrun`` ranks.

Run order: everything the user gave is checked first (settings, passes, files, the output folder: empty, or
``overwrite``), then the model is loaded once per process, then each process generates its share of the images
(image i goes to rank i mod world size) under hidden temporary names, and rank 0 publishes the run: renames them,
removes what an earlier run's manifest listed and writes the merged manifest last. An interrupted or failed run
removes its temporary files and leaves the folder as the earlier run left it. Seeds are per image
(:func:`graphsurgeon.images.image_seeds`), so an image does not depend on the number of processes.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .adapters import ModelAdapter, get_adapter
from .cli_checks import check_device, check_dir_target, check_dtype, check_file_target, check_seeds
from .errors import ConfigError
from .images import ImagePipeline, ImageSources, SamplingSettings, image_seeds, psnr, side_by_side, ssim, write_png
from .jsonio import temporary_name, terminate_as_interrupt, write_json_atomic
from .runner import GuidanceRule, ScaleRunner


REPORT_SUFFIXES = (".html", ".md", ".json")
MANIFEST = "manifest.json"
MANIFEST_KIND = "graphsurgeon generate"
_FILE_KEYS = ("file", "baseline_file", "compare_file")
"""An image record's files (an earlier manifest without ``files`` lists its files only there)."""
_SAMPLING_KEYS = ("cfg", "tau", "top_k", "top_p")


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
    overwrite: bool = Field(False, description="run into a folder that holds files: an earlier run's are replaced "
                                               "(those its manifest lists, once this run succeeded), others kept")

    @field_validator("conditions")
    @classmethod
    def _some_conditions(cls, value: list[str]) -> list[str]:
        """At least one condition, none blank: an empty prompt would make an image of nothing, without a word."""
        if not value:
            raise ValueError("no prompts: give --prompt (repeatable) or a --prompts file with one prompt per line")
        blank = [i for i, condition in enumerate(value) if not condition.strip()]
        if blank:
            raise ValueError(f"prompt(s) {blank[:5]} are empty; give some text (or a class label) for each image")
        return value


def make_job(**fields: Any) -> GenerateJob:
    """A :class:`GenerateJob`, or a ConfigError naming the field."""
    try:
        return GenerateJob(**fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"generate: {problems}") from None


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file; an empty file, or one in another encoding, is refused."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--prompts {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start}); save the file as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
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
    earlier: list[str]
    """The files an earlier run's manifest in ``out`` lists: removed once this run succeeded (unless rewritten)."""


def check_job(job: GenerateJob) -> _Plan:
    """Every check that needs no model: the adapter, the passes and their settings (composition included), the
    sampling settings, the seeds of every image, the device and the dtype on it, the files (by the adapter: they
    exist and fit each other), and a writable output folder (created last)."""
    from .passes import resolve_passes

    adapter = get_adapter(job.adapter)
    resolve_passes(job.passes, job.pass_config)
    adapter.check_settings(job.settings)
    check_seeds(job.seed, len(job.conditions))
    dtype = check_dtype(adapter, job.dtype, check_device(job.sources.device))
    adapter.check_sources(job.sources, job.conditions)
    report = check_file_target(job.report, "--report", REPORT_SUFFIXES) if job.report is not None else None
    out = check_dir_target(job.out)
    return _Plan(adapter=adapter, dtype=dtype, out=out, report=report,
                 earlier=_earlier_run_files(out, report, job.overwrite))


class _Progress:
    """On a terminal, a bar per run of an image over its scales (tqdm: count of total, ETA), labelled with the
    image, its place among this process's images and the run (optimized or baseline); in a log, one line per
    image."""

    def __init__(self, count: int, rank: int, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.count, self.rank = count, rank
        self.interactive = self.stream.isatty()

    def run(self, label: str, scales: int) -> "_RunProgress":
        return _RunProgress(self, label, scales)

    def done(self, message: str) -> None:
        print(f"[rank {self.rank}] {message}" if self.rank else message, file=self.stream, flush=True)


class _RunProgress:
    """One run's bar; created on its first scale, so a run that fails before sampling draws nothing."""

    def __init__(self, progress: _Progress, label: str, scales: int):
        self.progress, self.label, self.scales, self.bar = progress, label, scales, None

    def wrap(self, runner: ScaleRunner) -> ScaleRunner:
        return _TickingRunner(runner, self)

    def tick(self) -> None:
        if self.progress.interactive:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(desc=self.label, total=self.scales, unit="scale", file=self.progress.stream,
                                leave=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _TickingRunner(ScaleRunner):
    """Delegates to ``inner`` and ticks the progress bar once per scale."""

    def __init__(self, inner: ScaleRunner, progress: _RunProgress):
        self._inner, self._progress = inner, progress

    def __enter__(self) -> "_TickingRunner":
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        return self._inner.__exit__(*exc)

    def scale(self, index: int, inputs: dict) -> dict:
        self._progress.tick()
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


def _run_token(world: int) -> str:
    """The run's id in its temporary file names: rank 0's, sent to every rank, so rank 0 can find all files."""
    token = [uuid.uuid4().hex[:12]]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(token, src=0)
    return token[0]


class _Staging:
    """This process's files of the run, under hidden temporary names in ``out`` until rank 0 publishes the run
    (:func:`_publish`); an interrupted or failed run removes them, so the folder keeps the earlier run as it was."""

    def __init__(self, out: Path, token: str):
        self.out, self.token, self.names = out, token, []

    def path(self, name: str) -> Path:
        return temporary_name(self.out / name, self.token)

    def png(self, image: torch.Tensor, name: str) -> None:
        self.names.append(name)
        write_png(image, self.path(name))

    def discard(self) -> None:
        for name in self.names:
            self.path(name).unlink(missing_ok=True)


def _earlier_run_files(out: Path, report: Optional[Path], overwrite: bool) -> list[str]:
    """The files an earlier run's manifest in ``out`` lists (removed once the new run succeeded). A folder that
    holds anything is refused without ``overwrite``; a ``manifest.json`` that is not a generate manifest, and a
    report that would be the manifest, are refused."""
    if report is not None and report.resolve() == (out / MANIFEST).resolve():
        raise ConfigError(f"--report {report}: that is the run's manifest; give the report another name")
    entries = sorted(path.name for path in out.iterdir())
    if entries and not overwrite:
        held = f"an earlier run ({MANIFEST})" if MANIFEST in entries else f"{len(entries)} file(s) ({entries[0]}, ...)"
        raise ConfigError(f"--out {out} already holds {held}: give --overwrite to replace the files an earlier run's "
                          f"{MANIFEST} lists (nothing else is removed), or an empty or new folder")
    manifest = out / MANIFEST
    if not manifest.exists():
        return []
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        names = data["files"] if "files" in data else [
            record[key] for record in data["images"] for key in _FILE_KEYS if key in record]  # before "files"
        if "adapter" not in data or not isinstance(names, list):
            raise TypeError("not a generate manifest")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--out {out}: its {MANIFEST} is not a graphsurgeon generate manifest ({type(err).__name__}); "
                          "give an empty or new folder") from None
    return [name for name in names if isinstance(name, str) and Path(name).name == name
            and name not in ("", ".", "..", MANIFEST)]


def run_generate(job: GenerateJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job`` (see the module docstring); returns the manifest (rank 0's merged one; other ranks get it
    without the image records)."""
    plan = check_job(job)
    rank, world, device = _world(job.sources.device)
    with terminate_as_interrupt():
        manifest, problem = _run(job, plan, rank, world, device, log)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if problem:
        raise ConfigError(problem)
    return manifest


def _run(job: GenerateJob, plan: _Plan, rank: int, world: int, device: str, log: Callable[[str], None]
         ) -> tuple[dict[str, Any], Optional[str]]:
    """This process's images, staged; on rank 0 then the run published. Returns the manifest and, on rank 0, why
    the report could not be written (None when it was, or none was asked for)."""
    from .api import optimize

    sources = job.sources.model_copy(update={"device": device})
    pipeline = plan.adapter.image_pipeline(sources)
    context = plan.adapter.precision(pipeline.model, plan.dtype)
    fast = optimize(pipeline.model, adapter=plan.adapter, passes=job.passes, config=job.pass_config or None)
    fast.decoder = pipeline.preview_decoder()  # passes that look at pictures mid-generation see the real decoder
    if rank == 0:
        for note in pipeline.notes:
            log(f"note: {note}")
    staging = _Staging(plan.out, _run_token(world))
    seeds = image_seeds(job.seed, len(job.conditions))
    mine = [i for i in range(len(job.conditions)) if i % world == rank]
    progress = _Progress(len(mine), rank)
    records, sampling, report = [], {}, None
    try:
        for position, i in enumerate(mine, 1):
            kwargs = pipeline.sampler_args(job.conditions[i], seeds[i], job.settings)
            sampling = sampling or {key: kwargs.get(key) for key in _SAMPLING_KEYS}
            record, image = _one_image(job, plan, pipeline, fast, context, i, seeds[i], kwargs, progress, position,
                                       staging)
            records.append(record)
        if plan.report is not None and rank == 0:
            from .report import DiffReport, build_report

            last = mine[-1]
            report = DiffReport(build_report(fast, fast.last_flops, images=image[None],
                                             labels=[f'image {last}: "{job.conditions[last]}"']))
        everything = sorted(_gather(records, world), key=lambda r: r["index"])
        manifest = _manifest(job, pipeline, world, device, sampling, everything)
        if rank != 0:
            return manifest, None
        problem = _publish(plan, staging.token, manifest, report)
    except BaseException:  # an interrupt (SIGINT, SIGTERM) or a failure: the earlier run stays as it was
        staging.discard()
        raise
    if report is not None and problem is None:
        log(f"graph diff report (image {mine[-1]}): {plan.report}")
    log(f"wrote {len(everything)} image(s) and {MANIFEST} to {plan.out}")
    return manifest, problem


def _publish(plan: _Plan, token: str, manifest: dict[str, Any], report: Any) -> Optional[str]:
    """Rank 0, once every image is made: the earlier manifest goes first (it must never claim a file already
    replaced), the staged files are renamed to their names, the report is written, the earlier run's other files
    are removed, and the manifest comes last, listing exactly this run's files (``manifest["files"]``). Returns
    why the report could not be written (the images and the manifest stand without it), else None."""
    out = plan.out
    names = [record[key] for record in manifest["images"] for key in _FILE_KEYS if key in record]
    (out / MANIFEST).unlink(missing_ok=True)
    for name in names:
        os.replace(temporary_name(out / name, token), out / name)
    problem = None
    if report is not None:
        try:
            report.write(plan.report)
        except OSError as err:
            problem = (f"--report {plan.report}: not written ({err.strerror or err}); the images and {MANIFEST} "
                       f"are in {out}")
        else:
            if plan.report.parent.resolve() == out.resolve():
                names.append(plan.report.name)
    for name in sorted(set(plan.earlier) - set(names)):
        if (out / name).is_file():
            (out / name).unlink()
    manifest["files"] = sorted(names)
    write_json_atomic(out / MANIFEST, manifest)
    return problem


def _one_image(job: GenerateJob, plan: _Plan, pipeline: ImagePipeline, fast: Any, context: Callable, index: int,
               seed: int, kwargs: dict[str, Any], progress: _Progress, position: int, staging: _Staging
               ) -> tuple[dict[str, Any], torch.Tensor]:
    """Generate image ``index`` (optimized; with ``compare`` also the baseline) and stage its files; returns its
    manifest record and the optimized image. The graphs are captured (when new) before the clock starts, so
    ``seconds`` is the generation alone and ``capture_seconds`` the one-time capture."""
    condition = job.conditions[index]
    label = f"image {index} ({position}/{progress.count})"
    start = time.perf_counter()
    with context():  # capture too: the graphs are traced under the precision they run in
        scales = len(fast.capture(**kwargs).scales)
    capture_seconds = time.perf_counter() - start
    bar = progress.run(f"{label} optimized", scales)
    fast.runner_wrappers = [bar.wrap]
    start = time.perf_counter()
    try:
        with context():  # decoding too: the official inference decodes in the model's precision (bf16 autocast on GPU)
            output = fast.generate(**kwargs)
            image = pipeline.images(output)[0]
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"index": index, "condition": condition, "seed": seed, "file": f"{index:04d}.png",
                              "seconds": seconds, "capture_seconds": capture_seconds, "size": list(image.shape[:2]),
                              "stats": _summary(output)}
    staging.png(image, record["file"])
    message = f"{label}: {record['file']} ({seconds:.2f} s, capture {capture_seconds:.2f} s)"
    if job.compare:
        args = plan.adapter.validate(pipeline.model, **kwargs)
        bar = progress.run(f"{label} baseline", scales)
        start = time.perf_counter()
        try:
            with context():
                baseline = plan.adapter.sample(pipeline.model, args, bar.wrap(plan.adapter.baseline_runner(pipeline.model, args)))
                reference = pipeline.images(baseline)[0]
        finally:
            bar.close()
        record.update(baseline_file=f"{index:04d}_baseline.png", compare_file=f"{index:04d}_compare.png",
                      baseline_seconds=time.perf_counter() - start, **_distance(reference, image))
        staging.png(reference, record["baseline_file"])
        optimized = f"optimized: {', '.join(job.passes)}" if job.passes else "optimized (no passes)"
        staging.png(side_by_side(reference, image, captions=("baseline (unaccelerated)", optimized)), record["compare_file"])
        message += (f", baseline {record['baseline_seconds']:.2f} s, PSNR {record['psnr_db'] if record['psnr_db'] is not None else 'inf'}"
                    f" dB, SSIM {record['ssim']:.4f}")
    progress.done(message)
    return record, image


def _distance(reference: torch.Tensor, image: torch.Tensor) -> dict[str, Any]:
    value = psnr(reference, image)
    return {"psnr_db": None if value == float("inf") else round(value, 3), "identical": value == float("inf"),
            "ssim": round(ssim(reference, image), 5)}


def _summary(output: Any) -> Optional[list[dict]]:
    """Per-scale stats of the passes (the summary: tokens computed, rows run, work vs the baseline)."""
    return (output.stats or {}).get("summary")


def _manifest(job: GenerateJob, pipeline: ImagePipeline, world: int, device: str, sampling: dict[str, Any],
              records: list[dict]) -> dict[str, Any]:
    """The run's record; ``settings`` holds the sampling values used (the family's defaults where the user gave
    none; null where the family has no such setting, e.g. no temperature)."""
    settings = {**json.loads(job.settings.model_dump_json()), **sampling}
    return {"kind": MANIFEST_KIND, "adapter": job.adapter, "sources": json.loads(job.sources.model_dump_json()),
            "settings": settings, "seed": job.seed, "passes": job.passes, "pass_config": job.pass_config,
            "dtype": job.dtype, "compare": job.compare, "processes": world, "device": device,
            "threads": torch.get_num_threads(), "notes": pipeline.notes,
            "capture_seconds": sum(record["capture_seconds"] for record in records), "images": records,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}
