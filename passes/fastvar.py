"""FastVAR (arXiv 2503.23367, code csguoh/FastVAR): cached token pruning per sub-layer at the late scales.

Behaviour of the released code (compared with it on a random-weight model: docs/pass_fastvar.md):

- at a pruned scale (the release: 0.4 of the tokens at 32x32, 0.5 at 40x40 of the 13-scale 1024 schedule) and in the
  pruned blocks (the release: blocks 3..27 of 32), before *each* residual sub-layer (self-attention,
  cross-attention, MLP) every batch row scores its tokens by the squared distance to the row's mean token and keeps
  the ``n - int(n * ratio)`` farthest (``argsort`` descending, that order kept; equal scores: the earlier
  position first, where the release's unstable sort leaves it open);
- the sub-layer runs on the kept tokens only (their rotary positions gathered with them; only they enter the KV
  cache);
- its output over every token is the output the same sub-layer produced at the cache scale (the release: 24x24),
  resized to this grid with area interpolation, with the freshly computed tokens scattered over it; that is added
  to the full stream.

Every row keeps the same count (no padding); each row ranks its own tokens (the conditional and unconditional rows
of a sample may keep different ones, as in the release). Where a count keeps every token the positions stay in
order, so the graphs compute exactly what the model does (the neutral setting: every ratio 0). The release's other
speed-up, skipping the last two scales, is the separate pass ``scaleskip`` (reported on its own).
"""
from __future__ import annotations

import math
import operator
from typing import Any, ClassVar, Optional

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import Field, field_validator

from graphsurgeon.capture.blocks import Sublayer, block_regions, sublayers
from graphsurgeon.capture.token_axes import propagate_axis
from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import add_input, add_outputs, export_form, tag
from graphsurgeon.runner import PassRuntime
from passes._subset import gather_inside, refuse_attention_masks

PASS = "fastvar"
RELEASED_DENSE = (3 / 32, 4 / 32)
"""The release prunes blocks 3..27 of its 32: the first 3/32 and the last 4/32 of the blocks run dense."""


class FastVARConfig(PassConfig):
    ratios: dict[int, float] = Field(default_factory=lambda: {-4: 0.4, -3: 0.5},
                                     description="pruned fraction per scale (negative from the end); the release: "
                                                 "0.4 at 32x32 and 0.5 at 40x40 of the 13-scale 1024 schedule")
    cache_scale: int = Field(-5, description="the scale whose sub-layer outputs restore pruned tokens (24x24)")
    blocks: Optional[tuple[int, int]] = Field(None, description="[first, end) of the pruning blocks (negative, and an "
                                              "end of 0, count from the end); None: the release's share (the first "
                                              "3/32 and the last 4/32 of the blocks dense)")

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[int, float]) -> dict[int, float]:
        bad = {k: r for k, r in value.items() if not 0.0 <= r < 1.0}
        if bad:
            raise ValueError(f"pruned fractions must be in [0, 1), got {bad}")
        return value


# -- nodes the rewrite inserts --------------------------------------------------------------------------------
def pivotal_tokens(stream: torch.Tensor, grid: tuple[int, int], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n, C) -> the ``keep`` tokens of each row farthest from the row's mean token (squared L2), farthest
    first, and their validity (all valid). Keeping every token: the positions in order."""
    rows, n, channels = stream.shape
    if keep >= n:
        index = torch.arange(n, device=stream.device).expand(rows, n)
        return index, torch.ones(rows, n, dtype=torch.bool, device=stream.device)
    maps = stream.view(rows, *grid, channels).permute(0, 3, 1, 2)
    mean = F.adaptive_avg_pool2d(maps, (1, 1)).permute(0, 2, 3, 1).view(rows, 1, channels)
    score = torch.sum((stream - mean) ** 2, dim=-1)
    index = torch.argsort(score, dim=1, descending=True, stable=True)[:, :keep]
    return index, torch.ones(rows, keep, dtype=torch.bool, device=stream.device)


def restore_tokens(computed: torch.Tensor, cache: torch.Tensor, slot: int, index: torch.Tensor,
                   cache_grid: tuple[int, int], grid: tuple[int, int], rows: Optional[torch.Tensor]) -> torch.Tensor:
    """A sub-layer's output over every token: its cache-scale output (``cache[:, slot]``, the rows that run),
    area-resized to ``grid``, with ``computed`` (rows, K, C) scattered at ``index``. Every token computed, in
    order: ``computed`` itself."""
    n = grid[0] * grid[1]
    if computed.shape[1] == n and bool((index == torch.arange(n, device=index.device)).all()):
        return computed
    return restore_tokens_traceable(computed, cache, slot, index, cache_grid, grid, rows)


@export_form(restore_tokens)
def restore_tokens_traceable(computed: torch.Tensor, cache: torch.Tensor, slot: int, index: torch.Tensor,
                             cache_grid: tuple[int, int], grid: tuple[int, int], rows: Optional[torch.Tensor]
                             ) -> torch.Tensor:
    """:func:`restore_tokens` without the data-dependent shortcut."""
    stale = cache[:, slot] if rows is None else cache[:, slot].index_select(0, rows)
    count, _, channels = stale.shape
    maps = stale.view(count, *cache_grid, channels).permute(0, 3, 1, 2)
    full = F.interpolate(maps, size=grid, mode="area").permute(0, 2, 3, 1).reshape(count, grid[0] * grid[1], channels)
    return full.to(computed.dtype).scatter(1, index[..., None].expand_as(computed), computed)


def stack_outputs(*deltas: torch.Tensor) -> torch.Tensor:
    """The pruned sub-layers' outputs at the cache scale, (rows, sub-layers, n, C), in one common dtype."""
    dtype = deltas[0].dtype
    for delta in deltas[1:]:
        dtype = torch.promote_types(dtype, delta.dtype)
    return torch.stack([d.to(dtype) for d in deltas], dim=1)


