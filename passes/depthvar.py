"""DepthVAR (arXiv 2604.17286): a computational depth per token at the late scales, instead of keep or drop.

No code is available; this follows the paper's description, with every choice it leaves open written down in
docs/pass_depthvar.md. Scales after the reference scale R (``reference_scale``) are DepthVAR scales; at each:

1. decision map: per token, the sum over the blocks of the mean absolute change each block made to the token
   stream at the previous scale (its conditional rows), resized (bilinear) to this scale's grid;
2. percentiles: each sample's tokens ranked by the map (ascending, equal values: the earlier position first),
   rho = (rank + 0.5) / tokens; then the cyclic rotation rho' = (rho + theta_k) mod 1 with
   theta_k = (k - R - 1) * ``rotation`` mod 1, so that the tokens ranked low are not always the same ones;
3. depth score S = rho' ** (1 / m_k - 1), whose mean over the percentiles is m_k, the budget: R's tokens over
   this scale's (every DepthVAR scale costs about what scale R costs in its blocks), or ``budget`` if given;
4. depth d = round(S * L) of the model's L blocks; the layers a token runs are the first d of the bit-reversal
   order of 0..L-1 (0, L/2, L/4, 3L/4, ...: a shallow token's layers are spread over the depth, and every
   layer carries a similar load);
5. in each block only the tokens whose layers include it are gathered and computed (and enter that block's KV
   cache); the others pass through the residual stream, plus (``proxy="cached_delta"``) the change this block
   made at the previous scale, upsampled (bilinear): r^l = r^(l-1) + up(r_(k-1)^l - r_(k-1)^(l-1));
6. code blending: the scale's residual R_k is weighted per token by d / L (``blend``) before the residual step
   uses it, so a token's contribution is proportional to the depth it was processed with.

Every sample gets the same multiset of depths (percentiles do not depend on the values), so every row computes
the same count in each block: no padding and no key masks. Both CFG rows of a sample share its depths. The
neutral setting ``budget=1`` gives every token every layer: the graphs then compute exactly what they did.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import Field, field_validator

from graphsurgeon.capture.blocks import BlockRegion, block_regions
from graphsurgeon.capture.token_axes import propagate_axis
from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import add_input, add_outputs, export_form, tag
from graphsurgeon.runner import PassRuntime
from passes._subset import gather_inside, refuse_attention_masks
from passes.lhep import copy_token_meta, select_tokens

PASS = "depthvar"


class DepthVARConfig(PassConfig):
    reference_scale: int = Field(-4, description="R: the scales after it get per-token depths, each budgeted at R's "
                                                 "block cost (negative from the end; -1: none, the pass is off)")
    budget: Optional[float] = Field(None, gt=0.0, le=1.0, description="a fixed mean depth fraction at every "
                                    "DepthVAR scale instead of R's budget (1: every token every layer, neutral)")
    rotation: float = Field(0.25, ge=0.0, lt=1.0, description="percentile rotation per scale (0: no rotation)")
    proxy: Literal["cached_delta", "identity"] = Field(
        "cached_delta", description="what a skipped token gets from a block: the block's upsampled change at the "
                                    "previous scale (the paper), or nothing (pure residual pass-through)")
    blend: bool = Field(True, description="weight each token's code by its processed depth d / L")

    @field_validator("reference_scale")
    @classmethod
    def _not_the_first_scale(cls, value: int) -> int:
        """Scale 0 computes one token: a budget at its cost would leave the later scales no token to compute."""
        if value == 0:
            raise ValueError("reference_scale 0 is the one-token first scale; give 1 or later (negative counts from "
                             "the end, e.g. -4)")
        return value


# -- the schedule -----------------------------------------------------------------------------------------------
def bit_reversal_order(layers: int) -> list[int]:
    """0..layers-1 in bit-reversed order (of the next power of two, larger values left out): 32 -> 0, 16, 8, 24, 4..."""
    width = max(1, (layers - 1).bit_length())
    order = [int(format(i, f"0{width}b")[::-1], 2) for i in range(1 << width)]
    return [layer for layer in order if layer < layers]


def layer_ranks(layers: int) -> list[int]:
    """Per layer, its place in the bit-reversal order: a token of depth d runs layer l when d > rank[l]."""
    ranks = [0] * layers
    for place, layer in enumerate(bit_reversal_order(layers)):
        ranks[layer] = place
    return ranks


def decision_map(previous_delta: torch.Tensor, batch: int, previous_grid: tuple[int, int], grid: tuple[int, int]
                 ) -> torch.Tensor:
    """(rows, L, n', C) per-block changes at the previous scale -> (batch, h*w): their mean absolute value over the
    channels, summed over the blocks, of each sample's conditional row (rows [0:batch]), resized to ``grid``."""
    change = previous_delta[:batch].float().abs().mean(dim=-1).sum(dim=1)
    change = change.reshape(batch, 1, *previous_grid)
    return F.interpolate(change, size=grid, mode="bilinear", align_corners=False).flatten(1)


def token_depths(decision: torch.Tensor, layers: int, budget: float, theta: float) -> torch.Tensor:
    """(B, n) decision map -> (B, n) int64 depths in [0, layers] (steps 2-4 of the module docstring). In float64: the
    rotation and the power must not round differently from one sample to the next."""
    order = torch.sort(decision, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return _depths_from_ranks(rank, layers, budget, theta)


@export_form(token_depths)
def token_depths_traceable(decision: torch.Tensor, layers: int, budget: float, theta: float) -> torch.Tensor:
    """:func:`token_depths` without a sort (ONNX has no stable one): a token's rank is the number of smaller values
    plus the earlier equal ones. Quadratic in the token count; for export only."""
    mine, theirs = decision[:, :, None], decision[:, None, :]
    position = torch.arange(decision.shape[1], device=decision.device)
    earlier = position[None, :] < position[:, None]
    rank = (theirs < mine).sum(dim=-1) + ((theirs == mine) & earlier).sum(dim=-1)
    return _depths_from_ranks(rank, layers, budget, theta)


def _depths_from_ranks(rank: torch.Tensor, layers: int, budget: float, theta: float) -> torch.Tensor:
    n = rank.shape[1]
    rotated = torch.remainder((rank.double() + 0.5) / n + theta, 1.0)
    score = rotated.pow(1.0 / budget - 1.0)
    return torch.floor(score * layers + 0.5).clamp(0, layers).long()


def layer_keep(depths: torch.Tensor, rank: int) -> torch.Tensor:
    """(B, n) depths -> (B, n) bool: the tokens that run the layer of bit-reversal place ``rank``."""
    return depths > rank


def layer_proxy(previous_delta: torch.Tensor, layer: int, previous_grid: tuple[int, int], grid: tuple[int, int]
                ) -> torch.Tensor:
    """(rows, L, n', C) -> (rows, h*w, C): block ``layer``'s change at the previous scale, resized (bilinear)."""
    delta = previous_delta[:, layer]
    rows, _, channels = delta.shape
    maps = delta.transpose(1, 2).reshape(rows, channels, *previous_grid)
    return F.interpolate(maps, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def merge_stream(base: torch.Tensor, computed: torch.Tensor, index: torch.Tensor, proxy: Optional[torch.Tensor]
                 ) -> torch.Tensor:
    """A block's output over every token: ``computed`` (rows, K, C) at the positions ``index`` (rows, K), the
    stream it read (``base``, plus ``proxy`` if given) elsewhere. Every token computed: ``computed`` itself."""
    if computed.shape[1] == base.shape[1] and bool((index == torch.arange(index.shape[1], device=index.device)).all()):
        return computed
    return merge_stream_traceable(base, computed, index, proxy)


@export_form(merge_stream)
def merge_stream_traceable(base: torch.Tensor, computed: torch.Tensor, index: torch.Tensor,
                           proxy: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`merge_stream` without the data-dependent shortcut."""
    passed = base if proxy is None else base + proxy.to(base.dtype)
    return passed.scatter(1, index[..., None].expand_as(computed), computed)


def stack_deltas(*streams: torch.Tensor) -> torch.Tensor:
    """(input_0, output_0, input_1, output_1, ...) of the blocks -> (rows, L, n, C) the change of each block."""
    return torch.stack([out - inp for inp, out in zip(streams[0::2], streams[1::2])], dim=1)


def blend_residual(residual: torch.Tensor, depths: torch.Tensor, layers: int, grid: tuple[int, int]) -> torch.Tensor:
    """R_k (B, C, H, W) weighted per token by depth / layers (nearest, when the map is a multiple of the token grid).
    Every token at full depth: R_k itself."""
    if bool((depths == layers).all()):
        return residual
    return blend_residual_traceable(residual, depths, layers, grid)


@export_form(blend_residual)
def blend_residual_traceable(residual: torch.Tensor, depths: torch.Tensor, layers: int, grid: tuple[int, int]
                             ) -> torch.Tensor:
    """:func:`blend_residual` without the data-dependent shortcut."""
    weight = (depths.double() / layers).reshape(depths.shape[0], 1, *grid)
    weight = F.interpolate(weight, size=tuple(residual.shape[-2:]), mode="nearest")
    return residual * weight.to(residual.dtype)


# -- the pass ------------------------------------------------------------------------------------------------
@register_pass
class DepthVAR(GraphPass):
    """Per-token depth at the scales after R: per-block gather/compute/merge and code blending (module docstring).

    It provides "token_selection" (which tokens each block computes) and "attention_pattern" (each block's KV
    cache holds a different subset of a scale's tokens, so a pass that chooses keys by position cannot follow)."""

    name: ClassVar[str] = PASS
    Config: ClassVar[type[PassConfig]] = DepthVARConfig
    provides: ClassVar[tuple[str, ...]] = ("token_selection", "attention_pattern")
    traits: ClassVar[tuple[str, ...]] = ("per_scale_outputs",)  # each block's change, read at the next scale
    cannot_run_beside: ClassVar[tuple[str, ...]] = ("row_selection",)
    """The depth map and the cached block changes are per row of the doubled batch: a row guard (SATS, SkipVAR)
    that drops rows would leave the next scale without the changes of the dropped rows."""

    def scales(self, n_scales: int) -> tuple[int, ...]:
        return tuple(range(self.reference(n_scales) + 1, n_scales))

    def reference(self, n_scales: int) -> int:
        r = self.config.reference_scale
        if not -n_scales <= r < n_scales:
            raise ConfigError(f"{PASS}.reference_scale={r} is outside the schedule's {n_scales} scales")
        if r % n_scales == 0:
            raise ConfigError(f"{PASS}.reference_scale={r} is the one-token first scale of the schedule's {n_scales}; "
                              "give a later one")
        return r % n_scales

    def acting(self, captured) -> tuple[int, ...]:
        """The DepthVAR scales that run (``num_scales`` may stop early)."""
        ran = len(captured.residual) or len(captured.scales)
        return tuple(k for k in self.scales(len(captured.scales)) if k < ran)

    def requires(self, captured) -> None:
        """Blocks declared and found with one stream each, 2-D token grids, no row selection, no attention mask; with
        blending, a residual step per DepthVAR scale whose outputs all come from the drawn values through R_k."""
        acting = self.acting(captured)
        if not acting:
            return
        for scale in (captured.scales[k] for k in (acting[0] - 1, *acting)):
            _check_scale(scale, captured.plan.blocks)
        if self.config.blend:
            if len(captured.residual) < acting[-1] + 1:
                raise ConfigError(f"pass '{PASS}' blends codes in the residual step: the plan declares none for scale "
                                  f"{acting[-1]} (CapturePlan.residual), or set {PASS}.blend=false")
            for k in acting:
                _check_blendable(captured.residual[k])

    def rewrite(self, captured) -> list[GraphEdit]:
        acting = self.acting(captured)
        if not acting:
            return []
        n_scales = len(captured.scales)
        reference = self.reference(n_scales)
        tokens_r = captured.scales[reference].tokens
        blocks = captured.plan.blocks
        edits = [_rewrite_observer(captured.scales[acting[0] - 1], blocks)]
        for k in acting:
            scale = captured.scales[k]
            budget = self.config.budget if self.config.budget is not None else min(1.0, tokens_r / scale.tokens)
            theta = ((k - reference - 1) * self.config.rotation) % 1.0
            previous = captured.scales[k - 1]
            edits.append(_rewrite_scale(scale, previous, blocks, captured.plan.cfg_batch, budget, theta, self.config,
                                        emit_deltas=k + 1 in acting))
            if self.config.blend:
                edits.append(_rewrite_residual(captured.residual[k], len(blocks), tuple(scale.grid[-2:])))
        return edits

    def runtime(self, captured) -> "DepthVARRuntime":
        for scale in captured.scales:
            if scale.active_rows is not None and any(annotations(n).get("pass") == PASS for n in scale.module.graph.nodes):
                raise ConfigError(f"a pass selects the running rows of scale {scale.index} after '{PASS}' rewrote it; "
                                  f"'{PASS}' needs every row's block changes: it cannot run with a row guard")
        return DepthVARRuntime(captured, len(captured.plan.blocks), self.acting(captured))


def _check_scale(scale, blocks: tuple[str, ...]) -> None:
    if scale.token_input is None or scale.token_axis != 1:
        raise ConfigError(f"pass '{PASS}': scale {scale.index} declares no token input with its tokens on axis 1")
    if scale.tokens != scale.grid[-2] * scale.grid[-1]:
        raise ConfigError(f"pass '{PASS}': scale {scale.index} has token grid {tuple(scale.grid)}; the depth map "
                          "needs one 2-D map (leading extents of 1)")
    if scale.active_rows is not None:
        raise ConfigError(f"pass '{PASS}': scale {scale.index}'s rows are selected by another pass (a row guard such "
                          f"as 'sats'); '{PASS}' needs every row's block changes and cannot run with it")
    refuse_attention_masks(scale, PASS, "a block's tokens")
    block_regions(scale.module.graph, blocks, scale.index, PASS)


def _check_blendable(graph) -> None:
    """Every output of the residual step other than R_k must reach the drawn values only through R_k."""
    if graph.residual_output is None or graph.sampled_input is None:
        raise ConfigError(f"pass '{PASS}': residual step {graph.index} must declare sampled_input and residual_output "
                          f"(code blending weights R_k), or set {PASS}.blend=false")
    output = next(n for n in reversed(graph.module.graph.nodes) if n.op == "output")
    residual = output.args[0][graph.output_names.index(graph.residual_output)]
    sampled = next(n for n in graph.module.graph.nodes if n.op == "placeholder" and n.target == graph.sampled_input)
    seen, todo = {residual}, [a for a in output.args[0] if isinstance(a, torch.fx.Node) and a is not residual]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        if node is sampled:
            raise ConfigError(f"pass '{PASS}': residual step {graph.index} computes outputs from "
                              f"{graph.sampled_input!r} other than through its residual_output "
                              f"{graph.residual_output!r}; code blending would miss them (compute them from R_k, "
                              f"or set {PASS}.blend=false)")
        seen.add(node)
        todo += node.all_input_nodes


def _tag(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return tag(node, PASS, role)


def _rewrite_observer(scale, blocks: tuple[str, ...]) -> GraphEdit:
    """The scale before the first DepthVAR scale reports each block's change (``depthvar_delta``)."""
    graph = scale.module.graph
    regions = block_regions(graph, blocks, scale.index, PASS)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        deltas = _tag(graph.call_function(stack_deltas, tuple(x for r in regions for x in (r.stream_in, r.stream_out))),
                      "block_deltas")
    add_outputs(scale, [("depthvar_delta", deltas)])
    graph.lint()
    scale.module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=(deltas.name,))


def _rewrite_scale(scale, previous, blocks: tuple[str, ...], cfg_batch: Optional[int], budget: float, theta: float,
                   config: DepthVARConfig, emit_deltas: bool) -> GraphEdit:
    """Depths at the entry; per block: its tokens gathered, computed, merged back into the full stream."""
    module, graph = scale.module, scale.module.graph
    regions = block_regions(graph, blocks, scale.index, PASS)
    layers = len(regions)
    rows = regions[0].stream_in.meta["val"].shape[0]
    batch = cfg_batch or rows
    grid, previous_grid = tuple(scale.grid[-2:]), tuple(previous.grid[-2:])
    stream = regions[0].stream_in.meta["val"]
    example = torch.randn(rows, layers, previous.tokens, stream.shape[-1],
                          generator=torch.Generator().manual_seed(scale.index)).to(stream.dtype)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    previous_delta = add_input(graph, "depthvar_prev_delta", placeholders[-1], PASS, "block_deltas_input", [example])
    scale.input_names = scale.input_names + ["depthvar_prev_delta"]
    token_node = next(n for n in graph.nodes if n.op == "placeholder" and n.target == scale.token_input)
    propagate_axis(graph, token_node, 0, rows, key="row_axis")  # where side values meet the tokens
    anchor = regions[0].stream_in if regions[0].stream_in.op != "placeholder" else previous_delta
    added = [previous_delta]
    with graph.inserting_after(anchor):
        decision = _tag(graph.call_function(decision_map, (previous_delta, batch, previous_grid, grid)), "decision_map")
    with graph.inserting_after(decision):
        depths = _tag(graph.call_function(token_depths, (decision, layers, budget, theta)), "depths")
    added += [decision, depths]
    ranks = layer_ranks(layers)
    changed: list[str] = []
    merged_streams = []
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # a block's output -> its merge over every token
    for layer, region in enumerate(regions):
        region = dataclasses.replace(region, stream_in=replaced.get(region.stream_in, region.stream_in))
        new, generalized, merged = _rewrite_block(graph, module, scale, region, depths, ranks[layer], layer, batch,
                                                  previous_delta, previous_grid, grid, config.proxy)
        replaced[region.stream_out] = merged
        added += new
        changed += generalized
        merged_streams += [region.stream_in, merged]
    outputs = [("depthvar_depth", depths)]
    if emit_deltas:
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        with graph.inserting_before(output):
            deltas = _tag(graph.call_function(stack_deltas, tuple(merged_streams)), "block_deltas")
        added.append(deltas)
        outputs.append(("depthvar_delta", deltas))
    add_outputs(scale, outputs)
    graph.lint()
    module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=tuple(n.name for n in added), generalized=tuple(changed),
                     rewired=tuple(r.stream_in.name for r in regions))


def _rewrite_block(graph: torch.fx.Graph, module, scale, region: BlockRegion, depths: torch.fx.Node, rank: int,
                   layer: int, batch: int, previous_delta: torch.fx.Node, previous_grid: tuple[int, int],
                   grid: tuple[int, int], proxy: str) -> tuple[list[torch.fx.Node], list[str], torch.fx.Node]:
    """One block: its tokens' positions, the gathered stream and side values, the merged output."""
    inside = set(region.nodes)
    with graph.inserting_before(region.nodes[0]):
        keep = _tag(graph.call_function(layer_keep, (depths, rank)), "layer_mask")
        selection = _tag(graph.call_function(select_tokens, (keep, None, batch, region.stream_in)), "select")
        index = _tag(graph.call_function(operator.getitem, (selection, 0)), "select")
        valid = _tag(graph.call_function(operator.getitem, (selection, 1)), "select")
    _, inserted, changed = gather_inside(module, scale, region.stream_in, region.nodes, index, valid, PASS,
                                         "depth_token_count")
    added = [keep, selection, index, valid, *inserted]
    out = region.stream_out
    with graph.inserting_after(out):
        extra = None
        if proxy == "cached_delta":
            extra = _tag(graph.call_function(layer_proxy, (previous_delta, layer, previous_grid, grid)), "proxy")
            added.append(extra)
    with graph.inserting_after(extra if extra is not None else out):
        merged = _tag(graph.call_function(merge_stream, (region.stream_in, out, index, extra)), "merge")
    out.replace_all_uses_with(merged, delete_user_cb=lambda user: user not in inside and user is not merged)
    copy_token_meta(region.stream_in, merged)
    added.append(merged)
    return added, changed, merged


def _rewrite_residual(graph, layers: int, grid: tuple[int, int]) -> GraphEdit:
    """R_k weighted by each token's processed depth before anything is computed from it."""
    module, fx_graph = graph.module, graph.module.graph
    output = next(n for n in reversed(fx_graph.nodes) if n.op == "output")
    residual = output.args[0][graph.output_names.index(graph.residual_output)]
    batch = next(n for n in fx_graph.nodes if n.op == "placeholder" and n.target == graph.sampled_input
                 ).meta["val"].shape[0]
    example = torch.randint(0, layers + 1, (batch, grid[0] * grid[1]), generator=torch.Generator().manual_seed(graph.index))
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    depths = add_input(fx_graph, "depthvar_depth", placeholders[-1], PASS, "depth_input", [example])
    graph.input_names = graph.input_names + ["depthvar_depth"]
    with fx_graph.inserting_after(residual if residual.op != "placeholder" else depths):
        blended = _tag(fx_graph.call_function(blend_residual, (residual, depths, layers, grid)), "blend")
    residual.replace_all_uses_with(blended, delete_user_cb=lambda user: user is not blended)
    fx_graph.lint()
    module.recompile()
    return GraphEdit(PASS, "residual", graph.index, added=(depths.name, blended.name), rewired=(residual.name,))


class DepthVARRuntime(PassRuntime):
    """Carries each scale's block changes to the next scale and its depths to its residual step.

    Stats, one entry per scale: ``scale``, ``tokens``, ``grid``; where DepthVAR acts, ``mean_depth`` (per sample,
    in blocks), ``layer_tokens`` (per block, the tokens each row computed), ``token_layers_vs_dense`` (the block
    work done over every token through every block) and ``depth_map`` (per sample, h lists of w depths); None
    elsewhere."""

    def __init__(self, captured: Any, layers: int, acting: tuple[int, ...]):
        super().__init__()
        self.layers, self.acting = layers, set(acting)
        self.tokens = [s.tokens for s in captured.scales]
        self.grids = [tuple(s.grid[-2:]) for s in captured.scales]
        self.delta = self.depths = None

    def inputs(self, graph, region: str, device: torch.device) -> dict:
        offered = {"depthvar_prev_delta": self.delta} if region == "scale" else {"depthvar_depth": self.depths}
        return {name: value for name, value in offered.items() if name in graph.input_names}

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region != "scale":
            return
        self.delta = outputs.get("depthvar_delta")
        self.depths = outputs.get("depthvar_depth")
        height, width = self.grids[graph.index]
        entry = {"scale": graph.index, "tokens": self.tokens[graph.index], "grid": [height, width],
                 "mean_depth": None, "layer_tokens": None, "token_layers_vs_dense": None, "depth_map": None}
        if self.depths is not None:
            ranks = layer_ranks(self.layers)
            first = self.depths[0]
            entry.update(mean_depth=self.depths.double().mean(dim=1).tolist(),
                         layer_tokens=[int((first > r).sum()) for r in ranks],
                         token_layers_vs_dense=float(self.depths.double().mean()) / self.layers,
                         depth_map=self.depths.reshape(-1, height, width).tolist())
        self.stats.append(entry)
