"""Benchmarks: measured speed-up of the optimized model against the baseline sampler, the ideal and the paper.

``graphsurgeon bench`` / ``benchmarks/run.py`` parse a :class:`BenchSpec`, run it (:func:`run_benchmark`) and
write ``<out>.json`` and ``<out>.md``. The JSON schema is documented in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters import get_adapter
from ..cli_checks import check_file_target
from ..errors import ConfigError
from ..jsonio import write_json_atomic
from .runner import SCHEMA_VERSION, check_benchmark, run_benchmark
from .spec import BenchSpec, make_spec
from .tables import markdown

__all__ = ["BenchSpec", "SCHEMA_VERSION", "make_spec", "markdown", "run_and_write", "run_benchmark"]


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """The spec of a ``graphsurgeon bench`` command line (see :func:`graphsurgeon.cli.main` for the options)."""
    config = args.config
    if config is None and args.checkpoint is None:  # with a checkpoint the adapter asks for the layout by name
        config = get_adapter(args.adapter).default_config
    return make_spec(adapter=args.adapter, config=config, checkpoint=args.checkpoint, vae=args.vae,
                     text_encoder=args.text_encoder, h_div_w=args.h_div_w, pn=args.pn, batch=args.batch_size,
                     dtype=args.dtype, device=args.device, pass_sets=tuple(args.pass_sets.split(",")),
                     pass_config=args.pass_config, operating_point=args.operating_point,
                     keep_fraction=args.keep_fraction, stop_scale=args.stop_scale, warmup=args.warmup,
                     repeats=args.repeats, seed=args.seed, flops=not args.no_flops,
                     inserted_timing=not args.no_inserted_timing)


def run_and_write(args: argparse.Namespace) -> dict:
    """Validate the settings and the output paths, then run: a bad value or path fails before any timing, and the
    table is printed before the files are written, so a write failing after the checks (disk full) still leaves
    the figures on screen."""
    spec = spec_from_args(args)
    out = Path(args.out)
    if out.suffix in (".json", ".md") or out.name in ("", "..", "."):
        raise ConfigError(f"--out {args.out!r}: give a stem such as out/bench; <out>.json and <out>.md are written")
    checked = check_benchmark(spec)
    json_path, md_path = (check_file_target(out.with_suffix(suffix)) for suffix in (".json", ".md"))
    result = run_benchmark(spec, checked=checked)
    table = markdown(result)
    print(table)
    write_json_atomic(json_path, result)
    md_path.write_text(table)
    print(f"wrote {json_path} and {md_path}")
    return result