# -- the pass ---------------------------------------------------------------------------------------------------
@register_pass
class FastVAR(GraphPass):
    """Pivotal-token selection before every sub-layer of the pruning blocks at the pruned scales, restoration from
    the cache scale (module docstring). Provides "token_selection" and "attention_pattern" (each sub-layer's
    attention keys are its own subset)."""

    name: ClassVar[str] = PASS
    Config: ClassVar[type[PassConfig]] = FastVARConfig
    provides: ClassVar[tuple[str, ...]] = ("token_selection", "attention_pattern")

    def plan(self, captured) -> tuple[int, dict[int, float], tuple[int, int]]:
        """(cache scale, {pruned scale: ratio} among the scales that run, [first, end) of the pruning blocks)."""
        n = len(captured.scales)
        ran = len(captured.residual) or n
        cache = _index(self.config.cache_scale, n, "cache_scale")
        ratios = {_index(k, n, "ratios"): r for k, r in self.config.ratios.items()}
        late = sorted(k for k in ratios if k <= cache)
        if late:
            raise ConfigError(f"{PASS}.ratios names scales {late} that are not after the cache scale {cache}")
        depth = len(captured.plan.blocks)
        if self.config.blocks is None:
            first, end = _half_up(RELEASED_DENSE[0] * depth), depth - _half_up(RELEASED_DENSE[1] * depth)
        else:
            first, end = self.config.blocks
            first, end = first + depth if first < 0 else first, end + depth if end <= 0 else end
        if not 0 <= first < end <= depth:
            raise ConfigError(f"{PASS}.blocks={self.config.blocks} selects no blocks of the model's {depth}")
        return cache, {k: r for k, r in sorted(ratios.items()) if k < ran}, (first, end)

    def requires(self, captured) -> None:
        """Blocks declared, each with residual sub-layers; 2-D token grids; no attention masks; the cache scale
        runs every row."""
        cache, ratios, _ = self.plan(captured)
        if not ratios:
            return
        if not captured.plan.blocks:
            raise ConfigError(f"pass '{PASS}' works per sub-layer: the capture plan declares no blocks "
                              "(CapturePlan.blocks)")
        for k in (cache, *ratios):
            scale = captured.scales[k]
            if scale.token_input is None or scale.token_axis != 1 or scale.tokens != scale.grid[-2] * scale.grid[-1]:
                raise ConfigError(f"pass '{PASS}': scale {k} needs a token input with its tokens on axis 1 of one 2-D "
                                  f"grid (token axis {scale.token_axis}, grid {scale.grid})")
            refuse_attention_masks(scale, PASS, "a sub-layer's tokens")
        if captured.scales[cache].active_rows is not None:
            raise ConfigError(f"pass '{PASS}': a row guard drops rows at the cache scale {cache}; every row's "
                              "sub-layer outputs are needed there")

    def rewrite(self, captured) -> list[GraphEdit]:
        cache, ratios, (first, end) = self.plan(captured)
        if not ratios:
            return []
        blocks = captured.plan.blocks[first:end]
        cache_scale = captured.scales[cache]
        regions = block_regions(cache_scale.module.graph, captured.plan.blocks, cache, PASS)
        per_block = [len(sublayers(r, cache, PASS)) for r in regions]
        work = {"total": sum(per_block), "pruned": sum(per_block[first:end])}
        edits = [_rewrite_cache_scale(cache_scale, blocks, work)]
        for k, ratio in ratios.items():
            edits.append(_rewrite_pruned_scale(captured.scales[k], cache_scale, blocks, ratio))
        return edits

    def runtime(self, captured) -> "FastVARRuntime":
        cache, ratios, _ = self.plan(captured)
        return FastVARRuntime(captured, cache, ratios)


