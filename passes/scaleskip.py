"""Scale skipping: the last scales are not computed at all; the image is decoded from what came before.

FastVAR's release (and FasterVAR's) skip the last two scales with a ``continue`` in the scale loop; the
accumulated latent is already at full resolution, so the decoder still gets a full-size input, just without the
detail those scales would add (../shared/research/peers.md, "Confound to control"). As a pass of its own it can be
reported apart from the method it accompanied, and combined with any method whose scales it does not touch.

At a skipped scale the scale step computes nothing: its logits are zeros (the sampler still draws from them, so its
loop is unchanged) and its state (the KV caches) passes through; the residual step passes the accumulated latent
(the declared ``accumulated`` input) through unchanged, so nothing drawn at a skipped scale reaches the latent (the
sampler still returns those draws with its per-scale outputs).
``last=0`` skips nothing (no edit).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.fx
from pydantic import Field

from graphsurgeon.errors import ConfigError
from graphsurgeon.meta import annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, register_pass
from graphsurgeon.rewrite import tag
from graphsurgeon.runner import PassRuntime

PASS = "scaleskip"


class ScaleSkipConfig(PassConfig):
    last: int = Field(2, ge=0, description="skip the last this many scales (FastVAR's release: 2; 0: none)")


def skipped_logits(tokens: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zero logits of the captured ``shape`` (rows, tokens, V), on the device of the step's ``tokens``."""
    return torch.zeros(shape, dtype=dtype, device=tokens.device)


@register_pass
class ScaleSkip(GraphPass):
    """Empties the graphs of the skipped scales (module docstring). It runs after every other pass and refuses one
    that edited a scale it skips."""

    name: ClassVar[str] = PASS
    Config: ClassVar[type[PassConfig]] = ScaleSkipConfig
    runs_after: ClassVar[tuple[str, ...]] = ("lhep", "sats", "stepvar", "depthvar", "sparvar", "fastvar", "skipvar")
    provides: ClassVar[tuple[str, ...]] = ("scale_skip",)

    def skipped(self, captured) -> tuple[int, ...]:
        ran = len(captured.residual) or len(captured.scales)
        if self.config.last >= ran:
            raise ConfigError(f"{PASS}.last={self.config.last} would skip every one of the {ran} scales that run")
        return tuple(range(ran - self.config.last, ran))

    def requires(self, captured) -> None:
        """Logits declared and the only output of each skipped scale step; the accumulated latent declared in its
        residual step; no other pass edited them."""
        for k in self.skipped(captured):
            scale = captured.scales[k]
            graphs = [("scale", scale)] + ([("residual", captured.residual[k])] if captured.residual else [])
            for region, graph in graphs:
                others = sorted({annotations(n)["pass"] for n in graph.module.graph.nodes if "pass" in annotations(n)})
                if others:
                    raise ConfigError(f"pass '{PASS}' skips scale {k}, which {others} rewrote ({region} step); let "
                                      f"them act on earlier scales only, or skip fewer scales")
            if scale.token_input is None:
                raise ConfigError(f"pass '{PASS}': scale {k} declares no token_input (where the rows that run are read)")
            if scale.logits_output is None or scale.output_names != [scale.logits_output]:
                raise ConfigError(f"pass '{PASS}': scale {k} has outputs {scale.output_names}; it must declare its "
                                  "logits (logits_output) as its only output to be skipped")
            if not scale.state_inputs and scale.state_outputs:
                raise ConfigError(f"pass '{PASS}': scale {k} receives no state to pass through (the first scale)")
            if captured.residual:
                residual = captured.residual[k]
                if residual.accumulated is None or residual.accumulated not in residual.input_names:
                    raise ConfigError(f"pass '{PASS}': residual step {k} declares no accumulated latent (ScaleSpec."
                                      "accumulated, an input and output of the same name) to pass through")

    def rewrite(self, captured) -> list[GraphEdit]:
        edits = []
        for k in self.skipped(captured):
            edits.append(_empty_scale(captured.scales[k]))
            if captured.residual:
                edits.append(_pass_latent_through(captured.residual[k]))
        return edits

    def runtime(self, captured) -> "ScaleSkipRuntime":
        return ScaleSkipRuntime(set(self.skipped(captured)))


def _empty_scale(scale) -> GraphEdit:
    """Zero logits from the token input's rows; the state inputs returned as the state outputs."""
    module, graph = scale.module, scale.module.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = list(output.args[0])
    logits = values[0]
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    value = logits.meta["val"]
    with graph.inserting_before(output):
        zeros = tag(graph.call_function(skipped_logits, (placeholders[scale.token_input], tuple(value.shape),
                                                         value.dtype)), PASS, "skipped_logits")
    zeros.meta["val"] = value
    output.args = (tuple([zeros] + [placeholders[name] for name in scale.state_inputs]),)
    for node in reversed(list(graph.nodes)):  # everything else, in-place writes and autocast markers included
        if node.op not in ("placeholder", "output") and node is not zeros:
            graph.erase_node(node)
    graph.lint()
    module.recompile()
    return GraphEdit(PASS, "scale", scale.index, added=(zeros.name,), rewired=(logits.name,))


def _pass_latent_through(graph) -> GraphEdit:
    """The accumulated latent leaves the residual step as it came in."""
    fx_graph = graph.module.graph
    output = next(n for n in reversed(fx_graph.nodes) if n.op == "output")
    values = list(output.args[0])
    position = graph.output_names.index(graph.accumulated)
    latent = next(n for n in fx_graph.nodes if n.op == "placeholder" and n.target == graph.accumulated)
    rewired = values[position].name
    values[position] = latent
    output.args = (tuple(values),)
    fx_graph.eliminate_dead_code()
    fx_graph.lint()
    graph.module.recompile()
    return GraphEdit(PASS, "residual", graph.index, rewired=(rewired,))


class ScaleSkipRuntime(PassRuntime):
    """Stats, one entry per scale that ran: ``scale`` and ``skipped`` (nothing was computed there)."""

    def __init__(self, skipped: set[int]):
        super().__init__()
        self.skipped = skipped

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region == "scale":
            self.stats.append({"scale": graph.index, "skipped": graph.index in self.skipped})
