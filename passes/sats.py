"""SATS (semantic-adaptive termination), LD-Pruning's "when to stop" for the unconditional CFG branch.

At every SATS scale where a sample's two branches both ran, its discrepancy is
``Delta_k = RMS(cond_logits - uncond_logits)`` over the scale's tokens and logits: every token of the scale,
or at a scale where another pass computes a subset of the tokens (LHEP), the sample's own kept tokens only,
never the padding that makes the rows of a batch equally long (so a sample's Delta does not depend on the
other samples of its batch). The RMS (not the paper's
plain L2 norm) keeps Delta independent of the token count, which grows from scale to scale and shrinks
under LHEP. Then ``gamma_k = |Delta_k - Delta_prev| / (Delta_prev + eps)`` with Delta_prev from the previous
scale where both branches ran; at the first such scale there is no Delta_prev and no stop (the paper's
Delta_0 = 0 convention gives the same). Once ``gamma_k < delta`` the sample's unconditional branch is not
computed for any later scale; its guidance uses the conditional logits. Each sample of a batch decides alone.

Model-neutral: the pass reads the CFG layout (``cfg_batch``: rows [0:B] conditional, [B:2B] unconditional), the
per-row inputs, the optional packed per-row input and the logits from the roles the adapter declares, and it
never mixes the branches itself: the guided logits of the samples still running come from the sampler's own
rule (``runner.guide``), so any mix (``cfg*c + (1-cfg)*u``, a ramp ``(1+t)*c - t*u``, ...) is kept.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from pydantic import Field

from graphsurgeon.capture.dynamic import generalize_axis
from graphsurgeon.capture.token_axes import propagate_axis
from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotate, annotations
from graphsurgeon.passes import ScaleList, GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import TOKEN_VALIDITY_ARG, add_input, add_outputs, export_form
from graphsurgeon.runner import GuidanceRule, PassRuntime


def branch_discrepancy(cond: torch.Tensor, uncond: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, n, V) logits of both branches -> (B,) RMS of their difference, over the positions ``valid`` (B, n)
    marks (all when None)."""
    squared = (cond.float() - uncond.float()).pow(2)
    if valid is None:
        return squared.flatten(1).mean(dim=1).sqrt()
    weights = valid.reshape(*valid.shape, *([1] * (squared.dim() - 2))).to(squared.dtype)
    count = valid.sum(dim=1).to(squared.dtype) * math.prod(squared.shape[2:])
    return ((squared * weights).flatten(1).sum(dim=1) / count).sqrt()


