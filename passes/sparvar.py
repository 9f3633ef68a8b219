"""SparVAR (arXiv 2602.04361): sparse self-attention over the KV cache at the late scales; every token is kept.

At a SparVAR scale k a query attends only some of the keys in the cache (the condition prefix, if the model
prefills one, then every earlier scale's tokens, then scale k's own). Which ones depends on the layer:

- **CSLA** (cross-scale local sparse attention), layers ``> bound_layer``: a static pattern. Every key of the
  attention-sink scales (the first ``sink_scales`` scales, and the prefix); in each later history scale s with
  a window w_s > 0 the w_s x w_s keys around the query's position rescaled to s's grid; in the query's own
  scale the window of that scale. History scales with window 0 are not attended.
- **CS⁴A** (cross-scale self-similar sparse attention), layers ``<= bound_layer``: at the *decision scale* D the
  attention stays dense, but for each (row, layer, head, query group) the ``key_fraction`` of the cache keys
  holding the most attention mass of the group's queries are recorded. At a later scale each query reuses the
  keys of the decision group its position falls in (rescaled to D's grid), plus a local window in every scale
  after D up to its own (``local_windows``), plus the sink scales.

Positions and grids come from the captured schedule (``captured.scales[i].grid``), never from widths. A window
around a query at (y, x) of an h_k x w_k grid is centred on scale s's grid at (round(y / h_k * h_s),
round(x / w_k * w_s)) in float32, ties to even, as the mask of the implementation peers.md cites does (Lvar,
``models/sparvar/basic_sparvar.py``; :func:`window_centre`); a window of odd size w covers offsets -(w-1)/2 ..
(w-1)/2 there and is clipped at the grid's border (a corner query sees fewer keys, never shifted ones). The
CS⁴A decision group of a query is that of the decision-grid cell its position falls in (floor(y * h_D / h_k),
floor(x * w_D / w_k)), always on the grid. Query groups are ``query_group`` consecutive positions of D's grid
in row-major order (the authors' 192, their kernel's query block).

Choices where the paper (as summarised in peers.md) is silent or the authors' code is kernel-bound:
- the defaults name widths of a 13-scale schedule; here ``windows`` and ``local_windows`` give the windows of
  the *last* len(...) scales of whatever schedule was captured (the last entry is the last scale), and
  ``bound_layer`` defaults to the authors' 10 of a 32-block model scaled to the captured depth:
  ``round(10 * (depth - 1) / 31)``;
- CS⁴A reuses per query (each query its group's keys plus the windows around its own position), not per
  query block (the kernel's union of a block's windows);
- the scales between D and the query's scale are attended through their ``local_windows`` (the authors carry
  the previous sparse scale's window indices forward); the sink scales are always attended, so that no query
  is left without a key when LHEP hides its own one;
- the O-cache correction (adding the upsampled contribution of the unselected keys) is not done: the output
  is the masked attention, which is the exactness reference of this pass;
- the attention runs dense with a mask (a reference that runs anywhere); nothing here is faster, the pass
  records the attention entries a sparse kernel would compute (``stats``).

Composition. LHEP adds an additive key mask (rows, 1, 1, L) to every attention; SparVAR adds its own to it
(a sum of additive masks), and where LHEP gathered a scale's kept tokens SparVAR reads their grid positions
from LHEP's ``gather`` node and tracks every cache entry's position (``sparvar_layout``) from the first
gathered scale on. Under SATS's guard (fewer rows after a stop) the per-row records are indexed by the
running rows. SparVAR must therefore be edited *after* both: the pass order comes from ``runs_before``,
which only a preceding pass can declare, so :meth:`SparVAR.runtime` refuses graphs where a later pass
replaced SparVAR's masks or started selecting rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import Field, field_validator

from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotate, annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import add_input, add_outputs, export_form, tag
from graphsurgeon.runner import PassRuntime

PASS = "sparvar"
AUTHORS_BOUND_LAYER, AUTHORS_DEPTH = 10, 32
"""The authors' ``bound_layer`` and the depth of the model it was set for (layers 0..10 of 32 use CS⁴A)."""
_ALL = 1 << 30
"""A window radius covering any grid: the sink scales and the condition prefix."""
_NONE = -1
"""A window radius covering nothing: a scale that is not attended."""
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SparVARConfig(PassConfig):
    scales: Optional[tuple[int, ...]] = Field(None, description="scale indices (negative from the end)")
    last: int = Field(3, ge=0, description="without `scales`: the last this many scales (the authors' 40, 48, 64)")
    decision_scale: Optional[int] = Field(
        None, description="the CS⁴A decision scale, one of the SparVAR scales (negative from the end); default the first")
    key_fraction: float = Field(0.2, gt=0.0, le=1.0, description="keys kept per CS⁴A query group: this fraction of "
                                                                 "the decision scale's cache length")
    query_group: int = Field(192, ge=1, description="consecutive decision-scale positions per CS⁴A query group")
    bound_layer: Optional[int] = Field(None, ge=-1, description="layers <= this use CS⁴A, deeper ones CSLA (-1: all "
                                                                "CSLA); default the authors' 10 of 32 scaled to the depth")
    sink_scales: int = Field(5, ge=1, description="the first this many scales are attended by every query")
    windows: tuple[int, ...] = Field((1, 1, 3, 5, 7), description="CSLA windows of the last len(windows) scales "
                                                                   "(0: not attended); earlier non-sink scales get 0")
    local_windows: tuple[int, ...] = Field((7, 9), description="CS⁴A windows of the last len(local_windows) scales "
                                                               "(every scale after the decision scale needs one)")

    @field_validator("windows")
    @classmethod
    def _odd_or_zero(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [w for w in value if w != 0 and (w < 0 or w % 2 == 0)]
        if bad:
            raise ValueError(f"windows must be 0 (not attended) or odd (centred on the query), got {bad}")
        return value

    @field_validator("local_windows")
    @classmethod
    def _odd(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [w for w in value if w < 1 or w % 2 == 0]
        if bad:
            raise ValueError(f"local windows must be odd and >= 1 (a query sees its own key), got {bad}")
        return value


@register_pass
class SparVAR(GraphPass):
    """Masks the self-attention of the late scales with SparVAR's CSLA and CS⁴A patterns (module docstring)."""

    name: ClassVar[str] = PASS
    Config: ClassVar[type[PassConfig]] = SparVARConfig
    provides: ClassVar[tuple[str, ...]] = ("attention_pattern",)
    traits: ClassVar[tuple[str, ...]] = ("per_scale_outputs",)  # the key layout each sparsified scale hands on

    def requires(self, captured) -> None:
        """Self-attention over the KV cache on 2-D token grids at every SparVAR scale (not scale 0, which has no
        history), the same layers at each, and windows for every scale CS⁴A reuses indices at."""
        self._layout(captured)

    def _layout(self, captured) -> Optional[_Layout]:
        """Everything the rewrite needs, checked (a ConfigError names what is missing); None: nothing to do."""
        n_scales = len(captured.scales)
        chosen = self.scales(n_scales)
        if not chosen:
            return None
        if 0 in chosen:
            raise ConfigError("pass 'sparvar' cannot act on scale 0: it has no earlier scales to attend sparsely")
        decision = self.config.decision_scale
        if decision is None:
            decision = chosen[0]
        elif not -n_scales <= decision < n_scales or decision % n_scales not in chosen:
            raise ConfigError(f"sparvar.decision_scale={decision} is not one of the SparVAR scales {list(chosen)}")
        decision %= n_scales
        grids = []
        for scale in captured.scales:
            if len(scale.grid) < 2 or math.prod(scale.grid[:-2]) != 1:
                raise ConfigError(f"pass 'sparvar': scale {scale.index} has token grid {tuple(scale.grid)}; it needs "
                                  "a 2-D (height, width) grid to place windows")
            grids.append((int(scale.grid[-2]), int(scale.grid[-1])))
        prefix, depth = None, None
        for index in chosen:
            scale = captured.scales[index]
            attention = _self_attention(scale)
            length = _shape(_argument(attention[0], "key"))[-2]
            here = length - sum(h * w for h, w in grids[:index + 1])
            if here < 0 or (prefix is not None and here != prefix):
                raise ConfigError(f"pass 'sparvar': scale {index}'s attention keys ({length}) are not the KV cache of "
                                  f"the scales so far plus a fixed prefix (found {here}, expected {prefix})")
            prefix = here
            if depth is not None and len(attention) != depth:
                raise ConfigError(f"pass 'sparvar': scale {index} has {len(attention)} self-attention nodes, the other "
                                  f"SparVAR scales {depth}: layers must match to carry CS⁴A indices between scales")
            depth = len(attention)
        bound = self.config.bound_layer
        if bound is None:
            bound = round(AUTHORS_BOUND_LAYER * (depth - 1) / (AUTHORS_DEPTH - 1))
        reuse = tuple(s for s in chosen if s > decision) if bound >= 0 else ()
        heads = {_shape(_argument(n, "query"))[1] for n in _self_attention(captured.scales[decision])[:bound + 1]}
        if reuse and len(heads) > 1:
            raise ConfigError(f"pass 'sparvar': the CS⁴A layers of scale {decision} have {sorted(heads)} heads; their "
                              "recorded keys are stacked, so they need one head count")
        local = _from_end(self.config.local_windows, n_scales)
        missing = [s for s in range(decision + 1, max(reuse, default=decision) + 1) if local[s] == 0]
        if missing:
            raise ConfigError(f"pass 'sparvar': CS⁴A reuses decision-scale keys up to scale {max(reuse)} and needs a "
                              f"local window at scales {missing}; sparvar.local_windows={self.config.local_windows} "
                              f"covers the last {len(self.config.local_windows)} scales")
        layout_start = _first_gathered(captured, max(chosen))
        if layout_start is not None:  # the cache layout is tracked from there: every graph needs its attention
            for scale in captured.scales[layout_start:max(chosen) + 1]:
                _self_attention(scale)
        return _Layout(chosen, decision, reuse, bound, depth, prefix, tuple(grids), layout_start)

    def rewrite(self, captured) -> list[GraphEdit]:
        layout = self._layout(captured)
        if layout is None:
            return []
        first = min(layout.scales) if layout.layout_start is None else min(layout.layout_start, min(layout.scales))
        return [_rewrite_scale(scale, layout, self.config) for scale in captured.scales[first:max(layout.scales) + 1]]

    def runtime(self, captured) -> SparVARRuntime:
        """The runtime, after checking that no pass edited after this one took its masks or rows away."""
        for scale in captured.scales:
            for node in scale.module.graph.nodes:
                expected = annotations(node).get("sparvar_expects")
                if expected is None:
                    continue
                mask, rows = expected
                current = _argument(node, "attn_mask")
                if (current.name if isinstance(current, torch.fx.Node) else None) != mask or scale.active_rows != rows:
                    raise ConfigError(f"pass 'sparvar' must be applied after the passes that mask attention or select "
                                      f"rows (lhep, sats): in scale {scale.index}, {node.name}'s mask or rows were "
                                      "changed after it; enable it after them (e.g. passes=['lhep', 'sats', 'sparvar'])")
        patterns = {s.index: [annotations(n)["sparvar_pattern"] for n in s.module.graph.nodes
                              if "sparvar_pattern" in annotations(n)] for s in captured.scales}
        return SparVARRuntime({s.index: [int(e) for e in s.grid[-2:]] for s in captured.scales}, patterns)


@dataclass(frozen=True)
class _Layout:
    """What the checks found: the scales, the decision scale, which layers use which pattern, the schedule."""

    scales: tuple[int, ...]
    decision: int
    reuse: tuple[int, ...]
    """Scales after the decision scale that reuse its keys (none without CS⁴A layers)."""
    bound: int
    depth: int
    prefix: int
    """Cache entries before scale 0's (condition tokens prefilled into the cache)."""
    grids: tuple[tuple[int, int], ...]
    layout_start: Optional[int]
    """The first scale whose tokens LHEP gathered, from where the cache layout is tracked; None: never."""

    def cache_length(self, scale: int) -> int:
        """Keys in the cache at ``scale`` when nothing was pruned: the prefix and every token up to ``scale``."""
        return self.prefix + sum(h * w for h, w in self.grids[:scale + 1])

    def offset(self, scale: int) -> int:
        """Position of ``scale``'s first key in the unpruned cache."""
        return self.cache_length(scale) - self.grids[scale][0] * self.grids[scale][1]

    def pattern(self, layer: int, scale: int) -> Optional[str]:
        """"csla", "decision", "cs4a", or None: dense (CS⁴A layers before the decision scale, which have no
        recorded keys yet, and at a decision scale nobody reuses)."""
        if scale not in self.scales:
            return None
        if layer > self.bound:
            return "csla"
        if scale == self.decision:
            return "decision" if self.reuse else None
        return "cs4a" if scale > self.decision else None


def _from_end(windows: tuple[int, ...], n_scales: int) -> list[int]:
    """Per scale of the schedule: the window the tuple gives the last len(windows) scales, 0 before them."""
    per_scale = [0] * n_scales
    for offset, window in enumerate(reversed(windows)):
        if offset < n_scales:
            per_scale[n_scales - 1 - offset] = window
    return per_scale


def _csla_radii(config: SparVARConfig, n_scales: int, scale: int) -> tuple[int, ...]:
    """Window radius per key scale 0..scale for CSLA: sinks whole, windows (w-1)/2, window 0 not attended."""
    windows = _from_end(config.windows, n_scales)
    return tuple(_ALL if s < config.sink_scales else (windows[s] - 1) // 2 if windows[s] else _NONE
                 for s in range(scale + 1))


def _cs4a_radii(config: SparVARConfig, n_scales: int, scale: int, decision: int) -> tuple[int, ...]:
    """Window radius per key scale for CS⁴A reuse: sinks whole, local windows after the decision scale, none
    elsewhere (those keys come from the recorded indices)."""
    local = _from_end(config.local_windows, n_scales)
    return tuple(_ALL if s < config.sink_scales else (local[s] - 1) // 2 if s > decision else _NONE
                 for s in range(scale + 1))


# -- graph helpers ----------------------------------------------------------------------------------------
def _argument(node: torch.fx.Node, name: str):
    """Argument ``name`` of a scaled_dot_product_attention call, given by position or keyword."""
    position = _SDPA_ARGS.index(name)
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def _set_mask(node: torch.fx.Node, mask: Optional[torch.fx.Node]) -> None:
    position = _SDPA_ARGS.index("attn_mask")
    if len(node.args) > position:
        node.args = node.args[:position] + (mask,) + node.args[position + 1:]
    else:
        node.kwargs = {**node.kwargs, "attn_mask": mask}


def _shape(node) -> tuple[int, ...]:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _self_attention(scale) -> list[torch.fx.Node]:
    """The scale's scaled_dot_product_attention nodes in graph order (the layer order); each must attend the
    scale's tokens over one KV cache, (rows, heads, tokens, dim) with an explicit mask slot."""
    nodes = [n for n in scale.module.graph.nodes if n.target is F.scaled_dot_product_attention]
    if not nodes:
        raise ConfigError(f"pass 'sparvar': scale {scale.index} has no scaled_dot_product_attention to sparsify")
    lengths = set()
    for node in nodes:
        query, key = _shape(_argument(node, "query")), _shape(_argument(node, "key"))
        if len(query) != 4 or len(key) != 4 or query[-2] != scale.tokens:
            raise ConfigError(f"pass 'sparvar': scale {scale.index}'s {node.name} has query {query} and key {key}; it "
                              f"needs self-attention (rows, heads, {scale.tokens} tokens, dim) over the KV cache")
        if _argument(node, "is_causal"):
            raise ConfigError(f"pass 'sparvar': scale {scale.index}'s {node.name} is causal; a mask cannot be added")
        lengths.add(key[-2])
    if len(lengths) != 1:
        raise ConfigError(f"pass 'sparvar': scale {scale.index}'s attention nodes attend key lengths {sorted(lengths)}; "
                          "they must all attend the one KV cache")
    return nodes


def _gather(scale) -> Optional[torch.fx.Node]:
    """LHEP's token gather at this scale (``gather_tokens(tokens, index, valid, ...)``), if LHEP pruned it."""
    return next((n for n in scale.module.graph.nodes
                 if annotations(n).get("pass") == "lhep" and annotations(n).get("role") == "gather"), None)


def _first_gathered(captured, last: int) -> Optional[int]:
    """The first scale up to ``last`` whose tokens LHEP gathered (from there on the cache holds kept tokens)."""
    return next((s.index for s in captured.scales[:last + 1] if _gather(s) is not None), None)


def _tag(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return tag(node, PASS, role)


def _rewrite_scale(scale, layout: _Layout, config: SparVARConfig) -> GraphEdit:
    """Insert this scale's masks (at SparVAR scales), its CS⁴A record (decision scale) and the cache layout
    (from LHEP's first gathered scale on)."""
    graph = scale.module.graph
    nodes = {n.name: n for n in graph.nodes}
    rows = nodes[scale.active_rows] if scale.active_rows else None
    attention = _self_attention(scale)
    total_rows = _shape(_argument(attention[0], "query"))[0]
    n_scales, index = len(layout.grids), scale.index
    gather = _gather(scale)
    positions, valid = (gather.args[1], gather.args[2]) if gather is not None else (None, None)
    added, inputs, extras, names = [], [], [], []
    key_ids = None
    if layout.layout_start is not None and index >= layout.layout_start:
        key_ids = _insert_layout(scale, layout, attention[0], positions, rows, total_rows, added, inputs, extras,
                                 names)
    if index not in layout.scales:
        return _finish(scale, added, inputs, extras, names)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    patterns = [layout.pattern(layer, index) for layer in range(layout.depth)]
    geometry = (layout.grids, layout.prefix, index)
    decision_args = (layout.grids[layout.decision], config.query_group, layout.cache_length(layout.decision))
    keys_in = None
    if "cs4a" in patterns:
        heads = _shape(_argument(attention[0], "query"))[1]
        keys_in = add_input(graph, "sparvar_keys", placeholders[-1], PASS, "keys_input",
                            _keys_examples(layout, config, patterns.count("cs4a"), total_rows, heads))
        inputs.append("sparvar_keys")
        added.append(keys_in)
    masks, csla_masks, records, rewired = [], {}, [], []
    for layer, (node, pattern) in enumerate(zip(attention, patterns)):
        existing, key = _argument(node, "attn_mask"), _argument(node, "key")
        mask = existing
        if pattern == "csla":
            mask = csla_masks.get(existing)
            if mask is None:  # one mask per scale for all CSLA layers (the pattern does not depend on the layer)
                radii = _csla_radii(config, n_scales, index)
                with graph.inserting_before(node):
                    mask = _tag(graph.call_function(local_attention_mask, (key, existing, positions, key_ids, *geometry,
                                                                           radii)), "csla_mask")
                csla_masks[existing] = mask
                added.append(mask)
        elif pattern == "cs4a":
            radii = _cs4a_radii(config, n_scales, index, layout.decision)
            with graph.inserting_before(node):
                mask = _tag(graph.call_function(reuse_attention_mask, (
                    key, existing, keys_in, patterns[:layer].count("cs4a"), rows, positions, key_ids, *geometry, radii,
                    *decision_args)), "cs4a_mask")
            added.append(mask)
        elif pattern == "decision":
            count = max(1, round(config.key_fraction * layout.cache_length(index)))
            with graph.inserting_before(node):
                chosen = _tag(graph.call_function(decision_keys, (
                    _argument(node, "query"), key, existing, _argument(node, "scale"), rows, total_rows, positions,
                    valid, key_ids, layout.grids[index], config.query_group, count)), "decision_keys")
            records.append(chosen)
            added.append(chosen)
        if mask is not existing:
            _set_mask(node, mask)
            rewired.append(node.name)
        annotate(node, sparvar_pattern=pattern,
                 sparvar_expects=(mask.name if isinstance(mask, torch.fx.Node) else None, scale.active_rows))
        masks.append(mask)
    output = _output(graph)
    with graph.inserting_before(output):
        counts = [_tag(graph.call_function(attention_entries, (_argument(node, "query"), _argument(node, "key"), mask)),
                       "attention_entries") for node, mask in zip(attention, masks)]
        entries = _tag(graph.call_function(torch.stack, (counts,)), "attention_entries")
        extras.append(entries)
        names.append("sparvar_entries")
        added += counts + [entries]
        if records:
            stacked = _tag(graph.call_function(torch.stack, (records,)), "keys_record")
            extras.append(stacked)
            names.append("sparvar_keys_out")
            added.append(stacked)
    return _finish(scale, added, inputs, extras, names, tuple(rewired))


def _insert_layout(scale, layout: _Layout, first_attention: torch.fx.Node, positions: Optional[torch.fx.Node],
                   rows: Optional[torch.fx.Node], total_rows: int, added: list, inputs: list[str], extras: list,
                   names: list[str]) -> torch.fx.Node:
    """The cache entries' positions in the unpruned cache (``key_layout``), from the record of the earlier
    scales (input ``sparvar_layout``); passed on (``sparvar_layout_out``) unless this is the last SparVAR scale."""
    graph, index = scale.module.graph, scale.index
    earlier = layout.offset(index)
    identity = torch.arange(earlier).expand(total_rows, earlier).clone()
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    record = add_input(graph, "sparvar_layout", last, PASS, "layout_input", [identity])
    inputs.append("sparvar_layout")
    tokens = layout.grids[index][0] * layout.grids[index][1]
    with graph.inserting_before(first_attention):
        key_ids = _tag(graph.call_function(key_layout, (_argument(first_attention, "key"), record, positions, rows,
                                                        earlier, tokens)), "key_layout")
    added += [record, key_ids]
    if index < max(layout.scales):
        with graph.inserting_before(_output(graph)):
            extended = _tag(graph.call_function(layout_record, (key_ids, rows, total_rows)), "layout_record")
        extras.append(extended)
        names.append("sparvar_layout_out")
        added.append(extended)
    return key_ids


def _output(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _finish(scale, added: list, inputs: list[str], extras: list, names: list[str],
            rewired: tuple[str, ...] = ()) -> GraphEdit:
    """Declare the new inputs and outputs (outputs before the state outputs) and recompile."""
    add_outputs(scale, list(zip(names, extras)))
    scale.input_names = scale.input_names + inputs
    scale.module.graph.lint()
    scale.module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=tuple(n.name for n in added), rewired=rewired)


def _keys_examples(layout: _Layout, config: SparVARConfig, layers: int, total_rows: int, heads: int
                   ) -> list[torch.Tensor]:
    """Decision records for export: the first keys of the cache, and seeded valid indices."""
    (h, w), length = layout.grids[layout.decision], layout.cache_length(layout.decision)
    groups = -(-h * w // config.query_group)
    count = max(1, round(config.key_fraction * length))
    shape = (layers, total_rows, heads, groups, count)
    first = torch.arange(count).expand(shape).clone()
    seeded = torch.randint(0, length, shape, generator=torch.Generator().manual_seed(layout.decision))
    return [first, seeded]


class SparVARRuntime(PassRuntime):
    """Carries the CS⁴A record and the cache layout between the scales of one ``generate``; records the
    attention entries.

    Stats, one entry per scale: ``scale``, ``grid`` ([h, w]) and, at SparVAR scales (None elsewhere), per layer
    ``patterns`` ("csla", "cs4a", "decision", or None: dense), ``attention_entries`` (the (query, key) pairs the
    masks keep, over running rows and heads), ``attention_entries_dense`` (every pair the layer's attention
    covers), and ``entries_vs_dense`` over all layers."""

    def __init__(self, grids: dict[int, list[int]], patterns: dict[int, list[Optional[str]]]):
        super().__init__()
        self.grids, self.patterns = grids, patterns
        self.keys: Optional[torch.Tensor] = None
        self.layout: Optional[torch.Tensor] = None

    def inputs(self, graph, region: str, device: torch.device) -> dict:
        if region != "scale":
            return {}
        offered = {"sparvar_keys": self.keys, "sparvar_layout": self.layout}
        return {name: value for name, value in offered.items() if name in graph.input_names}

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region != "scale":
            return
        self.keys = outputs.get("sparvar_keys_out", self.keys)
        self.layout = outputs.get("sparvar_layout_out")
        entries = outputs.get("sparvar_entries")
        record = {"scale": graph.index, "grid": self.grids[graph.index], "patterns": None,
                  "attention_entries": None, "attention_entries_dense": None, "entries_vs_dense": None}
        if entries is not None:
            kept, dense = entries[:, 0].tolist(), entries[:, 1].tolist()
            record.update(patterns=self.patterns[graph.index], attention_entries=kept, attention_entries_dense=dense,
                          entries_vs_dense=sum(kept) / sum(dense))
        self.stats.append(record)


# -- nodes the rewrite inserts ----------------------------------------------------------------------------
def key_layout(key: torch.Tensor, layout: Optional[torch.Tensor], positions: Optional[torch.Tensor],
               rows: Optional[torch.Tensor], offset: int, tokens: int) -> torch.Tensor:
    """(running rows, L): each cache entry's position in the unpruned cache. Earlier entries come from the
    record (all rows; None: nothing pruned before), this scale's from LHEP's gather index (None: every token)."""
    current = positions + offset if positions is not None else (
        torch.arange(tokens, device=key.device) + offset).expand(key.shape[0], tokens)
    if layout is None:
        earlier = torch.arange(key.shape[-2] - current.shape[1], device=key.device).expand(key.shape[0], -1)
    else:
        earlier = layout.index_select(0, rows) if rows is not None else layout
    return torch.cat([earlier, current], dim=1)


def layout_record(key_ids: torch.Tensor, rows: Optional[torch.Tensor], total_rows: int) -> torch.Tensor:
    """The layout over every batch row (rows that did not run hold the unpruned layout; they never run again)."""
    if rows is None:
        return key_ids
    full = torch.arange(key_ids.shape[1], device=key_ids.device).expand(total_rows, -1).clone()
    return full.index_copy(0, rows, key_ids)


def _positions(positions: Optional[torch.Tensor], grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Query positions on the scale's grid, (rows or 1, n)."""
    return positions if positions is not None else torch.arange(grid[0] * grid[1], device=device)[None]


def _key_ids(key_ids: Optional[torch.Tensor], key: torch.Tensor) -> torch.Tensor:
    """Cache entries' positions in the unpruned cache, (rows or 1, L)."""
    return key_ids if key_ids is not None else torch.arange(key.shape[-2], device=key.device)[None]


def window_centre(query: torch.Tensor, extent: int, key_extent: torch.Tensor) -> torch.Tensor:
    """A query coordinate on an ``extent`` grid rescaled to a ``key_extent`` grid as the cited implementation's
    mask does (Lvar, ``models/sparvar/basic_sparvar.py``): ``round(query / extent * key_extent)`` in float32,
    ties to even. Not clamped: near the far border of a much finer query grid it can be one past the last cell,
    where the window then holds fewer keys (none with window 1)."""
    return torch.round(query.to(torch.float32) / extent * key_extent).long()


def window_allowed(query_positions: torch.Tensor, key_ids: torch.Tensor, grids: tuple[tuple[int, int], ...],
                   prefix: int, scale: int, radii: tuple[int, ...]) -> torch.Tensor:
    """(rows, n, L) bool: key j is within the window of radius ``radii[s]`` (s: the key's scale) around query
    i's position rescaled to s's grid, clipped at the border; prefix keys always. ``query_positions``
    (rows or 1, n) on scale ``scale``'s grid, ``key_ids`` (rows or 1, L) positions in the unpruned cache."""
    device = key_ids.device
    heights = torch.tensor([h for h, _ in grids[:scale + 1]], device=device)
    widths = torch.tensor([w for _, w in grids[:scale + 1]], device=device)
    starts = prefix + torch.cumsum(heights * widths, 0) - heights * widths
    radius = torch.tensor(radii, device=device)
    key_scale = (torch.bucketize(key_ids.contiguous(), starts, right=True) - 1).clamp(min=0)
    local = key_ids - starts[key_scale]
    key_y, key_x = local // widths[key_scale], local % widths[key_scale]
    height, width = grids[scale]
    query_y, query_x = (query_positions // width)[..., :, None], (query_positions % width)[..., :, None]
    centre_y = window_centre(query_y, height, heights[key_scale][..., None, :])
    centre_x = window_centre(query_x, width, widths[key_scale][..., None, :])
    reach = radius[key_scale][..., None, :]
    inside = ((key_y[..., None, :] - centre_y).abs() <= reach) & ((key_x[..., None, :] - centre_x).abs() <= reach)
    return inside | (key_ids < prefix)[..., None, :]


def _local_allowed(key: torch.Tensor, positions: Optional[torch.Tensor], key_ids: Optional[torch.Tensor],
                   grids: tuple, prefix: int, scale: int, radii: tuple) -> torch.Tensor:
    return window_allowed(_positions(positions, grids[scale], key.device), _key_ids(key_ids, key), grids, prefix,
                          scale, radii)[:, None]


def local_attention_mask(key: torch.Tensor, existing: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                         key_ids: Optional[torch.Tensor], grids: tuple, prefix: int, scale: int, radii: tuple
                         ) -> Optional[torch.Tensor]:
    """CSLA: the static local pattern (rows or 1, 1, n, L) added to ``existing``; ``existing`` itself when the
    pattern keeps every key (so a pattern covering everything leaves the graph's attention exactly as it was)."""
    return _masked(existing, _local_allowed(key, positions, key_ids, grids, prefix, scale, radii), key)


@export_form(local_attention_mask)
def local_attention_mask_traceable(key: torch.Tensor, existing: Optional[torch.Tensor],
                                   positions: Optional[torch.Tensor], key_ids: Optional[torch.Tensor], grids: tuple,
                                   prefix: int, scale: int, radii: tuple) -> torch.Tensor:
    """:func:`local_attention_mask` without the shortcut: always the mask."""
    return _combine(existing, _local_allowed(key, positions, key_ids, grids, prefix, scale, radii), key)


def decision_group(positions: torch.Tensor, grid: tuple[int, int], decision_grid: tuple[int, int],
                   group: int) -> torch.Tensor:
    """The decision-scale query group of each position of ``grid``: its rescaled position's group."""
    height, width = grid
    decision_height, decision_width = decision_grid
    y = (positions // width) * decision_height // height
    x = (positions % width) * decision_width // width
    return (y * decision_width + x) // group


def decision_keys(query: torch.Tensor, key: torch.Tensor, existing: Optional[torch.Tensor], scale: Optional[float],
                  rows: Optional[torch.Tensor], total_rows: int, positions: Optional[torch.Tensor],
                  valid: Optional[torch.Tensor], key_ids: Optional[torch.Tensor], grid: tuple[int, int], group: int,
                  count: int) -> torch.Tensor:
    """CS⁴A at the decision scale: per (row, head, query group), the ``count`` keys with the most attention
    mass summed over the group's queries (LHEP's padding queries excluded), as positions in the unpruned cache;
    (total_rows, heads, groups, count), rows that did not run hold the first keys. The attention itself stays
    the graph's (dense); this recomputes the probabilities to rank the keys."""
    rows_n, heads, tokens, dim = query.shape
    keys = key.repeat_interleave(heads // key.shape[1], dim=1) if key.shape[1] != heads else key
    logits = (query.float() @ keys.float().transpose(-1, -2)) * (scale if scale is not None else dim ** -0.5)
    if existing is not None:
        logits = logits + _additive(existing, torch.float32)
    probabilities = logits.softmax(dim=-1)
    if valid is not None:
        probabilities = probabilities * valid[:, None, :, None]
    groups = -(-grid[0] * grid[1] // group)
    which = (_positions(positions, grid, query.device) // group).expand(rows_n, tokens)
    mass = probabilities.new_zeros(rows_n, heads, groups, key.shape[-2]).scatter_add_(
        2, which[:, None, :, None].expand_as(probabilities), probabilities)
    top = mass.topk(min(count, key.shape[-2]), dim=-1).indices
    ids = _key_ids(key_ids, key).expand(rows_n, -1)
    chosen = ids[:, None, None, :].expand(rows_n, heads, groups, -1).gather(-1, top)
    if chosen.shape[-1] < count:  # fewer keys than the count (a pruned cache): repeat the first, a set is a set
        chosen = torch.cat([chosen, chosen[..., :1].expand(*chosen.shape[:-1], count - chosen.shape[-1])], dim=-1)
    if rows is None:
        return chosen
    full = torch.arange(count, device=chosen.device).expand(total_rows, heads, groups, count).clone()
    return full.index_copy(0, rows, chosen)


def _reuse_allowed(key: torch.Tensor, record: torch.Tensor, layer: int, rows: Optional[torch.Tensor],
                   positions: Optional[torch.Tensor], key_ids: Optional[torch.Tensor], grids: tuple, prefix: int,
                   scale: int, radii: tuple, decision_grid: tuple[int, int], group: int, decision_length: int
                   ) -> torch.Tensor:
    chosen = record[layer] if rows is None else record[layer].index_select(0, rows)
    rows_n, heads, groups, _ = chosen.shape
    member = torch.zeros(rows_n, heads, groups, decision_length, dtype=torch.bool, device=key.device).scatter(
        -1, chosen, True)
    query_positions = _positions(positions, grids[scale], key.device)
    which = decision_group(query_positions, grids[scale], decision_grid, group).expand(rows_n, -1)
    per_query = member.gather(2, which[:, None, :, None].expand(rows_n, heads, which.shape[1], decision_length))
    ids = _key_ids(key_ids, key).expand(rows_n, -1)
    recorded = per_query.gather(-1, ids.clamp(max=decision_length - 1)[:, None, None, :].expand(
        rows_n, heads, which.shape[1], ids.shape[1])) & (ids < decision_length)[:, None, None, :]
    return recorded | window_allowed(query_positions, ids, grids, prefix, scale, radii)[:, None]


def reuse_attention_mask(key: torch.Tensor, existing: Optional[torch.Tensor], record: torch.Tensor, layer: int,
                         rows: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                         key_ids: Optional[torch.Tensor], grids: tuple, prefix: int, scale: int, radii: tuple,
                         decision_grid: tuple[int, int], group: int, decision_length: int) -> Optional[torch.Tensor]:
    """CS⁴A after the decision scale: (rows, heads, n, L), each query its decision group's recorded keys plus
    the sink scales and the local windows; ``existing`` itself when every key is kept."""
    return _masked(existing, _reuse_allowed(key, record, layer, rows, positions, key_ids, grids, prefix, scale, radii,
                                            decision_grid, group, decision_length), key)


@export_form(reuse_attention_mask)
def reuse_attention_mask_traceable(key: torch.Tensor, existing: Optional[torch.Tensor], record: torch.Tensor,
                                   layer: int, rows: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                                   key_ids: Optional[torch.Tensor], grids: tuple, prefix: int, scale: int,
                                   radii: tuple, decision_grid: tuple[int, int], group: int, decision_length: int
                                   ) -> torch.Tensor:
    """:func:`reuse_attention_mask` without the shortcut: always the mask."""
    return _combine(existing, _reuse_allowed(key, record, layer, rows, positions, key_ids, grids, prefix, scale, radii,
                                             decision_grid, group, decision_length), key)


def _masked(existing: Optional[torch.Tensor], allowed: torch.Tensor, key: torch.Tensor) -> Optional[torch.Tensor]:
    if bool(allowed.all()):
        return existing
    return _combine(existing, allowed, key)


def _combine(existing: Optional[torch.Tensor], allowed: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The sum of the additive masks: ``existing`` (additive, or boolean: True = attend) and ``allowed``'s."""
    dtype = existing.dtype if existing is not None and existing.is_floating_point() else key.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key.device).masked_fill(~allowed, float("-inf"))
    return mask if existing is None else mask + _additive(existing, dtype)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def attention_entries(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[kept, dense]: (query, key) pairs the mask keeps (finite) and all pairs, over rows and heads."""
    dense = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[-2]
    if mask is None:
        return torch.tensor([dense, dense], device=query.device)
    kept = _additive(mask, torch.float32).isfinite()
    return torch.stack([kept.sum() * (dense // kept.numel()), torch.tensor(dense, device=query.device)])
