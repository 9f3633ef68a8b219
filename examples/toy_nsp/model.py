"""A small next-scale-prediction model written in a style unlike Infinity's and VAR's, to show the adapter contract.

What differs from both, on purpose:
- conditioning: the class label becomes ``prefix`` tokens that are *prefilled* into the KV cache before the
  first scale (scale 0's step runs them through the blocks first), plus a per-row vector added to every token;
- cache placement: one plain dict on the model (``model.cache["k0"]``, ...) instead of attributes of the
  attention modules;
- positions: one learned table over all scales' tokens, sliced and added *inside* the scale step;
- residual: a VQ codebook; the drawn values are integer code indices on a (B, h, w) grid, accumulated
  bilinearly at the final grid; the next scale's input is the area-downsampled sum;
- guidance: ``uncond + cfg * (cond - uncond)``, conditional rows first.

The sampler (:func:`sample`) is the model's own and is written against graphsurgeon's ``ScaleRunner``; the eager
runner (:func:`eager_runner`) runs the same two step functions graphsurgeon captures.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from graphsurgeon.errors import InputError
from graphsurgeon.runner import StepRunner


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = 64
    heads: int = 2
    depth: int = 2
    num_classes: int = 10
    prefix: int = 2
    codebook_size: int = 32
    code_dim: int = 8
    grids: tuple[int, ...] = (1, 2, 3, 5, 7, 9, 13)
    """Square token grids, one per scale (odd grids on purpose)."""


class Block(nn.Module):
    def __init__(self, config: ToyConfig, index: int):
        super().__init__()
        self.index, self.heads = index, config.heads
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.qkv, self.proj = nn.Linear(config.dim, 3 * config.dim), nn.Linear(config.dim, config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim))
        self.cond = nn.Linear(config.dim * config.prefix, config.dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cache: Optional[dict]) -> torch.Tensor:
        x = x + self.cond(cond)[:, None]
        rows, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(rows, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # keys and values of everything before (the prefix, earlier scales) come first
            name_k, name_v = f"k{self.index}", f"v{self.index}"
            if name_k in cache:
                k, v = torch.cat([cache[name_k], k], dim=2), torch.cat([cache[name_v], v], dim=2)
            cache[name_k], cache[name_v] = k, v
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, length, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class ToyNSP(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.class_emb = nn.Embedding(config.num_classes + 1, config.prefix * config.dim)
        self.sos = nn.Parameter(torch.randn(1, 1, config.dim))
        self.pos = nn.Parameter(torch.randn(sum(g * g for g in config.grids), config.dim) * 0.1)
        self.scale_emb = nn.Embedding(len(config.grids), config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, config.codebook_size))
        self.codebook = nn.Embedding(config.codebook_size, config.code_dim)
        self.code_in = nn.Linear(config.code_dim, config.dim)
        self.cache: dict[str, torch.Tensor] = {}
        self.caching = False

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cond, self.cache if self.caching else None)
        return x


def build_toy(config: Any = None, device: str = "cpu", seed: Optional[int] = 0) -> ToyNSP:
    config = config if isinstance(config, ToyConfig) else ToyConfig(**(config or {}))
    if seed is not None:
        torch.manual_seed(seed)
    return ToyNSP(config).to(device).eval()


# -- the two steps graphsurgeon captures --------------------------------------------------------------------
def scale_step(model: ToyNSP, si: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale ``si``: (at scale 0, prefill the class prefix first) positions added, blocks, head."""
    cond = inputs["cond"]
    if si == 0:
        model.run_blocks(cond.view(cond.shape[0], model.config.prefix, -1), cond)
    start = sum(g * g for g in model.config.grids[:si])
    tokens = inputs["tokens"]
    x = tokens + model.pos[start:start + tokens.shape[1]] + model.scale_emb.weight[si]
    return {"logits": model.head(model.run_blocks(x, cond))}


def residual_step(model: ToyNSP, si: int, inputs: dict[str, torch.Tensor], repeat: int) -> dict[str, torch.Tensor]:
    """Code indices (B, h, w) -> their codes (R_k), the running sum at the final grid, the next scale's tokens."""
    grids = model.config.grids
    codes = model.codebook(inputs["indices"]).permute(0, 3, 1, 2)
    total = inputs["total"] + F.interpolate(codes, size=(grids[-1], grids[-1]), mode="bilinear", align_corners=False)
    out = {"residual": codes, "total": total}
    if si + 1 < len(grids):
        nxt = F.interpolate(total, size=(grids[si + 1], grids[si + 1]), mode="area").flatten(2).transpose(1, 2)
        out["next_tokens"] = model.code_in(nxt).repeat(repeat, 1, 1)
    return out


@contextlib.contextmanager
def caching(model: ToyNSP) -> Iterator[None]:
    model.cache.clear()
    model.caching = True
    try:
        yield
    finally:
        model.caching = False
        model.cache.clear()


# -- the sampler ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyArgs:
    labels: torch.Tensor
    cfg: float
    seed: Optional[int]

    @property
    def repeat(self) -> int:
        return 2 if self.cfg != 1 else 1


@dataclass
class ToyOutput:
    indices: list[torch.Tensor]
    total: torch.Tensor
    logits: list[torch.Tensor]
    stats: Optional[dict] = None


def check_args(model: ToyNSP, labels: Any = None, cfg: Any = 2.0, seed: Any = None, **unknown: Any) -> ToyArgs:
    if unknown:
        raise InputError(f"unknown generate argument(s) {sorted(unknown)}; the arguments are labels, cfg, seed")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point():
        raise InputError(f"labels must be a non-empty 1-D integer tensor, got {labels!r}")
    if bool((labels < 0).any() or (labels >= model.config.num_classes).any()):
        raise InputError(f"labels must be in [0, {model.config.num_classes}), got {labels.tolist()}")
    if not isinstance(cfg, numbers.Real) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise InputError(f"cfg must be a finite number, got {cfg!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be None or an int, got {seed!r}")
    return ToyArgs(labels=labels.long(), cfg=float(cfg), seed=seed)


def eager_runner(model: ToyNSP, args: ToyArgs) -> StepRunner:
    return StepRunner(model, scale_step, lambda m, si, inputs: residual_step(m, si, inputs, args.repeat),
                      sampled_input="indices", context=lambda: caching(model))


@torch.no_grad()
def sample(model: ToyNSP, args: ToyArgs, runner: Optional[StepRunner] = None) -> ToyOutput:
    config, batch = model.config, args.labels.numel()
    labels = args.labels.to(model.sos.device)
    if args.repeat == 2:
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])
    cond = model.class_emb(labels)
    tokens = model.sos.expand(labels.numel(), 1, -1)
    total = torch.zeros(batch, config.code_dim, config.grids[-1], config.grids[-1], device=cond.device)
    generator = torch.Generator(cond.device).manual_seed(args.seed) if args.seed is not None else None
    indices, logits_out = [], []
    with runner or eager_runner(model, args) as r:
        for si, grid in enumerate(config.grids):
            logits = r.scale(si, {"tokens": tokens, "cond": cond})["logits"]
            if args.repeat == 2:
                logits = r.guide(si, logits, batch, lambda c, u: u + args.cfg * (c - u))
            logits_out.append(logits)
            drawn = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator)
            out = r.residual(si, {"indices": drawn.view(batch, grid, grid), "total": total})
            indices.append(out["indices"])
            total, tokens = out["total"], out.get("next_tokens")
    return ToyOutput(indices=indices, total=total, logits=logits_out)
