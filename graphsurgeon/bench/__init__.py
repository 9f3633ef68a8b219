"""Benchmarks: measured speed-up of the optimized model against the baseline sampler, the ideal and the paper.

``graphsurgeon bench`` / ``benchmarks/run.py`` parse a :class:`BenchSpec`, run it (:func:`run_benchmark`) and
write ``<out>.json`` and ``<out>.md``. The JSON schema is documented in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_checks import check_file_target
from ..errors import ConfigError
from .runner import SCHEMA_VERSION, run_benchmark
from .spec import DEFAULT_PASS_SETS, BenchSpec, make_spec
from .tables import markdown

__all__ = ["BenchSpec", "SCHEMA_VERSION", "add_arguments", "make_spec", "markdown", "run_and_write", "run_benchmark"]


def _scale_fractions(text: str) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scale:fraction pairs like 10:0.5,11:0.5, got {text!r}") from None


def json_object(text: str) -> dict:
    """argparse type: a JSON object (pass settings by pass name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like {{"lhep": {{"rho": 0.5}}}}, got {text!r}')
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="infinity")
    parser.add_argument("--config", default="infinity-tiny", help="named model config (random weights)")
    parser.add_argument("--h-div-w", type=float, default=1.0)
    parser.add_argument("--pn", default="1M", help="pixel preset of the schedule (1M = 1024x1024 at 1:1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pass-sets", default=",".join(DEFAULT_PASS_SETS),
                        help="comma-separated: 'none' or pass names joined by '+'")
    parser.add_argument("--pass-config", type=json_object, default={},
                        help='adaptive settings as JSON, e.g. \'{"lhep": {"rho": 0.5}}\' (passes in --pass-sets only)')
    parser.add_argument("--operating-point", help="fixed operating point named by the adapter (its operating_points)")
    parser.add_argument("--keep-fraction", type=_scale_fractions, help="fixed kept fraction per LHEP scale, 10:0.5,...")
    parser.add_argument("--stop-scale", type=int, help="fixed SATS stop scale for every sample")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting runs")
    parser.add_argument("--no-inserted-timing", action="store_true", help="skip the instrumented runs")
    parser.add_argument("--out", default="out/bench", help="writes <out>.json and <out>.md")


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    return make_spec(adapter=args.adapter, config=args.config, h_div_w=args.h_div_w, pn=args.pn, batch=args.batch,
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
    json_path, md_path = (check_file_target(out.with_suffix(suffix)) for suffix in (".json", ".md"))
    result = run_benchmark(spec)
    table = markdown(result)
    print(table)
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(table)
    print(f"wrote {json_path} and {md_path}")
    return result