@dataclass
class GuardState:
    """Per-sample record of the CFG-branch guard across scales."""

    batch: int
    previous: Optional[torch.Tensor] = None
    stopped: torch.Tensor = field(default=None)  # type: ignore[assignment]
    stop_scale: list[Optional[int]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopped = torch.zeros(self.batch, dtype=torch.bool)
        self.stop_scale = [None] * self.batch

    def observe(self, scale: int, delta: torch.Tensor, running: torch.Tensor, threshold: float, eps: float) -> None:
        """Record Delta of the samples whose branches both ran (``running``), and stop those that converged."""
        delta = delta.detach().float().cpu()
        gamma = torch.full_like(delta, float("nan"))
        if self.previous is not None:
            has_previous = running & ~torch.isnan(self.previous)
            gamma[has_previous] = (delta[has_previous] - self.previous[has_previous]).abs() / (
                self.previous[has_previous] + eps)
            stop = has_previous & (gamma < threshold)
            for b in stop.nonzero().flatten().tolist():
                self.stop_scale[b] = scale
            self.stopped |= stop
        previous = self.previous if self.previous is not None else torch.full_like(delta, float("nan"))
        self.previous = torch.where(running, delta, previous)
        self.history.append({"scale": scale, "delta": delta.where(running, torch.tensor(float("nan"))).tolist(),
                             "gamma": gamma.tolist(), "stopped": self.stopped.tolist()})


class SATSConfig(PassConfig):
    delta: float = Field(0.15, ge=0.0, description="stop once the relative change of Delta falls below this")
    eps: float = Field(1e-8, gt=0.0, description="added to Delta_prev in gamma's denominator")
    scales: ScaleList = Field(None, description="scale indices (negative from the end), each once")
    last: int = Field(4, ge=0, description="without `scales`: the last this many scales")
    stop_scale: Optional[int] = Field(
        None, description="benchmark-only fixed operating point: every sample stops its unconditional branch at this "
                          "SATS scale (negative from the end; no branch from the next scale on) whatever delta says")


@register_pass
class SATS(GraphPass):
    """Inserts the CFG-branch guard at the entry of every scale from the first SATS scale on, and the
    discrepancy at the exit of SATS scales; makes those graphs generic in their batch rows and packed rows."""

    name: ClassVar[str] = "sats"
    Config: ClassVar[type[PassConfig]] = SATSConfig
    runs_before: ClassVar[tuple[str, ...]] = ("lhep", "stepvar", "depthvar", "fastvar", "sparvar")  # they act on the rows the guard lets through
    provides: ClassVar[tuple[str, ...]] = ("row_selection",)
    traits: ClassVar[tuple[str, ...]] = ("per_scale_outputs",)  # the guard's rows of each SATS scale

    def requires(self, captured) -> None:
        """CFG on a doubled batch, and on every guarded scale: the per-row inputs, the logits, and state whose
        rows run along its first dimension (the guard selects the running rows of each)."""
        if captured.plan.cfg_batch is None:
            raise ConfigError("pass 'sats' needs classifier-free guidance on a doubled batch (the capture plan "
                              "declares no cfg_batch: is guidance off, e.g. cfg = 1?)")
        sats_scales = self.scales(len(captured.scales))
        self.fixed_stop(len(captured.scales))  # a bad stop scale is refused before any graph is edited
        if not sats_scales:
            return
        for scale in captured.scales[min(sats_scales):]:
            if not scale.row_inputs or scale.logits_output is None:
                raise ConfigError(f"pass 'sats': scale {scale.index} declares no row_inputs / logits_output (the "
                                  "per-row inputs the guard selects, the logits it compares)")
        rowwise = [slot.name for slot in captured.state if slot.row_axis != 0]
        if rowwise:
            raise ConfigError(f"pass 'sats': state {rowwise} does not run over the batch rows along dimension 0; "
                              "the guard cannot select its running rows")

    def rewrite(self, captured) -> list[GraphEdit]:
        sats_scales = self.scales(len(captured.scales))
        if not sats_scales:
            return []
        return [_rewrite_scale(scale, captured.plan.cfg_batch, scale.index in sats_scales)
                for scale in captured.scales[min(sats_scales):]]

    def fixed_stop(self, n_scales: int) -> Optional[int]:
        """The benchmark-only stop scale (a SATS scale other than the last), or None (the delta rule)."""
        stop = self.config.stop_scale
        if stop is None:
            return None
        sats_scales = self.scales(n_scales)
        if not -n_scales <= stop < n_scales or stop % n_scales not in sats_scales[:-1]:
            raise ConfigError(f"sats.stop_scale={stop} must be a SATS scale before the last ({list(sats_scales[:-1])}): "
                              "a stop saves work from the next scale on")
        return stop % n_scales

    def runtime(self, captured) -> "SATSRuntime":
        n_scales = len(captured.scales)
        return SATSRuntime(captured.plan.cfg_batch, set(self.scales(n_scales)), self.config, self.fixed_stop(n_scales))


def _rewrite_scale(scale, batch: int, with_discrepancy: bool) -> GraphEdit:
    guard, active, changed, selected = insert_row_guard(scale, batch, "sats")
    graph = scale.module.graph
    output_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    extras, names = [active], ["sats_active_rows"]
    if with_discrepancy:
        logits = output_node.args[0][scale.output_names.index(scale.logits_output)]
        with graph.inserting_before(output_node):
            delta = graph.call_function(guard_discrepancy, (logits, active, batch, None))
        annotate(delta, **{"pass": "sats", "role": "branch_discrepancy", TOKEN_VALIDITY_ARG: 3})
        extras.append(delta)
        names.append("sats_delta")
    add_outputs(scale, list(zip(names, extras)))
    graph.lint()
    scale.module.recompile()
    return GraphEdit("sats", "scale", scale.index, added=(guard.name, *(n.name for n in extras), *selected),
                     rewired=tuple(scale.row_inputs) + tuple(scale.packed_inputs or ()) + tuple(scale.state_inputs),
                     generalized=tuple(changed))


def insert_row_guard(scale, batch: int, pass_name: str, halting: bool = False
                     ) -> tuple[torch.fx.Node, torch.fx.Node, list[str], list[str]]:
    """The CFG-row guard at the entry of ``scale`` for ``pass_name``: inputs ``<pass>_stopped`` (B,) (samples
    whose unconditional row no longer runs), with ``halting`` also ``<pass>_halted`` (B,) (samples none of whose
    rows run), and ``<pass>_cache_rows`` (the rows the KV caches hold); every per-row input, packed input and
    cache read through the guard; batch-row literals made generic; per-row constants selected. Returns (guard,
    running rows, generalized nodes, selected constants)."""
    module = scale.module
    graph = module.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    rows = [placeholders[name] for name in scale.row_inputs]
    packed = [placeholders[name] for name in scale.packed_inputs or ()]
    caches = [placeholders[name] for name in scale.state_inputs]
    last = list(placeholders.values())[-1]
    none_stopped = torch.zeros(batch, dtype=torch.bool)
    first_stopped = none_stopped.clone()
    first_stopped[0] = True  # export checks the guard with every row running, then with a row dropped
    stopped = add_input(graph, f"{pass_name}_stopped", last, pass_name, "guard_input", [none_stopped, first_stopped])
    flags, names = [stopped], [f"{pass_name}_stopped"]
    if halting:
        halted = add_input(graph, f"{pass_name}_halted", stopped, pass_name, "guard_input", [none_stopped, none_stopped])
        flags.append(halted)
        names.append(f"{pass_name}_halted")
    cache_rows = add_input(graph, f"{pass_name}_cache_rows", flags[-1], pass_name, "guard_input", [torch.arange(2 * batch)])
    with graph.inserting_after(cache_rows):
        guard = graph.call_function(cfg_branch_guard, (stopped, cache_rows, batch, tuple(rows), tuple(packed),
                                                       tuple(caches), *flags[1:]))
    annotate(guard, **{"pass": pass_name, "role": "cfg_branch_guard"})
    outputs, previous = {}, guard
    for i, original in enumerate(["active"] + rows + packed + caches):
        with graph.inserting_after(previous):
            item = graph.call_function(operator.getitem, (guard, i))
        previous = item
        if original != "active":
            original.replace_all_uses_with(item, delete_user_cb=lambda user: user is not guard)
            item.meta.update({k: v for k, v in original.meta.items() if k != "graphsurgeon"})
            annotations(item).update(annotations(original))
            outputs[original.name] = item
            scale.aliases[original.target] = item.name
        else:
            active = item
            scale.active_rows = item.name
        annotate(item, **{"pass": pass_name, "role": "guarded_input"})
    tokens_rows = outputs[rows[0].name]
    rows_extent = rows[0].meta["val"].shape[0]
    propagate_axis(graph, tokens_rows, 0, rows_extent, key="row_axis")
    changed = generalize_axis(module, tokens_rows, 0, rows_extent, key="row_axis", role="row_count")
    if packed:
        packed_values = outputs[packed[0].name]
        packed_extent = packed[0].meta["val"].shape[0]
        propagate_axis(graph, packed_values, 0, packed_extent, key="packed_row_axis")
        changed += generalize_axis(module, packed_values, 0, packed_extent, key="packed_row_axis",
                                   role="packed_row_count")
    selected = _select_row_constants(module, rows_extent, active, scale.index, pass_name)
    scale.input_names = scale.input_names + names + [f"{pass_name}_cache_rows"]
    return guard, active, changed, selected


def _select_row_constants(module, rows: int, active: torch.fx.Node, scale_index: int, pass_name: str) -> list[str]:
    """Constants made for the full batch (e.g. a per-token index built with ``torch.ones((rows, n))``) get the
    running rows selected like any per-row input; any other constant sized by the batch is refused."""
    selected = []
    for node in list(module.graph.nodes):
        if node.op != "get_attr" or node.target.startswith("model."):
            continue
        value = node.meta.get("val")
        if not (isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows):
            continue
        feeds_side_input = all(annotations(user).get("role") == "token_side_input" for user in node.users)
        if annotations(node).get("role") != "token_side_input" and not feeds_side_input:
            raise ConfigError(f"pass '{pass_name}': scale {scale_index} uses constant '{node.target}' of shape "
                              f"{tuple(value.shape)} made for {rows} batch rows; the guard cannot drop its rows")
        with module.graph.inserting_after(node):
            picked = module.graph.call_method("index_select", (node, 0, active))
        node.replace_all_uses_with(picked, delete_user_cb=lambda user: user is not picked)
        picked.meta.update({k: v for k, v in node.meta.items() if k != "graphsurgeon"})
        annotations(picked).update(annotations(node))
        annotate(picked, **{"pass": pass_name, "role": "guarded_constant"})
        selected.append(picked.name)
    return selected


class SATSRuntime(PassRuntime):
    """Carries the per-sample guard between scales of one ``generate`` and records what ran."""

    def __init__(self, batch: int, sats_scales: set[int], config: SATSConfig, fixed_stop: Optional[int] = None):
        super().__init__()
        self.batch, self.sats_scales, self.config, self.fixed_stop = batch, sats_scales, config, fixed_stop
        self.guard = GuardState(batch)
        self.active: Optional[torch.Tensor] = None

    def inputs(self, graph, region: str, device: torch.device) -> dict[str, torch.Tensor]:
        if region != "scale" or "sats_stopped" not in graph.input_names:
            return {}
        cache_rows = self.active if self.active is not None else torch.arange(2 * self.batch)
        return {"sats_stopped": self.guard.stopped.to(device), "sats_cache_rows": cache_rows.to(device)}

    def observe(self, graph, region: str, outputs: dict[str, torch.Tensor]) -> None:
        if region != "scale":
            return
        scale = graph.index
        active = outputs.get("sats_active_rows")
        self.active = active.cpu() if active is not None else None
        running = self.guard.stopped.logical_not()
        uncond_ran = running.tolist() if active is not None else [True] * self.batch
        record = {"scale": scale, "rows": int(active.numel()) if active is not None else 2 * self.batch,
                  "uncond_ran": uncond_ran, "delta": None, "gamma": None}
        if "sats_delta" in outputs:
            threshold = self.config.delta if self.fixed_stop is None else float("-inf")  # fixed: only stop_scale stops
            self.guard.observe(scale, outputs["sats_delta"], running, threshold, self.config.eps)
            record["delta"], record["gamma"] = self.guard.history[-1]["delta"], self.guard.history[-1]["gamma"]
        if scale == self.fixed_stop:
            self.guard.stop_scale = [s if s is not None else scale for s in self.guard.stop_scale]
            self.guard.stopped[:] = True
        record["stopped_after"] = self.guard.stopped.tolist()
        self.stats.append(record)

    def guide(self, index: int, logits: torch.Tensor, batch: int, rule: GuidanceRule) -> Optional[torch.Tensor]:
        """Only when some unconditional rows did not run: the sampler's rule where both ran, else the
        conditional logits (every row ran: the sampler's own guidance, untouched)."""
        if self.active is None or logits.shape[0] == 2 * batch:
            return None
        return guided_mix(logits, self.active.to(logits.device), batch, rule)


# -- nodes the rewrite inserts ----------------------------------------------------------------------------
def running_rows(stopped: torch.Tensor, batch: int, halted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows that run: the conditional row of every sample not halted, then the unconditional row of each sample
    neither stopped nor halted (ascending)."""
    if halted is None:
        conditional = torch.arange(batch, device=stopped.device)
        return torch.cat([conditional, batch + (~stopped).nonzero().flatten()])
    return torch.cat([(~halted).nonzero().flatten(), batch + (~(stopped | halted)).nonzero().flatten()])


def cfg_branch_guard(stopped: torch.Tensor, cache_rows: torch.Tensor, batch: int, rows: tuple, packed: tuple,
                     caches: tuple, halted: Optional[torch.Tensor] = None) -> tuple:
    """Select the running rows of every per-row input, the packed input and the caches (whose rows are
    ``cache_rows``, the previous scale's running rows). Returns (running rows, *rows, *packed, *caches);
    when every row runs, the inputs come back untouched. ``halted``: samples none of whose rows run."""
    active = running_rows(stopped, batch, halted)
    if active.numel() == 2 * batch and cache_rows.numel() == 2 * batch:
        return (active, *rows, *packed, *caches)
    selected_rows = tuple(t.index_select(0, active) for t in rows)
    running = active.tolist()
    selected_packed = _select_packed(packed, running)
    previous = cache_rows.tolist()
    if previous == running:
        selected_caches = caches  # the caches already hold exactly the running rows (every scale after a stop)
    else:
        positions = [previous.index(r) for r in running]
        if not positions:  # no row runs (every sample halted): empty caches
            selected_caches = tuple(c.narrow(0, 0, 0) for c in caches)
        elif positions == list(range(positions[0], positions[0] + len(positions))):  # e.g. every uncond row stopped
            selected_caches = tuple(c.narrow(0, positions[0], len(positions)) for c in caches)  # a view, no copy
        else:
            index = torch.tensor(positions, device=active.device)
            selected_caches = tuple(c.index_select(0, index) for c in caches)
    return (active, *selected_rows, *selected_packed, *selected_caches)


def _select_packed(packed: tuple, running: list[int]) -> tuple:
    """The running rows' segments of a packed input (values, offsets), re-packed; () when there is none."""
    if not packed:
        return ()
    values, offsets = packed
    bounds = offsets.tolist()  # one copy to the host for all rows (a few integers), not one per row
    segments = [torch.arange(bounds[r], bounds[r + 1], device=values.device) for r in running]
    new_offsets = torch.tensor(list(itertools.accumulate((bounds[r + 1] - bounds[r] for r in running), initial=0)),
                               dtype=offsets.dtype, device=offsets.device)
    index = torch.cat(segments) if segments else torch.zeros(0, dtype=torch.long, device=values.device)
    return values.index_select(0, index), new_offsets


@export_form(cfg_branch_guard)
def cfg_branch_guard_traceable(stopped: torch.Tensor, cache_rows: torch.Tensor, batch: int, rows: tuple, packed: tuple,
                               caches: tuple, halted: Optional[torch.Tensor] = None) -> tuple:
    """:func:`cfg_branch_guard` in tensor operations only (no host copies, no shortcut), for torch.export / ONNX."""
    active = running_rows(stopped, batch, halted)
    cache_position = (cache_rows[None, :] == active[:, None]).to(torch.int8).argmax(dim=1)
    return (active, *(t.index_select(0, active) for t in rows), *_select_packed_traceable(packed, active),
            *(c.index_select(0, cache_position) for c in caches))


def _select_packed_traceable(packed: tuple, active: torch.Tensor) -> tuple:
    if not packed:
        return ()
    values, offsets = packed
    lengths = offsets[1:] - offsets[:-1]
    position = torch.arange(values.shape[0], device=values.device)
    row_of_position = (position[:, None] >= offsets[None, 1:]).sum(dim=1)
    is_running = torch.zeros(lengths.shape[0], dtype=torch.bool, device=values.device).index_fill(0, active, True)
    selected = values.index_select(0, is_running.index_select(0, row_of_position).nonzero().flatten())
    return selected, torch.cat([offsets[:1], lengths.index_select(0, active).cumsum(dim=0).to(offsets.dtype)])


def guard_discrepancy(logits: torch.Tensor, active: torch.Tensor, batch: int,
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Delta per sample (B,) from the running rows' logits; NaN for samples whose unconditional row did not run.
    ``valid`` (running rows, tokens): which token positions of each row are the sample's own (None: all).
    No branch on the number of running rows, so torch.export traces it as it is."""
    running = active[batch:] - batch
    own = valid[:batch].index_select(0, running) if valid is not None else None
    values = branch_discrepancy(logits[:batch].index_select(0, running), logits[batch:], own)
    return torch.full((batch,), float("nan"), device=logits.device).index_put((running,), values.to(torch.float32))


def guided_mix(logits: torch.Tensor, active: torch.Tensor, batch: int, rule: GuidanceRule) -> torch.Tensor:
    """Guidance of the running rows ``active`` (ascending): the sampler's ``rule(cond, uncond)`` for the samples
    whose two branches ran, the conditional logits for those whose conditional row alone ran, zeros for samples
    none of whose rows ran (a halted sample draws from them, and nothing it draws is used)."""
    if logits.shape[0] == 2 * batch:
        return rule(logits[:batch], logits[batch:])
    conditional = active < batch
    samples = active[conditional]
    mixed = logits.new_zeros(batch, *logits.shape[1:])
    mixed[samples] = logits[conditional]
    both = active[~conditional] - batch  # samples whose unconditional row ran (their conditional row ran too)
    if both.numel():
        cond = logits[conditional][torch.searchsorted(samples, both)]
        mixed[both] = rule(cond, logits[~conditional]).to(mixed.dtype)
    return mixed
