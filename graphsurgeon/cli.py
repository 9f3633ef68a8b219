"""Command line: ``graphsurgeon check`` (what capture finds), ``export``, ``diff`` (what the passes changed) and
``bench`` (measured speed-up).

Every user error (bad option, path, config or pass) exits with status 2 and one line on stderr, before any work
starts where it can be known then; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

from .adapters import get_adapter
from .capture import capture
from .cli_checks import check_dir_target, check_file_target
from .errors import ConfigError, GraphsurgeonError

REPORT_SUFFIXES = (".html", ".md", ".json")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other user error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of prompts, runs, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (an aspect ratio)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="infinity",
                        help="adapter name (a package under model_adapters, an entry point) or package.module:Class")
    parser.add_argument("--config", help="the adapter's named model config (default: the adapter's default_config)")
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--h-div-w", type=_positive_float, default=1.0, help="aspect ratio height/width")
    parser.add_argument("--pn", default="1M", help="pixel preset of the schedule (e.g. 0.25M, 1M)")


def _prepare(args: argparse.Namespace, device: str, seed: Optional[int] = None) -> tuple[Any, Any, dict[str, Any]]:
    """The adapter, the model and its capture arguments (schedule and placeholder text)."""
    adapter = get_adapter(args.adapter)
    if args.config is None:
        if adapter.default_config is None:
            raise ConfigError(f"adapter {args.adapter!r} names no default config: give --config")
        args.config = adapter.default_config
    model = adapter.build_model(args.config, device=device, seed=seed)
    return adapter, model, adapter.capture_args(model, batch_size=args.batch_size, h_div_w=args.h_div_w, pn=args.pn)


def check(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    adapter, model, capture_args = _prepare(args, device="meta")
    captured = capture(adapter.capture_plan(model, adapter.validate(model, **capture_args)))
    if args.json:
        print(json.dumps(captured.report.to_dict(), indent=2, default=str))
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
    out = check_dir_target(args.out)  # created last: a refused command line leaves no folder behind
    from .api import optimize
    from .export import export_captured  # onnx is slow to import: only once the arguments are known to be good

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
                   report=args.report,
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
    parser = _Parser(prog="graphsurgeon", description="Model surgery for next-scale-prediction models")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="capture a model and print what the tracer found")
    _common(check_parser)
    check_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    check_parser.set_defaults(run=check)
    export_parser = commands.add_parser("export", help="write readable code, drawings and ONNX of the captured graphs")
    _common(export_parser)
    export_parser.add_argument("--out", required=True, help="output folder (created; an existing file is refused)")
    export_parser.add_argument("--passes", default="", help="comma-separated passes to apply first (e.g. lhep,sats): "
                                                            "exports the optimized graphs")
    export_parser.add_argument("--onnx-scale", type=int, default=-1,
                               help="scale exported to ONNX: 0..N-1, or negative counting from the last (default: -1)")
    export_parser.set_defaults(run=export)
    diff_parser = commands.add_parser("diff", help="run the passes and write the graph diff report (.html/.md/.json)")
    _common(diff_parser)
    diff_parser.add_argument("--passes", default="lhep,sats", help="comma-separated pass names")
    diff_parser.add_argument("--out", required=True, help="report file: .html, .md or .json")
    diff_parser.add_argument("--flops", action="store_true", help="also measure FLOPs (runs the baseline too)")
    diff_parser.set_defaults(run=diff)
    generate_parser = commands.add_parser("generate", help="conditions in, PNGs and a manifest out (optimized; "
                                                           "--compare: the unaccelerated model beside it)")
    _generate_arguments(generate_parser)
    generate_parser.set_defaults(run=generate)
    from .bench import add_arguments

    bench_parser = commands.add_parser("bench", help="time the baseline and the optimized model per pass set; "
                                                     "writes JSON and Markdown")
    add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench)
    from .compare import add_arguments as compare_arguments

    compare_parser = commands.add_parser("compare", help="several methods on one model and the same inputs: latency, "
                                                         "FLOPs, tokens, fidelity to the unaccelerated model")
    compare_arguments(compare_parser)
    compare_parser.set_defaults(run=compare)
    return parser


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import json_object

    parser.add_argument("--adapter", default="infinity",
                        help="adapter name (a package under model_adapters, an entry point) or package.module:Class")
    parser.add_argument("--config", help="named model config (with --checkpoint: its layout; default: the "
                                         "adapter's default_config, random weights)")
    parser.add_argument("--checkpoint", type=Path, help="the transformer's weights (never unpickled)")
    parser.add_argument("--vae", type=Path, help="the decoder's weights (default: a seeded random decoder)")
    parser.add_argument("--text-encoder", type=Path, help="local folder of the text encoder; "
                                                          "default: a seeded random stand-in")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); for class-conditional models "
                                                          "a class label")
    parser.add_argument("--prompts", help="a UTF-8 file with one prompt per line")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--h-div-w", type=_positive_float, default=1.0, help="aspect ratio height/width")
    parser.add_argument("--pn", default="1M", help="pixel preset of the schedule (e.g. 0.25M, 1M)")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the family's)")
    parser.add_argument("--tau", type=_positive_float, help="sampling temperature (default: the family's)")
    parser.add_argument("--passes", default="", help="comma-separated passes, e.g. lhep,sats (default: none)")
    parser.add_argument("--pass-config", type=json_object, help='pass settings as JSON, e.g. \'{"lhep": {"rho": 0.5}}\'')
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16 on CUDA")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--compare", action="store_true", help="also run the unaccelerated model with the same "
                                                               "seeds: side-by-side pictures, PSNR and SSIM")
    parser.add_argument("--report", help="also write the graph diff report (.html/.md/.json) of the last image, "
                                         "with its keep masks drawn over it")


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


if __name__ == "__main__":
    sys.exit(main())
