"""Demo: build a seeded random-weight Infinity model and run the baseline sampler for two prompts.

Prints the schedule, per-scale token counts and time, and the total. Random text features stand in for a
text encoder (none is bundled). Run with `make demo`, or `python examples/demo.py --help` for options.
"""
from __future__ import annotations

import argparse
import time

import torch

from graphsurgeon import get_adapter
from model_adapters.infinity import PIXEL_PRESETS, build_infinity, get_scale_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="infinity-tiny", help="named config (infinity-tiny, infinity-2b, infinity-8b)")
    parser.add_argument("--h-div-w", type=float, default=1.0, help="aspect ratio height/width (snapped to a template)")
    parser.add_argument("--pn", default="1M", choices=list(PIXEL_PRESETS), help="pixel preset; 1M = 1024x1024 at 1:1")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_infinity(args.config, seed=0)
    schedule = get_scale_schedule(args.h_div_w, args.pn)
    lens = [7, 12]
    kv = torch.randn(sum(lens), model.Ct5, generator=torch.Generator().manual_seed(1))
    text = (kv, lens, torch.tensor([0, 7, 19], dtype=torch.int32), max(lens))

    stamps: list[float] = []
    hook = model.head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))  # once per scale
    start = time.perf_counter()
    out = get_adapter("infinity").generate(model, text=text, scale_schedule=schedule, cfg=3.0, tau=0.5, top_k=900,
                                           top_p=0.97, seed=args.seed)
    total = time.perf_counter() - start
    hook.remove()

    _, H, W = schedule[-1]
    print(f"graphsurgeon demo: {args.config} (random weights), {len(lens)} prompts, CFG 3.0 on a doubled batch")
    print(f"schedule: h/w {args.h_div_w} preset {args.pn}, {len(schedule)} scales, final grid {H}x{W} "
          f"({H * 16}x{W * 16} px), {sum(h * w for _, h, w in schedule)} tokens per image")
    print(f"{'scale':>5} {'grid':>9} {'tokens':>7} {'rows':>5} {'time ms':>9}")
    previous = start
    for si, ((_, h, w), stamp) in enumerate(zip(schedule, stamps)):
        print(f"{si:>5} {f'{h}x{w}':>9} {h * w:>7} {2 * len(lens):>5} {(stamp - previous) * 1e3:>9.1f}")
        previous = stamp
    print("(scale 0 includes one-time set-up: text encoding and the first call of the custom attention op)")
    print(f"total {total:.2f} s on {torch.get_num_threads()} CPU threads; "
          f"summed codes {tuple(out.summed_codes.shape)}, last-scale bits set: {out.bits[-1].float().mean():.3f}")


if __name__ == "__main__":
    main()
