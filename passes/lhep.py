"""LHEP (latent high-frequency energy pruning), LD-Pruning's "where to refine".

At an LHEP scale k the tokens worth computing are chosen from the previous scale's residual map R_{k-1}
((B, C, h, w), the residual step's declared ``residual_output``: binary codes, codebook vectors, ...):

1. energy: the 2x2 Haar high-frequency bands (LH, HL, HH), stride 2, per channel, squared and summed over the
   bands and channels -> (B, h/2, w/2);
2. local aggregation: 3x3 average pooling (stride 1, zero padding counted, torch's default), then a resize to
   the scale's token grid;
3. keep the smallest set of tokens holding a fraction ``rho`` of the total energy: sort descending, find the
   first k with cumsum >= rho * total, keep every token whose energy is >= the k-th value (ties are kept).

Choices where the paper is silent (also in docs/passes.md):
- odd grids (h or w odd, e.g. 27 in the 1.333 schedule) are padded by repeating the last row/column before the
  stride-2 transform;
- the resize to the token grid is bilinear (align_corners=False): E is smooth after pooling;
- a residual with no high-frequency energy at all keeps every token (nothing to rank, so nothing is skipped);
- ``rho = 1`` keeps every token, flat (zero-energy) ones included: it is the user's off switch, so it must give
  the unpruned model bit for bit. The paper's literal rule would drop tokens of zero energy (they add nothing
  to the cumulative sum); below 1 the literal rule applies, summed in float64 so that tiny energies are not
  absorbed by float32 rounding and the threshold does not depend on the summation order.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

import operator

from graphsurgeon.capture.dynamic import generalize_axis
from graphsurgeon.capture.token_axes import propagate_axis
from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotations
from graphsurgeon.passes import ScaleList, GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import TOKEN_VALIDITY_ARG, add_input, add_outputs, export_form, tag
from graphsurgeon.runner import PassRuntime

_HAAR_HIGH = 0.5 * torch.tensor([
    [[-1.0, 1.0], [-1.0, 1.0]],  # LH
    [[-1.0, -1.0], [1.0, 1.0]],  # HL
    [[-1.0, 1.0], [1.0, -1.0]],  # HH
])


def haar_high_frequency_energy(residual: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, ceil(h/2), ceil(w/2)): sum over channels and LH/HL/HH of squared Haar coefficients."""
    batch, channels, h, w = residual.shape
    x = residual.float()
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    kernels = _HAAR_HIGH.to(x.device)[:, None]  # (3, 1, 2, 2)
    bands = F.conv2d(x.reshape(batch * channels, 1, x.shape[-2], x.shape[-1]), kernels, stride=2)
    return bands.pow(2).reshape(batch, channels * 3, *bands.shape[-2:]).sum(dim=1)


