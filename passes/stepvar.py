"""StepVAR (arXiv 2603.01757): structure- and texture-guided token pruning at the late scales.

No code was published. The scores follow the public description with formulas (as issue 18 summarises it: a
texture score from the residual to an average pool, a structure score from the first principal component,
``S = w * S_str + S_txt``); what that summary leaves open is chosen here and listed in docs/pass_stepvar.md. At a
StepVAR scale k the scale's own input tokens (the declared ``token_input``, (rows, tokens, C), row-major on the
token grid ``grid[-2:]``) are ranked:

1. texture S_txt: the norm over channels of each token's residual to the 3x3 average around it,
   ``x - AvgPool3x3(x)`` (replicate padding, so a constant map has no texture at its border either);
2. structure S_str: the norm of each token's projection on the top ``components`` (default 1: the first)
   principal directions of the sample's centred token features (an eigendecomposition of their C x C scatter
   matrix); the norm does not depend on the sign (or, within a degenerate group of eigenvalues inside that
   subspace, the basis) that the eigensolver happens to return;
3. ``S = structure_weight * S_str + S_txt``; both are norms of feature vectors, in the features' own units;
4. the ``round(keep_ratio * tokens)`` (at least 1) highest scores are kept, equal scores: the earlier position.

Scores come from the conditional row of each sample only (row r belongs to sample r % B), so both CFG rows of a
sample compute the same tokens. Only kept tokens run through the blocks and enter the KV cache. Every sample
keeps the same count, so the rows of a batch are equally long: no padding, and nothing in the cache that a later
attention would have to hide (no key mask, no validity record between scales). At the exit each pruned position
takes the logits of its nearest kept token on the grid (Euclidean, ties: the lowest position), so the sampler
draws a dense map and the residual step runs unchanged.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.fx
import torch.nn.functional as F
from pydantic import Field

from graphsurgeon.capture.dynamic import generalize_axis
from graphsurgeon.capture.token_axes import propagate_axis
from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import add_outputs, export_form, tag
from graphsurgeon.runner import PassRuntime
from passes._subset import refuse_attention_masks
from passes.lhep import fixed_keep_mask, gather_side_values, insert_token_gather, select_tokens

PASS = "stepvar"
_QUERY_BLOCK = 1 << 22
"""Entries (samples x queries x grid positions) of one block of the nearest-kept search: bounds its memory
(32 MiB of int64) on large grids, where the full distance table would not fit."""


class StepVARConfig(PassConfig):
    keep_ratio: float = Field(0.6, gt=0.0, le=1.0, description="fraction of each sample's tokens computed "
                                                                "(1: every token, the unpruned model)")
    structure_weight: float = Field(1.0, ge=0.0, description="w in S = w * S_str + S_txt (0: texture only)")
    components: int = Field(1, ge=1, description="principal components of the structure score (1: the first)")
    scales: Optional[tuple[int, ...]] = Field(None, description="scale indices (negative from the end)")
    last: int = Field(3, ge=0, description="without `scales`: the last this many scales")


# -- scores and the nearest kept token (also what the rewrite inserts) ---------------------------------------
def texture_scores(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w): the norm over channels of ``x - AvgPool3x3(x)`` on a replicate-padded map.
    Written as the mean of the differences to the 8 neighbours (the same quantity), not as a pooling: a flat
    neighbourhood gives exactly 0 and equal neighbourhoods bit-equal scores (``x - sum(9 x) / 9`` can round)."""
    padded = F.pad(maps, (1, 1, 1, 1), mode="replicate")
    height, width = maps.shape[-2:]
    residual = torch.zeros_like(maps)
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) != (1, 1):
                residual = residual + (maps - padded[..., dy:dy + height, dx:dx + width])
    return (residual / 9).pow(2).sum(dim=1).sqrt().flatten(1)