def _index(value: int, count: int, key: str) -> int:
    if not -count <= value < count:
        raise ConfigError(f"{PASS}.{key}: {value} is outside the {count} available")
    return value % count


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _tag(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return tag(node, PASS, role)


def _pruned_sublayers(scale, blocks: tuple[str, ...]) -> list[Sublayer]:
    regions = block_regions(scale.module.graph, blocks, scale.index, PASS)
    found = [s for region in regions for s in sublayers(region, scale.index, PASS)]
    if not found:
        raise ConfigError(f"pass '{PASS}': the pruning blocks of scale {scale.index} have no residual sub-layers")
    return found


def _rewrite_cache_scale(scale, blocks: tuple[str, ...], work: dict[str, int]) -> GraphEdit:
    """The cache scale reports every pruned sub-layer's output (``fastvar_cache``); ``work`` (the model's sub-layers,
    and those that prune) rides on the node for the stats."""
    graph = scale.module.graph
    deltas = [s.delta for s in _pruned_sublayers(scale, blocks)]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        stacked = _tag(graph.call_function(stack_outputs, tuple(deltas)), "cache_outputs")
    annotations(stacked)["fastvar_work"] = work
    add_outputs(scale, [("fastvar_cache", stacked)])
    graph.lint()
    scale.module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=(stacked.name,))


def _rewrite_pruned_scale(scale, cache_scale, blocks: tuple[str, ...], ratio: float) -> GraphEdit:
    """Before every pruned sub-layer: pivotal tokens, gathered; after it: restored from the cache."""
    module, graph = scale.module, scale.module.graph
    found = _pruned_sublayers(scale, blocks)
    stream = found[0].stream_in.meta["val"]
    grid, cache_grid = tuple(scale.grid[-2:]), tuple(cache_scale.grid[-2:])
    example = torch.randn(stream.shape[0], len(found), cache_scale.tokens, stream.shape[-1],
                          generator=torch.Generator().manual_seed(scale.index)).to(stream.dtype)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cache = add_input(graph, "fastvar_cache", placeholders[-1], PASS, "cache_input", [example])
    scale.input_names = scale.input_names + ["fastvar_cache"]
    active = next((n for n in graph.nodes if n.name == scale.active_rows), None) if scale.active_rows else None
    if active is None:  # a row guard has annotated the rows already
        token_node = next(n for n in graph.nodes if n.op == "placeholder" and n.target == scale.token_input)
        propagate_axis(graph, token_node, 0, stream.shape[0], key="row_axis")  # where side values meet the tokens
    keep = scale.tokens - int(scale.tokens * ratio)
    added, changed, rewired = [cache], [], []
    for slot, sub in enumerate(found):
        with graph.inserting_before(sub.nodes[0]):
            selection = _tag(graph.call_function(pivotal_tokens, (sub.stream_in, grid, keep)), "select")
            index = _tag(graph.call_function(operator.getitem, (selection, 0)), "select")
            valid = _tag(graph.call_function(operator.getitem, (selection, 1)), "select")
        _, inserted, generalized = gather_inside(module, scale, sub.stream_in, sub.nodes, index, valid, PASS,
                                                 "pivotal_token_count")
        with graph.inserting_after(sub.delta):
            restored = _tag(graph.call_function(restore_tokens, (sub.delta, cache, slot, index, cache_grid, grid,
                                                                  active)), "restore")
        sub.delta.replace_all_uses_with(restored, delete_user_cb=lambda user: user is sub.add)
        added += [selection, index, valid, *inserted, restored]
        changed += generalized
        rewired.append(sub.delta.name)
    graph.lint()
    module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=tuple(n.name for n in added), generalized=tuple(changed),
                     rewired=tuple(rewired))


class FastVARRuntime(PassRuntime):
    """Carries the cache scale's sub-layer outputs to the pruned scales.

    Stats, one entry per scale: ``scale``, ``tokens``, ``grid``; at pruned scales ``kept_per_sublayer`` (the tokens
    every row computes in each pruned sub-layer), ``pruned_sublayers`` and ``token_layers_vs_dense`` (sub-layer token
    work over every token through every sub-layer of every block); None elsewhere."""

    def __init__(self, captured: Any, cache: int, ratios: dict[int, float]):
        super().__init__()
        self.cache_index, self.ratios = cache, ratios
        self.tokens = [s.tokens for s in captured.scales]
        self.grids = [list(s.grid[-2:]) for s in captured.scales]
        self.work = next((annotations(n)["fastvar_work"] for n in captured.scales[cache].module.graph.nodes
                          if "fastvar_work" in annotations(n)), None)
        self.cache = None

    def inputs(self, graph, region: str, device: torch.device) -> dict:
        return {"fastvar_cache": self.cache} if region == "scale" and "fastvar_cache" in graph.input_names else {}

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region != "scale":
            return
        if "fastvar_cache" in outputs:
            self.cache = outputs["fastvar_cache"]
        n = self.tokens[graph.index]
        entry = {"scale": graph.index, "tokens": n, "grid": self.grids[graph.index], "kept_per_sublayer": None,
                 "pruned_sublayers": None, "token_layers_vs_dense": None}
        ratio = self.ratios.get(graph.index)
        if ratio is not None:
            keep = n - int(n * ratio)
            total, pruned = self.work["total"], self.work["pruned"]
            entry.update(kept_per_sublayer=keep, pruned_sublayers=pruned,
                         token_layers_vs_dense=(pruned * keep + (total - pruned) * n) / (total * n))
        self.stats.append(entry)
