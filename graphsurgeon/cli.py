"""Command line: ``graphsurgeon check`` (what capture finds), ``export``, ``diff`` (what the passes changed) and
``bench`` (measured speed-up)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .adapters import get_adapter
from .capture import capture
from .errors import GraphsurgeonError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="infinity", help="adapter name (a package under model_adapters)")
    parser.add_argument("--config", default="infinity-tiny", help="the adapter's named model config")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--h-div-w", type=float, default=1.0, help="aspect ratio height/width")
    parser.add_argument("--pn", default="1M", help="pixel preset of the schedule (e.g. 0.25M, 1M)")


def _capture(args, device: str, seed=None):
    adapter = get_adapter(args.adapter)
    model = adapter.build_model(args.config, device=device, seed=seed)
    plan = adapter.capture_plan(model, **adapter.capture_args(model, batch_size=args.batch_size, h_div_w=args.h_div_w,
                                                              pn=args.pn))
    return capture(plan)


def check(args) -> int:
    start = time.perf_counter()
    captured = _capture(args, device="meta")
    if args.json:
        print(json.dumps(captured.report.to_dict(), indent=2, default=str))
    else:
        print(f"graphsurgeon check: adapter {args.adapter}, config {args.config} (meta device, no weights), "
              f"batch {args.batch_size}, {time.perf_counter() - start:.2f} s")
        print(captured.report.to_text())
    return 0


def export(args) -> int:
    from .export import export_captured

    captured = _capture(args, device="cpu", seed=0)
    manifest = export_captured(captured, args.out, onnx_scale=args.onnx_scale)
    onnx_entry = manifest.get("onnx", {})
    print(f"wrote {len(manifest['graphs'])} graphs (.py, .dot, .svg) and {onnx_entry.get('file', 'no ONNX')} to {args.out}")
    for run in onnx_entry.get("onnxruntime", []):
        print(f"  onnxruntime vs PyTorch at {run['tokens']} tokens: max abs err {run['max_abs_err']:.2e}, "
              f"rel L2 {run['max_rel_l2']:.2e}")
    return 0


def diff(args) -> int:
    import torch

    from .api import optimize
    from .flops import measure_flops

    adapter = get_adapter(args.adapter)
    model = adapter.build_model(args.config, device="cpu", seed=0)
    capture_args = adapter.capture_args(model, batch_size=args.batch_size, h_div_w=args.h_div_w, pn=args.pn)
    kv, lens, cu, max_len = capture_args["text"]
    text = (torch.randn(kv.shape, generator=torch.Generator().manual_seed(1)), lens, cu, max_len)
    fast = optimize(model, adapter=adapter, passes=[p for p in args.passes.split(",") if p])
    generate_kwargs = dict(text=text, scale_schedule=capture_args["scale_schedule"], cfg=3.0, tau=0.5, top_k=900,
                           top_p=0.97, seed=1234)
    if args.flops:
        measure_flops(fast, **generate_kwargs)
    else:
        fast.generate(**generate_kwargs)
    path = fast.report.write(args.out)
    print(f"graphsurgeon diff: {args.config} (random weights and text), passes {args.passes}: report written to {path}")
    return 0


def bench(args) -> int:
    from .bench import run_and_write

    run_and_write(args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="graphsurgeon", description="Model surgery for next-scale-prediction models")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="capture a model and print what the tracer found")
    _common(check_parser)
    check_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    check_parser.set_defaults(run=check)
    export_parser = commands.add_parser("export", help="write readable code, drawings and ONNX of the captured graphs")
    _common(export_parser)
    export_parser.add_argument("--out", required=True, help="output directory")
    export_parser.add_argument("--onnx-scale", type=int, default=-1, help="scale exported to ONNX (default: last)")
    export_parser.set_defaults(run=export)
    diff_parser = commands.add_parser("diff", help="run the passes and write the graph diff report (.html/.md/.json)")
    _common(diff_parser)
    diff_parser.add_argument("--passes", default="lhep,sats", help="comma-separated pass names")
    diff_parser.add_argument("--out", required=True, help="report file: .html, .md or .json")
    diff_parser.add_argument("--flops", action="store_true", help="also measure FLOPs (runs the baseline too)")
    diff_parser.set_defaults(run=diff)
    from .bench import add_arguments

    bench_parser = commands.add_parser("bench", help="time the baseline and the optimized model per pass set; "
                                                     "writes JSON and Markdown")
    add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except GraphsurgeonError as err:
        print(f"graphsurgeon: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