def structure_scores(features: torch.Tensor, components: int) -> torch.Tensor:
    """(n, C) one sample's tokens -> (n,): norm of each centred token's projection on the top ``components``
    principal directions (eigenvectors of the C x C scatter matrix with the largest eigenvalues; with one, the
    absolute value of the projection on the first). The features are shifted by the first token before
    centring (PCA does not see a shift), so a flat map is exactly 0 rather than the rounding of its mean; the
    product is taken elementwise and summed, not by a matrix product, so equal tokens get bit-equal scores."""
    shifted = features - features[:1]
    centred = shifted - shifted.mean(dim=0, keepdim=True)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # eigenvalues ascending
    top = vectors[:, -min(components, vectors.shape[1]):]
    projection = (centred[:, :, None] * top[None]).sum(dim=1)
    return projection.pow(2).sum(dim=1).sqrt()


def stepvar_scores(tokens: torch.Tensor, batch: int, grid: tuple[int, int], structure_weight: float,
                   components: int) -> torch.Tensor:
    """(rows, h*w, C) token input -> (batch, h*w) importance ``w * S_str + S_txt`` of each sample's tokens, from
    its conditional row (rows [0:batch]). In float32 at least (half-precision inputs would round the scatter
    matrix), not float64, which many GPUs run at a small fraction of the speed; one sample at a time, so that a
    sample's scores are computed by the same operations whatever the other samples of its batch."""
    features = tokens[:batch].to(torch.promote_types(tokens.dtype, torch.float32))
    maps = features.transpose(1, 2).reshape(batch, features.shape[-1], *grid)
    structure = torch.stack([structure_scores(features[b], components) for b in range(batch)])
    return structure_weight * structure + texture_scores(maps)