def energy_map(residual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LHEP's token energy on the target grid (h_k, w_k): Haar energy, 3x3 average, bilinear resize."""
    energy = haar_high_frequency_energy(residual)[:, None]
    energy = F.avg_pool2d(energy, kernel_size=3, stride=1, padding=1)
    return F.interpolate(energy, size=grid, mode="bilinear", align_corners=False)[:, 0]


def keep_mask(energy: torch.Tensor, rho: float) -> torch.Tensor:
    """(B, n) energies -> (B, n) bool: per row, the smallest set holding >= rho of the energy (ties kept);
    every token at ``rho >= 1`` (see the module docstring)."""
    if rho >= 1.0:
        return torch.ones_like(energy, dtype=torch.bool)
    values, _ = energy.double().sort(dim=-1, descending=True)
    cumulative = values.cumsum(dim=-1)
    total = cumulative[:, -1:]
    reached = cumulative >= rho * total
    first = reached.float().argmax(dim=-1, keepdim=True)  # the first position reaching rho (always exists)
    threshold = values.gather(-1, first)
    return energy.double() >= threshold


def fixed_keep_mask(energy: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, n) energies -> (B, n) bool: per row, the ``round(fraction * n)`` (at least 1) highest-energy tokens
    (equal energies: the earlier position first). A fixed operating point for benchmarks, not the paper's rule."""
    count = max(1, round(fraction * energy.shape[-1]))
    order = torch.sort(energy, dim=-1, descending=True, stable=True).indices[:, :count]
    return torch.zeros_like(energy, dtype=torch.bool).scatter(-1, order, True)


@export_form(fixed_keep_mask)
def fixed_keep_mask_traceable(energy: torch.Tensor, fraction: float) -> torch.Tensor:
    """:func:`fixed_keep_mask` without a sort (ONNX has no stable one): a token's rank is the number of tokens
    with more energy plus the earlier ones with as much, so ties go to the earlier position as there.
    Quadratic in the token count; it only serves export of the benchmark operating point."""
    count = max(1, round(fraction * energy.shape[-1]))
    mine, theirs = energy[:, :, None], energy[:, None, :]
    position = torch.arange(energy.shape[-1], device=energy.device)
    earlier = position[None, :] < position[:, None]
    rank = (theirs > mine).sum(dim=-1) + ((theirs == mine) & earlier).sum(dim=-1)
    return rank < count


class LHEPConfig(PassConfig):
    rho: float = Field(0.5, gt=0.0, le=1.0, description="fraction of high-frequency energy the kept tokens hold")
    scales: ScaleList = Field(None, description="scale indices (negative from the end), each once")
    last: int = Field(3, ge=0, description="without `scales`: the last this many scales")
    keep_fraction: Optional[dict[int, float]] = Field(
        None, description="benchmark-only fixed operating point: per LHEP scale (negative from the end), keep this "
                          "fraction of the tokens (the highest-energy ones) instead of applying rho")

    @field_validator("keep_fraction")
    @classmethod
    def _fractions_in_range(cls, value: Optional[dict[int, float]]) -> Optional[dict[int, float]]:
        bad = {k: f for k, f in (value or {}).items() if not 0.0 < f <= 1.0}
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        return value


@register_pass
class LHEP(GraphPass):
    """Gathers the kept tokens at the entry of each LHEP scale, masks padding in attention, scatters logits
    back, and keeps R_{k-1} at skipped positions in the residual (see the module docstring)."""

    name: ClassVar[str] = "lhep"
    Config: ClassVar[type[PassConfig]] = LHEPConfig
    provides: ClassVar[tuple[str, ...]] = ("token_selection",)
    runs_before: ClassVar[tuple[str, ...]] = ("sparvar",)  # it masks the attention LHEP gathered for
    traits: ClassVar[tuple[str, ...]] = ("per_scale_outputs",)  # the keep mask and the KV validity of each scale

    def mask(self, previous_residual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Kept tokens (B, h*w) of a scale with token grid ``grid`` given R_{k-1} (B, C, h', w')."""
        return keep_mask(energy_map(previous_residual, grid).flatten(1), self.config.rho)

    def requires(self, captured) -> None:
        """The roles LHEP reads: each scale's token input and logits, and a residual step per scale with its
        drawn values (and their grid dimensions) and R_k as a (B, C, h, w) map."""
        lhep_scales = self.scales(len(captured.scales))
        self.fixed_fractions(len(captured.scales), lhep_scales)
        if not lhep_scales:
            return
        if 0 in lhep_scales:
            raise ConfigError("pass 'lhep' cannot act on scale 0: it has no previous residual to rank tokens by")
        for scale in captured.scales:
            if scale.token_input is None or scale.logits_output is None:
                raise ConfigError(f"pass 'lhep': scale {scale.index} declares no token_input / logits_output (the "
                                  "tokens to gather and the logits to scatter back)")
        residual = captured.residual
        if not residual:
            raise ConfigError("pass 'lhep' needs the residual step of every scale that runs (CapturePlan.residual); "
                              "the plan declares none")
        for graph in residual:
            if graph.sampled_input is None or graph.sampled_axes is None or graph.residual_output is None:
                raise ConfigError(f"pass 'lhep': residual step {graph.index} must declare sampled_input, "
                                  "sampled_axes and residual_output (what Eq. 14 overwrites, and R_k)")
            value = _output_value(graph, graph.residual_output)
            if value.dim() != 4:
                raise ConfigError(f"pass 'lhep': residual step {graph.index}'s residual_output "
                                  f"{graph.residual_output!r} has shape {tuple(value.shape)}; R_k must be (B, C, h, w)")
            _check_sampled_grid(graph, tuple(captured.scales[graph.index].grid[-2:]))

    def rewrite(self, captured) -> list[GraphEdit]:
        lhep_scales = self.scales(len(captured.scales))
        if not lhep_scales:
            return []
        fixed = self.fixed_fractions(len(captured.scales), lhep_scales)
        first = min(lhep_scales)
        tokens0 = captured.scales[0]
        rows = next(n for n in tokens0.module.graph.nodes if n.op == "placeholder" and n.target == tokens0.token_input)
        total_rows = rows.meta["val"].shape[0]
        batch = captured.plan.cfg_batch or total_rows
        edits = []
        ran = len(captured.residual)  # scales that run (``num_scales``); later graphs are never called
        for scale in captured.scales[first:ran]:
            rule = None
            if scale.index in lhep_scales:
                rule = (fixed_keep_mask, fixed[scale.index]) if fixed else (keep_mask, self.config.rho)
            example = self.previous_residual_example(captured, scale.index) if rule else None
            edits.append(_rewrite_scale(scale, batch, total_rows, rule, example))
        for graph in captured.residual[first - 1:]:
            edits.append(_rewrite_residual(graph, captured.scales[graph.index].grid, graph.index in lhep_scales))
        return edits

    @staticmethod
    def previous_residual_example(captured, scale_index: int) -> torch.Tensor:
        """Example R_{k-1} for export: random on the previous residual step's R_k shape, with a flat (zero)
        quarter so that the two export checks keep different token counts."""
        graph = captured.residual[scale_index - 1]
        value = _output_value(graph, graph.residual_output)
        return torch.randn(value.shape, generator=torch.Generator().manual_seed(scale_index)).to(value.dtype)

    def fixed_fractions(self, n_scales: int, lhep_scales: tuple[int, ...]) -> Optional[dict[int, float]]:
        """The benchmark-only kept fraction per LHEP scale, or None (the rho rule). It must name every LHEP scale."""
        if self.config.keep_fraction is None:
            return None
        fractions = {}
        for scale, fraction in self.config.keep_fraction.items():
            if not -n_scales <= scale < n_scales:
                raise ConfigError(f"lhep.keep_fraction: scale {scale} is outside the schedule's {n_scales} scales")
            fractions[scale % n_scales] = fraction
        if set(fractions) != set(lhep_scales):
            raise ConfigError(f"lhep.keep_fraction names scales {sorted(fractions)} but LHEP acts on {list(lhep_scales)}")
        return fractions

    def runtime(self, captured) -> "LHEPRuntime":
        return LHEPRuntime(captured)


def _check_sampled_grid(graph, grid: tuple[int, int]) -> None:
    """The declared (height, width) dimensions of the drawn values must hold the token grid (or a multiple)."""
    placeholder = next((n for n in graph.module.graph.nodes if n.op == "placeholder" and n.target == graph.sampled_input),
                       None)
    if placeholder is None:
        raise ConfigError(f"pass 'lhep': residual step {graph.index} has no input {graph.sampled_input!r} "
                          f"(its inputs: {graph.input_names})")
    shape = tuple(placeholder.meta["val"].shape)
    axes = graph.sampled_axes
    fits = len(axes) == 2 and all(0 < a < len(shape) for a in axes) and axes[0] != axes[1] and all(
        shape[a] % g == 0 for a, g in zip(axes, grid))
    if not fits:
        raise ConfigError(f"pass 'lhep': residual step {graph.index} declares sampled_axes {axes} of "
                          f"{graph.sampled_input!r} {shape}, which do not hold the token grid {grid} (or a multiple)")


def _output_value(graph, name: str) -> torch.Tensor:
    """The meta value of ``graph``'s output ``name``."""
    output = next(n for n in reversed(graph.module.graph.nodes) if n.op == "output")
    if name not in graph.output_names:
        raise ConfigError(f"pass 'lhep': step {graph.index} has no output {name!r} (outputs: {graph.output_names})")
    return output.args[0][graph.output_names.index(name)].meta["val"]


def _nodes(graph: torch.fx.Graph) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in graph.nodes}


def _tag(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return tag(node, "lhep", role)


def _first_attention(scale) -> torch.fx.Node:
    attention = [n for n in scale.module.graph.nodes if n.target is F.scaled_dot_product_attention]
    if not attention:
        raise ConfigError(f"pass 'lhep': scale {scale.index} has no scaled_dot_product_attention to mask")
    return attention[0]


def _history_examples(scale, total_rows: int) -> list[torch.Tensor]:
    """Key-validity records for export: every earlier key valid, and one with every third one hidden."""
    first = _first_attention(scale)
    key = first.args[1] if len(first.args) > 1 else first.kwargs["key"]
    earlier = key.meta["val"].shape[-2] - scale.tokens  # the cache holds the earlier scales' keys
    all_valid = torch.ones(total_rows, earlier, dtype=torch.bool)
    some_hidden = all_valid.clone()
    some_hidden[:, 1::3] = False
    return [all_valid, some_hidden]


def _rewrite_scale(scale, batch: int, total_rows: int, rule: Optional[tuple], previous_example=None) -> dict:
    """``rule``: (mask function, its parameter) at an LHEP scale; None at later-scale graphs that only need the
    attention mask and the key-validity record. ``previous_example``: an example R_{k-1} (export)."""
    module, graph = scale.module, scale.module.graph
    nodes = _nodes(graph)
    tokens = nodes[scale.aliases.get(scale.token_input, scale.token_input)]
    active = nodes[scale.active_rows] if scale.active_rows else None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    history = add_input(graph, "lhep_history", placeholders[-1], "lhep", "kv_validity_input",
                        _history_examples(scale, total_rows))
    added = [history]
    scale.input_names = scale.input_names + ["lhep_history"]
    anchor = tokens if tokens.op != "placeholder" else history
    valid = index = keep = None
    if rule is not None:
        flat = previous_example.clone()
        flat[..., : flat.shape[-1] // 2] = 0  # a flat region: fewer tokens kept in the second check
        previous = add_input(graph, "lhep_prev_codes", history, "lhep", "residual_input", [previous_example, flat])
        scale.input_names = scale.input_names + ["lhep_prev_codes"]
        anchor = tokens if tokens.op != "placeholder" else previous
        grid = tuple(scale.grid[-2:])
        with graph.inserting_after(anchor):
            energy = _tag(graph.call_function(lhep_energy, (previous, grid)), "mask")
        with graph.inserting_after(energy):
            keep = _tag(graph.call_function(rule[0], (energy, rule[1])), "mask")
        selection, index, valid, gathered = insert_token_gather(graph, keep, active, batch, tokens, scale.token_axis,
                                                                "lhep")
        added += [previous, energy, keep, selection, index, valid, gathered]
        propagate_axis(graph, gathered, 0, total_rows if active is None else tokens.meta["val"].shape[0], key="row_axis")
        added += gather_side_values(scale, graph, index, valid, "lhep")
        changed = generalize_axis(module, gathered, scale.token_axis, scale.tokens, key="token_axis",
                                  role="kept_token_count", keep_roles=("token_side_input",))  # gathered after the slice
    else:
        changed = []
    attention = [n for n in graph.nodes if n.target is F.scaled_dot_product_attention]
    first = _first_attention(scale)
    key = first.args[1] if len(first.args) > 1 else first.kwargs["key"]
    with graph.inserting_before(first):
        mask = _tag(graph.call_function(attention_mask, (key, valid, history, active)), "attention_mask")
    for node in attention:
        node.kwargs = {**node.kwargs, "attn_mask": mask}
    added.append(mask)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = list(output.args[0])
    logits_position = scale.output_names.index(scale.logits_output)
    logits = values[logits_position]
    with graph.inserting_before(output):
        new_history = _tag(graph.call_function(extend_history, (history, valid, active, total_rows, key)), "kv_validity")
        extras, names = [new_history], ["lhep_history_out"]
        if index is not None:
            _fill_token_validity(graph, valid)
            full = _tag(graph.call_function(scatter_tokens, (logits, index, valid, scale.tokens)), "scatter_logits")
            values[logits_position] = full
            extras.append(keep)
            names.append("lhep_keep")
            added.append(full)
    added.append(new_history)
    output.args = (tuple(values),)
    add_outputs(scale, list(zip(names, extras)))
    graph.lint()
    module.recompile()
    return GraphEdit("lhep", "scale", scale.index, added=tuple(n.name for n in added), generalized=tuple(changed),
                     rewired=(tokens.name,) if index is not None else ())


def insert_token_gather(graph: torch.fx.Graph, keep: torch.fx.Node, active: Optional[torch.fx.Node], batch: int,
                        tokens: torch.fx.Node, token_axis: int, pass_name: str,
                        spared: tuple[torch.fx.Node, ...] = ()) -> tuple[torch.fx.Node, ...]:
    """After ``keep``: each running row's kept positions (``select_tokens`` of the ``keep`` mask), their index and
    validity, and ``tokens`` gathered with them; every other use of ``tokens`` (but ``spared``, e.g. the node that
    scored them) reads the gathered tokens. Returns (selection, index, valid, gathered), tagged ``pass_name``."""
    with graph.inserting_after(keep):
        selection = tag(graph.call_function(select_tokens, (keep, active, batch, tokens)), pass_name, "select")
    with graph.inserting_after(selection):
        index = tag(graph.call_function(operator.getitem, (selection, 0)), pass_name, "select")
    with graph.inserting_after(index):
        valid = tag(graph.call_function(operator.getitem, (selection, 1)), pass_name, "select")
    with graph.inserting_after(valid):
        gathered = tag(graph.call_function(gather_tokens, (tokens, index, valid, token_axis, 0)), pass_name, "gather")
    tokens.replace_all_uses_with(gathered, delete_user_cb=lambda user: user not in (selection, gathered, *spared))
    copy_token_meta(tokens, gathered)
    return selection, index, valid, gathered


def copy_token_meta(source: torch.fx.Node, target: torch.fx.Node) -> None:
    """``target`` stands for ``source`` (same shape and axes, possibly fewer tokens or rows)."""
    target.meta.update({k: v for k, v in source.meta.items() if k != "graphsurgeon"})
    annotations(target).update({k: v for k, v in annotations(source).items() if k.startswith(("token_axis", "row_axis"))})


def gather_side_values(scale, graph: torch.fx.Graph, index: torch.fx.Node, valid: torch.fx.Node,
                       pass_name: str) -> list[torch.fx.Node]:
    """Gather every per-token side value the token-axis analysis found (position tables and the like) with the
    tokens' ``index``, per row (its batch dimension read where it meets the gathered tokens). Side values that
    are the same computation are gathered once (every block slices the same position rows). Returns the nodes
    added, tagged ``pass_name``/"gather_side_input"; shared by the passes that gather tokens."""
    nodes = _nodes(graph)
    added, done, gathered_by_expression, expressions = [], set(), {}, {}
    mutated = {n.args[0] for n in graph.nodes if n.target is operator.setitem}
    for value_name, axis, meets in scale.side_values:
        if value_name in done or value_name not in nodes:
            continue
        done.add(value_name)
        value = nodes[value_name]
        row_axis = side_row_axis(scale, value, nodes[meets], pass_name)
        expression = (_expression(value, mutated, expressions), axis, row_axis)
        side = gathered_by_expression.get(expression) if expression[0] is not None else None
        if side is None:
            with graph.inserting_after(value):
                side = tag(graph.call_function(gather_tokens, (value, index, valid, axis, row_axis)), pass_name,
                           "gather_side_input")
            gathered_by_expression[expression] = side
            added.append(side)
        value.replace_all_uses_with(side, delete_user_cb=lambda user: user is not side)
    return added


def side_row_axis(scale, value: torch.fx.Node, meet: torch.fx.Node, pass_name: str) -> int:
    """The batch dimension of side value ``value``, read where it meets the tokens (``meet``, annotated
    ``row_axis``); negative when the value lacks leading dimensions the tokens have."""
    meet_row = annotations(meet).get("row_axis")
    if not isinstance(meet_row, int):
        raise ConfigError(f"pass '{pass_name}': scale {scale.index}: cannot tell the batch dimension where side "
                          f"input {value.name} meets the tokens ({meet.name})")
    return meet_row - (meet.meta["val"].dim() - value.meta["val"].dim())


def _fill_token_validity(graph: torch.fx.Graph, valid: torch.fx.Node) -> None:
    """Nodes that reduce over the (now padded) token positions get each row's validity (rewrite.TOKEN_VALIDITY_ARG)."""
    for node in graph.nodes:
        position = annotations(node).get(TOKEN_VALIDITY_ARG)
        if position is not None:
            args = list(node.args)
            args[position] = valid
            node.args = tuple(args)


def _expression(node: torch.fx.Node, mutated: set, memo: dict) -> Optional[tuple]:
    """A structural key of the computation behind ``node`` (equal keys: equal values), or None when the way
    there has a module call or a tensor written to in place (then two equal-looking reads may differ)."""
    if node not in memo:
        if node in mutated or node.op == "call_module":
            key = None
        elif node.op in ("placeholder", "get_attr"):
            key = (node.op, node.target)
        elif None in [_expression(a, mutated, memo) for a in node.all_input_nodes]:
            key = None
        elif node.op == "call_method" and node.target == "to" and isinstance(node.args[0], torch.fx.Node):
            inner = memo[node.args[0]]
            settings = repr(torch.fx.node.map_arg((node.args[1:], node.kwargs), lambda a: memo[a]))
            key = inner if inner[:2] == ("to", settings) else ("to", settings, inner)  # x.to(a).to(a) is x.to(a)
        else:
            key = (node.op, node.target, repr(torch.fx.node.map_arg((node.args, node.kwargs), lambda a: memo[a])))
        memo[node] = key
    return memo[node]


def _rewrite_residual(scale, grid: tuple, prune: bool) -> GraphEdit:
    """At an LHEP scale, the drawn values become Eq. 14's mix of them and R_{k-1}'s; at every residual step from
    the one before the first LHEP scale on, the values used are an output (the next LHEP scale's R_{k-1})."""
    module, graph = scale.module, scale.module.graph
    sampled = next(n for n in graph.nodes if n.op == "placeholder" and n.target == scale.sampled_input)
    result, added = sampled, []
    if prune:
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        value = sampled.meta["val"]
        generator = torch.Generator().manual_seed(scale.index)
        keep_example = torch.rand(value.shape[0], grid[-2] * grid[-1], generator=generator) < 0.5
        keep = add_input(graph, "lhep_keep", last, "lhep", "mask_input", [keep_example])
        previous_example = torch.randint(0, 2, tuple(value.shape), generator=generator).to(value.dtype)
        previous = add_input(graph, "lhep_prev_sampled", keep, "lhep", "residual_input", [previous_example])
        with graph.inserting_after(previous):
            result = _tag(graph.call_function(residual_scatter, (sampled, keep, previous, tuple(grid[-2:]),
                                                                 tuple(scale.sampled_axes))), "scatter_residual")
        sampled.replace_all_uses_with(result, delete_user_cb=lambda user: user is not result)
        scale.input_names = scale.input_names + ["lhep_keep", "lhep_prev_sampled"]
        added = [keep, previous, result]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    output.args = (tuple(output.args[0]) + (result,),)
    scale.output_names = scale.output_names + [scale.sampled_input]
    graph.lint()
    module.recompile()
    return GraphEdit("lhep", "residual", scale.index, added=tuple(n.name for n in added),
                     rewired=(sampled.name,) if prune else ())


class LHEPRuntime(PassRuntime):
    """Carries R_{k-1}, the drawn values, the keep masks and the key-validity record between the graphs of one
    ``generate``.

    Stats, one entry per scale: ``scale``, ``tokens``, ``kept`` (per sample; None where LHEP does not act),
    ``width`` (the padded count every running row computes), ``grid`` ([h, w], the token grid) and ``mask``:
    per sample, h strings of w characters, "1" where the token was kept (row-major, the tokens' order), None
    where LHEP does not act. Strings, not tensors, because stats go to JSON manifests and the diff report draws
    them; a 64x64 grid costs 4 KiB per sample."""

    def __init__(self, captured):
        super().__init__()
        self.tokens = [s.tokens for s in captured.scales]
        self.grids = [tuple(s.grid[-2:]) for s in captured.scales]
        self.previous_residual = self.previous_sampled = self.keep = self.history = None

    def inputs(self, graph, region: str, device: torch.device) -> dict:
        offered = ({"lhep_prev_codes": self.previous_residual, "lhep_history": self.history} if region == "scale"
                   else {"lhep_keep": self.keep, "lhep_prev_sampled": self.previous_sampled})
        return {name: value for name, value in offered.items() if name in graph.input_names}

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region != "scale":
            self.previous_residual = outputs[graph.residual_output]
            self.previous_sampled = outputs[graph.sampled_input]
            return
        self.history = outputs.get("lhep_history_out", self.history)
        self.keep = outputs.get("lhep_keep")
        kept = self.keep.sum(dim=1).tolist() if self.keep is not None else None
        width = max(kept) if kept else None  # every row that runs computes this many token positions (padding)
        grid = self.grids[graph.index]
        mask = self._mask_rows(self.keep, grid) if self.keep is not None else None
        self.stats.append({"scale": graph.index, "tokens": self.tokens[graph.index], "kept": kept, "width": width,
                           "grid": list(grid), "mask": mask})

    @staticmethod
    def _mask_rows(keep: torch.Tensor, grid: tuple[int, int]) -> list[list[str]]:
        """(B, h*w) bool -> per sample, h strings of w "0"/"1" characters."""
        height, width = grid
        codes = (keep.reshape(-1, height, width).to(torch.uint8) + ord("0")).cpu()
        return [[bytes(row.tolist()).decode("ascii") for row in sample] for sample in codes]


# -- nodes the rewrite inserts ----------------------------------------------------------------------------
def lhep_energy(previous_residual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """R_{k-1} (B, C, h', w') -> (B, h*w) token energies on this scale's grid."""
    return energy_map(previous_residual, grid).flatten(1)


def select_tokens(keep: torch.Tensor, rows: Optional[torch.Tensor], batch: int, tokens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the kept token positions (ascending), padded to the largest count, and their validity.

    ``rows`` are the batch rows that run (row r belongs to sample r % batch: conditional rows first, then the
    unconditional ones). Padding repeats skipped positions, so every row's index is part of a permutation.
    The permutation (kept first, then skipped, each in position order) comes from cumulative counts, not a
    stable sort, so that torch.export and ONNX trace it as it is; the width is a data-dependent size there.
    """
    rows = _rows(rows, tokens)
    counts = keep.sum(dim=1)
    width = counts.max().item()
    torch._check(width >= 1)
    torch._check(width <= keep.shape[1])
    flags = keep.long()
    rank = torch.where(keep, flags.cumsum(dim=1) - 1, counts[:, None] + (1 - flags).cumsum(dim=1) - 1)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(rank).contiguous()
    order = torch.zeros_like(rank).scatter(1, rank, positions)
    samples = rows % batch
    index = order[:, :width].index_select(0, samples)
    valid = (torch.arange(width, device=keep.device)[None, :] < counts[:, None]).index_select(0, samples)
    return index, valid


def _with_row_axis(value: torch.Tensor, axis: int, row_axis: int) -> tuple[torch.Tensor, int, int]:
    """A negative ``row_axis``: the value lacks that many leading dimensions; add them (size 1)."""
    if row_axis < 0:
        return value.reshape((1,) * -row_axis + tuple(value.shape)), axis - row_axis, 0
    return value, axis, row_axis


def gather_tokens(value: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, axis: int, row_axis: int) -> torch.Tensor:
    """Entries ``index`` (rows, K) of ``value`` along ``axis``, per row (``row_axis``; size 1 is broadcast;
    a negative ``row_axis`` means the value has that many leading dimensions fewer than the rows' tensor)."""
    value, axis, row_axis = _with_row_axis(value, axis, row_axis)
    if index.shape[1] == value.shape[axis] and bool(valid.all()) and bool(
            (index == torch.arange(index.shape[1], device=index.device)).all()):
        return value  # nothing pruned: the graph computes exactly what it did before
    return _gather_rows(value, index, axis, row_axis)


@export_form(gather_tokens)
def gather_tokens_traceable(value: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, axis: int,
                            row_axis: int) -> torch.Tensor:
    """:func:`gather_tokens` without the data-dependent shortcut."""
    value, axis, row_axis = _with_row_axis(value, axis, row_axis)
    return _gather_rows(value, index, axis, row_axis)


def _gather_rows(value: torch.Tensor, index: torch.Tensor, axis: int, row_axis: int) -> torch.Tensor:
    shape = list(value.shape)
    shape[row_axis] = index.shape[0]
    value = value.expand(shape)
    view = [1] * value.dim()
    view[row_axis], view[axis] = index.shape[0], index.shape[1]
    shape[axis] = index.shape[1]
    return torch.gather(value, axis, index.reshape(view).expand(shape))


def scatter_tokens(value: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, tokens: int) -> torch.Tensor:
    """(rows, K, V) -> (rows, tokens, V): each row's valid entries back at their positions, zeros elsewhere
    (padding is dropped, so a row's result does not depend on the other rows of the batch)."""
    if value.shape[1] == tokens and bool(valid.all()) and bool((index == torch.arange(tokens, device=index.device)).all()):
        return value
    return scatter_tokens_traceable(value, index, valid, tokens)


@export_form(scatter_tokens)
def scatter_tokens_traceable(value: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, tokens: int) -> torch.Tensor:
    """:func:`scatter_tokens` without the data-dependent shortcut."""
    out = value.new_zeros(value.shape[0], tokens, *value.shape[2:])
    kept = value.masked_fill(~valid.reshape(*valid.shape, *([1] * (value.dim() - 2))), 0)
    return out.scatter(1, index.reshape(*index.shape, *([1] * (value.dim() - 2))).expand_as(value), kept)


def _rows(rows: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return rows if rows is not None else torch.arange(like.shape[0], device=like.device)


def attention_mask(key: torch.Tensor, valid: Optional[torch.Tensor], history: Optional[torch.Tensor],
                   rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Additive key mask (rows, 1, 1, L) hiding padded tokens of this scale and skipped ones of earlier
    scales; ``None`` (no mask) when every key is valid, so unpruned graphs stay exactly as captured."""
    allowed = _allowed_keys(key, valid, history, rows)
    if bool(allowed.all()):
        return None
    return _additive_mask(allowed, key)


@export_form(attention_mask)
def attention_mask_traceable(key: torch.Tensor, valid: Optional[torch.Tensor], history: Optional[torch.Tensor],
                             rows: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`attention_mask` that always returns the mask (a zero mask when every key is valid)."""
    return _additive_mask(_allowed_keys(key, valid, history, rows), key)


def _allowed_keys(key: torch.Tensor, valid: Optional[torch.Tensor], history: Optional[torch.Tensor],
                  rows: Optional[torch.Tensor]) -> torch.Tensor:
    rows = _rows(rows, key)
    length = key.shape[-2]
    current = valid if valid is not None else torch.ones(key.shape[0], 0, dtype=torch.bool, device=key.device)
    earlier = history.index_select(0, rows) if history is not None else torch.ones(
        rows.numel(), length - current.shape[1], dtype=torch.bool, device=key.device)
    return torch.cat([earlier, current], dim=1)


def _additive_mask(allowed: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=key.dtype, device=key.device).masked_fill(~allowed, float("-inf"))[:, None, None, :]


def extend_history(history: Optional[torch.Tensor], valid: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                   total_rows: int, key: torch.Tensor) -> torch.Tensor:
    """The key-validity record over every batch row after this scale (rows that did not run count as valid),
    as long as the KV cache (``key``'s length): earlier scales without a record count as valid."""
    rows = _rows(rows, key)
    length = key.shape[-2]
    width = valid.shape[1] if valid is not None else length - (history.shape[1] if history is not None else 0)
    if history is None:
        history = torch.ones(total_rows, length - width, dtype=torch.bool, device=key.device)
    new = torch.ones(total_rows, width, dtype=torch.bool, device=key.device)
    if valid is not None:
        new[rows] = valid
    return torch.cat([history, new], dim=1)


def residual_scatter(sampled: torch.Tensor, keep: torch.Tensor, previous: torch.Tensor, grid: tuple[int, int],
                     axes: tuple[int, int]) -> torch.Tensor:
    """Eq. 14: kept positions take this scale's drawn values, skipped ones the previous scale's, upsampled (nearest).

    ``sampled`` and ``previous``: batch first, their (height, width) at ``axes`` (any other dimensions, e.g. the
    channels of a code, ride along); keep (B, h*w) on the token grid, whose size the drawn grid may be a multiple of
    (e.g. 2x2 values per token). Binary, categorical and float values alike: nothing is rounded."""
    if bool(keep.all()):
        return sampled
    x = sampled.movedim(axes, (-2, -1))
    height, width = x.shape[-2:]
    base = _nearest(previous.movedim(axes, (-2, -1)), (height, width)).to(sampled.dtype)
    mask = F.interpolate(keep.reshape(keep.shape[0], 1, *grid).float(), size=(height, width), mode="nearest").bool()
    mask = mask.reshape(keep.shape[0], *([1] * (x.dim() - 3)), height, width)
    return torch.where(mask, x, base).movedim((-2, -1), axes)


def _nearest(value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of the last two dimensions, exact for any dtype (integers go through a float type that
    holds them exactly)."""
    work = value if value.is_floating_point() else value.to(torch.float32 if value.element_size() <= 2 else torch.float64)
    flat = work.reshape(-1, 1, *work.shape[-2:])
    return F.interpolate(flat, size=size, mode="nearest").reshape(*work.shape[:-2], *size)
