"""The worked example of docs/adapters.md: the whole adapter of a new model family (examples/toy_nsp/model.py)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from graphsurgeon import ModelAdapter
from graphsurgeon.capture import CapturePlan, ScaleSpec, StateSlot

from .model import ToyArgs, build_toy, caching, check_args, eager_runner, sample


class ToyAdapter(ModelAdapter):
    name = "toy-nsp"
    default_config = "toy-nsp"

    def build_model(self, config: Any, device: str = "meta", seed: Optional[int] = None, draw_on_device=False):
        return build_toy(None if config in (None, "toy-nsp") else config, device=device, seed=seed)

    def validate(self, model, **kwargs) -> ToyArgs:
        return check_args(model, **kwargs)

    def sample(self, model, args: ToyArgs, scale_runner=None):
        return sample(model, args, scale_runner)

    def baseline_runner(self, model, args: ToyArgs):
        return eager_runner(model, args)

    def capture_key(self, model, args: ToyArgs):
        return args.labels.numel(), args.repeat, str(model.sos.device)

    def capture_args(self, model, batch_size=1, h_div_w=1.0, pn="1M") -> dict:
        return {"labels": torch.zeros(batch_size, dtype=torch.long), "cfg": 2.0}

    def benchmark_args(self, model, batch_size=1, h_div_w=1.0, pn="1M", seed=0) -> dict:
        labels = torch.randint(model.config.num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed))
        return {"labels": labels, "cfg": 2.0, "seed": seed}

    def capture_plan(self, model, args: ToyArgs) -> CapturePlan:
        config, batch, runner = model.config, args.labels.numel(), eager_runner(model, args)
        rows, meta, last, blocks = batch * args.repeat, "meta", config.grids[-1], [f"blocks.{i}" for i in range(config.depth)]
        scales = [ScaleSpec(si, (1, g, g), {"tokens": torch.empty(rows, g * g, config.dim, device=meta),
                                            "cond": torch.empty(rows, config.prefix * config.dim, device=meta)},
                            token_input="tokens", token_axis=1, step=_at(runner.scale_step, si),
                            row_inputs=("tokens", "cond"), logits_output="logits")
                  for si, g in enumerate(config.grids)]
        residual = [ScaleSpec(si, (1, g, g), {"indices": torch.empty(batch, g, g, dtype=torch.long, device=meta),
                                              "total": torch.empty(batch, config.code_dim, last, last, device=meta)},
                              token_input=None, token_axis=None, step=_at(runner.residual_step, si),
                              sampled_input="indices", sampled_axes=(1, 2), residual_output="residual", accumulated="total")
                    for si, g in enumerate(config.grids)]
        state = [StateSlot(f"{kind}{i}", "", "cache", key=f"{kind}{i}") for i in range(config.depth) for kind in "kv"]
        return CapturePlan(model=model, scales=scales, state=state, residual=residual, prepare=lambda: caching(model),
                           cfg_batch=batch if args.repeat == 2 else None, blocks=tuple(blocks))


def _at(step, si: int):
    return lambda model, inputs: step(model, si, inputs)
