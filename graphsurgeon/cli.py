"""Command line: ``graphsurgeon check`` (what capture finds), ``export``, ``diff`` (what the passes changed) and
``bench`` (measured speed-up).

Every user error (bad option, path, config or pass) exits with status 2 and one line on stderr, before any work
starts where it can be known then; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

from . import __version__
from .adapters import available_adapters, get_adapter
from .capture import capture
from .cli_checks import MAX_BATCH, check_dir_target, check_file_target
from .errors import ConfigError, GraphsurgeonError
from .bench.spec import DEFAULT_PASS_SETS
from .images import SamplingSettings
from .jsonio import to_strict_json

REPORT_SUFFIXES = (".html", ".md", ".json")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other user error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, text: str) -> int:
    """argparse type: an integer >= ``minimum`` (a count of runs, of warm-up runs, a batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    return _int_at_least(0, text)


def _batch_size(text: str) -> int:
    """argparse type: a batch of 1 .. MAX_BATCH prompts."""
    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_BATCH} (graphsurgeon's bound on a batch), got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (an aspect ratio, a temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _finite_float(text: str) -> float:
    """argparse type: a finite number (a guidance scale: NaN and inf would reach the sampler)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def json_object(text: str) -> dict:
    """argparse type: a JSON object (pass settings by pass name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like {{"lhep": {{"rho": 0.5}}}}, got {text!r}')
    return value


def _scale_fractions(text: str) -> dict[int, float]:
    """argparse type: scale:fraction pairs (a fixed LHEP operating point)."""
    try:
        return {int(k): float(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scale:fraction pairs like 10:0.5,11:0.5, got {text!r}") from None


class _Lists:
    """What the help lists, read from the registries (each pass module, each adapter's ``pixel_presets``)."""

    def __init__(self) -> None:
        from .passes import available_passes

        self.passes = ", ".join(available_passes())
        presets = []
        for name in available_adapters():
            try:
                adapter = get_adapter(name)
            except GraphsurgeonError:  # an adapter that cannot load says why when it is used, not in the help
                continue
            presets.append(f"{name}: {', '.join(adapter.pixel_presets)}" if adapter.pixel_presets
                           else f"{name}: one schedule per model, --pn does not apply")
        self.presets = "; ".join(presets)


def _hidden_alias(parser: argparse.ArgumentParser, alias: str, dest: str, **kwargs: Any) -> None:
    """An older spelling of an option, still accepted, not shown in the help."""
    parser.add_argument(alias, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def _adapter_options(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--adapter", default="infinity", help="the model family: an adapter name (a package under "
                        f"model_adapters or an entry point: {', '.join(available_adapters())}) or "
                        "package.module:ClassName (default: %(default)s)")
    parser.add_argument("--config", help=config_help)


def _file_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="the transformer's weights: .safetensors, a torch.save zip "
                                                        "file or a folder of shards with one *.index.json (never "
                                                        "unpickled); needs --config naming its layout")
    parser.add_argument("--vae", type=Path, help="the decoder's weights (default: a seeded random decoder)")
    parser.add_argument("--text-encoder", type=Path, help="a local folder of the text encoder, safetensors weights "
                                                          "(default: a seeded random stand-in)")


def _batch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_batch_size, default=1,
                        help=f"prompts per generation, 1..{MAX_BATCH} (default: 1)")
    _hidden_alias(parser, "--batch", "batch_size", type=_batch_size)


def _schedule_options(parser: argparse.ArgumentParser, lists: _Lists) -> None:
    parser.add_argument("--h-div-w", type=_positive_float, default=1.0,
                        help="aspect ratio height/width, snapped to the family's nearest (default: 1.0)")
    parser.add_argument("--pn", default="1M", help=f"pixel preset of the schedule ({lists.presets}; default: 1M)")


def _run_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16 where the adapter runs it on "
                                                           "that device (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def _pass_config_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--pass-config", type=json_object, default=default,
                        help='pass settings as JSON by pass name, for every pass set using the pass, e.g. '
                             '\'{"lhep": {"rho": 0.5}}\' (keys: docs/passes.md)')
    _hidden_alias(parser, "--method-config", "pass_config", type=json_object)


def _common(parser: argparse.ArgumentParser, lists: _Lists) -> None:
    _adapter_options(parser, "the adapter's named model config (default: the adapter's default_config)")
    _batch_option(parser)
    _schedule_options(parser, lists)


def _prepare(args: argparse.Namespace, device: str, seed: Optional[int] = None) -> tuple[Any, Any, dict[str, Any]]:
    """The adapter, the model and its capture arguments (schedule and placeholder text)."""
    adapter = get_adapter(args.adapter)
    if args.config is None:
        if adapter.default_config is None:
            raise ConfigError(f"adapter {args.adapter!r} names no default config: give --config")
        args.config = adapter.default_config
    adapter.check_settings(SamplingSettings(h_div_w=args.h_div_w, pn=args.pn))
    model = adapter.build_model(args.config, device=device, seed=seed)
    return adapter, model, adapter.capture_args(model, batch_size=args.batch_size, h_div_w=args.h_div_w, pn=args.pn)


def check(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    adapter, model, capture_args = _prepare(args, device="meta")
    captured = capture(adapter.capture_plan(model, adapter.validate(model, **capture_args)))
    if args.json:
        print(to_strict_json(captured.report.to_dict()))
    else:
        print(f"graphsurgeon check: adapter {args.adapter}, config {args.config} (meta device, no weights), "
              f"batch {args.batch_size}, {time.perf_counter() - start:.2f} s")
        print(captured.report.to_text())
    return 0


def export(args: argparse.Namespace) -> int:
    from .passes import resolve_passes

    passes = [p for p in args.passes.split(",") if p]
    resolve_passes(passes)  # unknown or repeated pass names fail before the model is built
    adapter, meta_model, shapes = _prepare(args, device="meta")  # structure only: config and schedule, no weights
    scales = len(adapter.capture_plan(meta_model, adapter.validate(meta_model, **shapes)).scales)  # a plan, no capture
    if not -scales <= args.onnx_scale < scales:
        raise ConfigError(f"--onnx-scale {args.onnx_scale}: the schedule ({args.pn}) has {scales} scales; give "
                          f"0..{scales - 1}, or -{scales}..-1 counting from the last")
    from .api import optimize
    from .export import export_captured, prepare_export_directory  # onnx is slow to import: arguments checked first

    check_dir_target(args.out)  # created last: a refused command line leaves no folder behind
    out = prepare_export_directory(args.out)  # a folder holding another kind of run is refused before the model loads

    adapter, model, capture_args = _prepare(args, device="cpu", seed=0)
    fast = optimize(model, adapter=adapter, passes=passes)
    manifest = export_captured(fast.capture(**capture_args), out, onnx_scale=args.onnx_scale)
    onnx_entry = manifest.get("onnx", {})
    print(f"wrote {len(manifest['graphs'])} graphs (.py, .dot, .svg) and {onnx_entry.get('file', 'no ONNX')} to {out}"
          + (f" (passes: {', '.join(passes)})" if passes else ""))
    for run in onnx_entry.get("onnxruntime", []):
        where = f"example variant {run['variant']}" if "variant" in run else f"{run['tokens']} tokens"
        print(f"  onnxruntime vs PyTorch at {where}: max abs err {run['max_abs_err']:.2e}, "
              f"rel L2 {run['max_rel_l2']:.2e}")
    return 0


def diff(args: argparse.Namespace) -> int:
    from .api import optimize
    from .flops import measure_flops
    from .passes import resolve_passes

    out = check_file_target(args.out, suffixes=REPORT_SUFFIXES)
    passes = [p for p in args.passes.split(",") if p]
    resolve_passes(passes)  # unknown or repeated pass names fail before the model is built
    adapter, model, _ = _prepare(args, device="cpu", seed=0)
    fast = optimize(model, adapter=adapter, passes=passes)
    # the adapter's seeded benchmark inputs: the CLI needs to know nothing of a model's inputs
    generate_kwargs = adapter.benchmark_args(model, batch_size=args.batch_size, h_div_w=args.h_div_w, pn=args.pn,
                                             seed=1234)
    if args.flops:
        measure_flops(fast, **generate_kwargs)
    else:
        fast.generate(**generate_kwargs)
    path = fast.report.write(out)
    print(f"graphsurgeon diff: {args.config} (random weights and conditions), passes {args.passes}: report written to {path}")
    return 0


def generate(args: argparse.Namespace) -> int:
    from .generate import make_job, read_prompts, run_generate
    from .images import ImageSources, SamplingSettings

    conditions = list(args.prompt or [])
    if args.prompts:
        conditions += read_prompts(Path(args.prompts))
    passes = [p for p in args.passes.split(",") if p]
    job = make_job(adapter=args.adapter, conditions=conditions, seed=args.seed, passes=passes,
                   pass_config=args.pass_config or {}, dtype=args.dtype, out=args.out, compare=args.compare,
                   report=args.report, overwrite=args.overwrite,
                   sources=ImageSources(config=args.config, checkpoint=args.checkpoint, vae=args.vae,
                                        text_encoder=args.text_encoder, device=args.device, seed=args.seed),
                   settings=SamplingSettings(h_div_w=args.h_div_w, pn=args.pn, cfg=args.cfg, tau=args.tau))
    run_generate(job)
    return 0


def compare(args: argparse.Namespace) -> int:
    from .compare import run_and_write

    run_and_write(args)
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import run_and_write

    run_and_write(args)
    return 0


def _parser() -> argparse.ArgumentParser:
    lists = _Lists()
    parser = _Parser(prog="graphsurgeon", description="Model surgery for next-scale-prediction models")
    parser.add_argument("--version", action="version", version=f"graphsurgeon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="capture a model and print what the tracer found")
    _common(check_parser, lists)
    check_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    check_parser.set_defaults(run=check)
    export_parser = commands.add_parser("export", help="write readable code, drawings and ONNX of the captured graphs")
    _common(export_parser, lists)
    export_parser.add_argument("--out", required=True, help="output folder (created; an existing file is refused)")
    export_parser.add_argument("--passes", default="", help="comma-separated passes to apply first: exports the "
                                                            f"optimized graphs (passes: {lists.passes})")
    export_parser.add_argument("--onnx-scale", type=int, default=-1,
                               help="scale exported to ONNX: 0..N-1, or negative counting from the last (default: -1)")
    export_parser.set_defaults(run=export)
    diff_parser = commands.add_parser("diff", help="run the passes and write the graph diff report (.html/.md/.json)")
    _common(diff_parser, lists)
    diff_parser.add_argument("--passes", default="lhep,sats",
                             help=f"comma-separated pass names (passes: {lists.passes}; default: lhep,sats)")
    diff_parser.add_argument("--out", required=True, help="report file: .html, .md or .json")
    diff_parser.add_argument("--flops", action="store_true", help="also measure FLOPs (runs the baseline too)")
    diff_parser.set_defaults(run=diff)
    generate_parser = commands.add_parser("generate", help="conditions in, PNGs and a manifest out (optimized; "
                                                           "--compare: the unaccelerated model beside it)")
    _generate_arguments(generate_parser, lists)
    generate_parser.set_defaults(run=generate)
    bench_parser = commands.add_parser("bench", help="time the baseline and the optimized model per pass set; "
                                                     "writes JSON and Markdown")
    _bench_arguments(bench_parser, lists)
    bench_parser.set_defaults(run=bench)
    compare_parser = commands.add_parser("compare", help="several methods on one model and the same inputs: latency, "
                                                         "FLOPs, tokens, fidelity to the unaccelerated model")
    _compare_arguments(compare_parser, lists)
    compare_parser.set_defaults(run=compare)
    return parser


def _generate_arguments(parser: argparse.ArgumentParser, lists: _Lists) -> None:
    _adapter_options(parser, "named model config (with --checkpoint: its layout; default: the adapter's "
                             "default_config, random weights)")
    _file_options(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable, not empty); for class-conditional "
                                                          "models a class label")
    parser.add_argument("--prompts", help="a UTF-8 file with one prompt per line (blank lines are skipped)")
    _schedule_options(parser, lists)
    parser.add_argument("--cfg", type=_finite_float, help="guidance scale (default: the family's)")
    parser.add_argument("--tau", type=_positive_float, help="sampling temperature (default: the family's)")
    parser.add_argument("--passes", default="", help=f"comma-separated passes (passes: {lists.passes}; default: none)")
    _pass_config_option(parser, None)
    _run_options(parser, "image i uses seed + i; every seed must lie in [-2**63, 2**64) (default: 0)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="--out may hold files: an earlier run's (those its "
                                                                 "manifest.json lists) are replaced once this run succeeded")
    parser.add_argument("--compare", action="store_true", help="also run the unaccelerated model with the same "
                                                               "seeds: side-by-side pictures, PSNR and SSIM")
    parser.add_argument("--report", help="also write the graph diff report (.html/.md/.json) of the last image, "
                                         "with its keep masks drawn over it")


def _measure_options(parser: argparse.ArgumentParser, lists: _Lists) -> None:
    """What ``bench`` and ``compare`` share: the model (random weights, or the user's files), the schedule, the
    batch, where to run, and how often."""
    _adapter_options(parser, "named model config (random weights without --checkpoint, its layout with one; "
                             "default: the adapter's default_config)")
    _file_options(parser)
    _schedule_options(parser, lists)
    _batch_option(parser)
    _run_options(parser, "seed of the benchmark inputs and of random weights (default: 0)")
    _pass_config_option(parser, {})
    parser.add_argument("--warmup", type=_non_negative_int, default=1, help="untimed runs per variant (default: 1)")
    parser.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per variant (default: 3)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting runs")


def _bench_arguments(parser: argparse.ArgumentParser, lists: _Lists) -> None:
    _measure_options(parser, lists)
    parser.add_argument("--pass-sets", default=",".join(DEFAULT_PASS_SETS),
                        help=f"comma-separated: 'none' or pass names joined by '+', each pass once per set (passes: "
                             f"{lists.passes}; default: {','.join(DEFAULT_PASS_SETS)})")
    parser.add_argument("--operating-point", help="fixed operating point named by the adapter (its operating_points)")
    parser.add_argument("--keep-fraction", type=_scale_fractions, help="fixed kept fraction per LHEP scale, 10:0.5,...")
    parser.add_argument("--stop-scale", type=int, help="fixed SATS stop scale for every sample")
    parser.add_argument("--no-inserted-timing", action="store_true", help="skip the instrumented runs")
    parser.add_argument("--out", default="out/bench", help="writes <out>.json and <out>.md (default: out/bench)")


def _compare_arguments(parser: argparse.ArgumentParser, lists: _Lists) -> None:
    _measure_options(parser, lists)
    parser.add_argument("--methods", default="lhep+sats", help="comma-separated methods: pass names joined by '+', "
                                                               f"each pass once (passes: {lists.passes}; default: "
                                                               "lhep+sats)")
    parser.add_argument("--images", action="store_true", help="also decode both runs (the adapter's decoder, random "
                                                              "without --vae) and report image PSNR/SSIM")
    parser.add_argument("--out", default="out/compare", help="writes <out>.json and <out>.md (and <out>.html with "
                                                             "the images side by side, with --images)")


def _fail(message: str) -> int:
    """Print a user error as the one line a shell user reads (multi-line messages are joined) and return 2."""
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"graphsurgeon: error: {one_line}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; returns the exit status (2 for any user error, argparse's included)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed on one line
        return int(done.code or 0)
    try:
        return args.run(args)
    except GraphsurgeonError as err:
        return _fail(str(err))
    except OSError as err:  # the machine's answer to a path or a write (disk full, permissions): not a bug here
        return _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    except KeyboardInterrupt:  # Ctrl-C: the command has already removed what it had half written
        print("graphsurgeon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