def nearest_kept(keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) kept flags -> (B, h*w) the position of each token's nearest kept token on the grid (itself
    when kept): least squared Euclidean distance, then the lowest position. Exact search over blocks of query
    positions (the key ``distance * n + position`` orders by both at once)."""
    height, width = grid
    n = height * width
    position = torch.arange(n, device=keep.device)
    row, column = position // width, position % width
    unreachable = torch.iinfo(torch.int64).max
    step = max(1, _QUERY_BLOCK // max(1, keep.shape[0] * n))
    nearest = []
    for start in range(0, n, step):
        query = position[start:start + step]
        distance = (row[query, None] - row[None, :]).pow(2) + (column[query, None] - column[None, :]).pow(2)
        key = distance * n + position[None, :]
        nearest.append(torch.where(keep[:, None, :], key[None], unreachable).amin(dim=-1) % n)
    return torch.cat(nearest, dim=1)


def nearest_kept_logits(logits: torch.Tensor, keep: torch.Tensor, rows: Optional[torch.Tensor], batch: int,
                        grid: tuple[int, int]) -> torch.Tensor:
    """(rows, K, ...) logits of each row's kept tokens in ascending position (``select_tokens``' layout) ->
    (rows, h*w, ...): every position the logits of its nearest kept token (its own when kept), the same
    positions for both CFG rows of a sample (row r is sample r % batch; ``rows``: the rows that ran, None: all).
    Unpruned: the logits as they are."""
    if bool(keep.all()):
        return logits
    return nearest_kept_logits_traceable(logits, keep, rows, batch, grid)


@export_form(nearest_kept_logits)
def nearest_kept_logits_traceable(logits: torch.Tensor, keep: torch.Tensor, rows: Optional[torch.Tensor], batch: int,
                                  grid: tuple[int, int]) -> torch.Tensor:
    """:func:`nearest_kept_logits` without the data-dependent shortcut."""
    slot = (keep.long().cumsum(dim=1) - 1).gather(1, nearest_kept(keep, grid))  # its place among the kept tokens
    samples = (rows if rows is not None else torch.arange(logits.shape[0], device=logits.device)) % batch
    index = slot.index_select(0, samples).reshape(logits.shape[0], -1, *([1] * (logits.dim() - 2)))
    return logits.gather(1, index.expand(-1, -1, *logits.shape[2:]))


# -- the pass ------------------------------------------------------------------------------------------------
@register_pass
class StepVAR(GraphPass):
    """Scores and gathers the kept tokens at the entry of each StepVAR scale and fills the pruned positions'
    logits from the nearest kept token at its exit (see the module docstring)."""

    name: ClassVar[str] = PASS
    Config: ClassVar[type[PassConfig]] = StepVARConfig
    provides: ClassVar[tuple[str, ...]] = ("token_selection",)
    traits: ClassVar[tuple[str, ...]] = ("per_scale_outputs",)  # the kept tokens of each scale it prunes

    def requires(self, captured) -> None:
        """At each StepVAR scale: a (rows, tokens, C) token input on a 2-D token grid, the logits, attention
        without a mask of its own; and no other pass gathering tokens."""
        acting = self.scales(len(captured.scales))
        if not acting:
            return
        if 0 in acting:
            raise ConfigError(f"pass '{PASS}' cannot act on scale 0: its input is the start of the sequence, not a "
                              "token map to rank")
        _refuse_other_gathers(captured)
        for scale in (captured.scales[k] for k in acting):
            if scale.token_input is None or scale.logits_output is None:
                raise ConfigError(f"pass '{PASS}': scale {scale.index} declares no token_input / logits_output (the "
                                  "tokens to rank and gather, the logits to fill back)")
            if scale.tokens != scale.grid[-2] * scale.grid[-1]:
                raise ConfigError(f"pass '{PASS}': scale {scale.index} has token grid {tuple(scale.grid)}; the "
                                  "scores need one 2-D map (leading extents of 1)")
            value = _placeholder(scale, scale.token_input).meta["val"]
            if value.dim() != 3 or scale.token_axis != 1 or value.shape[1] != scale.tokens:
                raise ConfigError(f"pass '{PASS}': scale {scale.index}'s token input {scale.token_input!r} has shape "
                                  f"{tuple(value.shape)} with token axis {scale.token_axis}; it must be (rows, "
                                  f"{scale.tokens}, C)")
            refuse_attention_masks(scale, PASS, "the kept tokens")

    def rewrite(self, captured) -> list[GraphEdit]:
        acting = self.scales(len(captured.scales))
        if not acting:
            return []
        first = captured.scales[acting[0]]
        batch = captured.plan.cfg_batch or _placeholder(first, first.token_input).meta["val"].shape[0]
        return [_rewrite_scale(captured.scales[k], batch, self.config) for k in acting]

    def runtime(self, captured) -> "StepVARRuntime":
        """Also refuses a graph set that a pass changed after this one in a way it cannot follow: pass order comes
        from ``runs_before``, which only the pass that must run first can declare, so ``requires`` sees only the
        passes listed before this one."""
        acting = self.scales(len(captured.scales))
        if acting:
            _refuse_other_gathers(captured)
            late = _rows_selected_after(captured, acting)
            if late:
                raise ConfigError(f"pass '{late}' selects the running rows after '{PASS}' gathered its tokens; list "
                                  f"'{late}' before '{PASS}' in passes")
        return StepVARRuntime(captured)


def _placeholder(scale, name: str) -> torch.fx.Node:
    found = next((n for n in scale.module.graph.nodes if n.op == "placeholder" and n.target == name), None)
    if found is None:
        raise ConfigError(f"pass '{PASS}': scale {scale.index} has no input {name!r} (its inputs: {scale.input_names})")
    return found


def _refuse_other_gathers(captured) -> None:
    """Another pass that gathers tokens (any scale: its key masks and records assume it alone shortens the
    KV cache) cannot be combined with this one."""
    others = sorted({annotations(n)["pass"] for scale in captured.scales for n in scale.module.graph.nodes
                     if annotations(n).get("role") == "gather" and annotations(n).get("pass") != PASS})
    if others:
        raise ConfigError(f"pass '{PASS}' cannot run with {others}: both choose which tokens of a scale are computed")


def _rows_selected_after(captured, acting: tuple[int, ...]) -> Optional[str]:
    """The pass that made a StepVAR scale select running rows after this pass rewrote it, if any."""
    for scale in (captured.scales[k] for k in acting):
        select = next(n for n in scale.module.graph.nodes
                      if n.target is select_tokens and annotations(n).get("pass") == PASS)
        if scale.active_rows is not None and select.args[1] is None:
            active = next(n for n in scale.module.graph.nodes if n.name == scale.active_rows)
            return annotations(active).get("pass", "another pass")
    return None


def _tag(node: torch.fx.Node, role: str) -> torch.fx.Node:
    return tag(node, PASS, role)


def _rewrite_scale(scale, batch: int, config: StepVARConfig) -> GraphEdit:
    """Scores -> keep mask -> per-row kept positions -> gathered tokens and side values at the entry; the
    dense logits at the exit; the keep mask as the extra output ``stepvar_keep``."""
    module, graph = scale.module, scale.module.graph
    nodes = {n.name: n for n in graph.nodes}
    source = _placeholder(scale, scale.token_input)  # every row, whatever a row guard lets through
    tokens = nodes[scale.aliases.get(scale.token_input, scale.token_input)]
    active = nodes[scale.active_rows] if scale.active_rows else None
    grid = tuple(scale.grid[-2:])
    anchor = tokens if tokens.op != "placeholder" else [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        scores = _tag(graph.call_function(stepvar_scores, (source, batch, grid, config.structure_weight,
                                                            config.components)),
                      "score")
    with graph.inserting_after(scores):
        keep = _tag(graph.call_function(fixed_keep_mask, (scores, config.keep_ratio)), "mask")
    selection, index, valid, gathered = insert_token_gather(graph, keep, active, batch, tokens, scale.token_axis, PASS,
                                                            spared=(scores,))
    propagate_axis(graph, gathered, 0, tokens.meta["val"].shape[0], key="row_axis")
    sides = gather_side_values(scale, graph, index, valid, PASS)
    changed = generalize_axis(module, gathered, scale.token_axis, scale.tokens, key="token_axis",
                              role="kept_token_count", keep_roles=("token_side_input",))
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = list(output.args[0])
    position = scale.output_names.index(scale.logits_output)
    with graph.inserting_before(output):
        dense = _tag(graph.call_function(nearest_kept_logits, (values[position], keep, active, batch, grid)),
                     "nearest_fill")
    values[position] = dense
    output.args = (tuple(values),)
    add_outputs(scale, [("stepvar_keep", keep)])
    graph.lint()
    module.recompile()
    added = [scores, keep, selection, index, valid, gathered, *sides, dense]
    return GraphEdit(PASS, "scale", scale.index, added=tuple(n.name for n in added), generalized=tuple(changed),
                     rewired=(tokens.name,))


class StepVARRuntime(PassRuntime):
    """Records what each scale kept (the graphs need no inputs from it).

    Stats, one entry per scale: ``scale``, ``tokens``, ``kept`` (per sample; None where StepVAR does not act),
    ``width`` (the count every running row computes: the kept count, the same for every sample), ``grid``
    ([h, w]) and ``mask``: per sample, h strings of w characters, "1" where the token was kept (row-major), None
    where StepVAR does not act. The layout of LHEP's stats, so that reports can read either."""

    def __init__(self, captured: Any):
        super().__init__()
        self.tokens = [s.tokens for s in captured.scales]
        self.grids = [tuple(s.grid[-2:]) for s in captured.scales]

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region != "scale":
            return
        keep = outputs.get("stepvar_keep")
        height, width = self.grids[graph.index]
        kept = mask = None
        if keep is not None:
            kept = keep.sum(dim=1).tolist()
            codes = (keep.reshape(-1, height, width).to(torch.uint8) + ord("0")).cpu()
            mask = [[bytes(row.tolist()).decode("ascii") for row in sample] for sample in codes]
        self.stats.append({"scale": graph.index, "tokens": self.tokens[graph.index], "kept": kept,
                           "width": max(kept) if kept else None, "grid": [height, width], "mask": mask})
