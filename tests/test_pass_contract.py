"""The pass contract (graphsurgeon.passes.GraphPass) on small captured graphs: which ops and roles a pass inserts
and where, what it leaves alone, its typed result, and ordering by declared constraints."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError
from graphsurgeon.capture import capture
from graphsurgeon.meta import annotations
from graphsurgeon.passes import GraphEdit, GraphPass, PassConfig, PassResult, order_passes, resolve_passes
from passes.lhep import LHEP, LHEPConfig
from passes.sats import SATS, SATSConfig


@pytest.fixture
def captured():
    model = build_toy(seed=0)
    adapter = ToyAdapter()
    return capture(adapter.capture_plan(model, adapter.validate(model, labels=torch.tensor([2, 4]), cfg=2.0)))


def roles(graph) -> dict[str, list[str]]:
    """role -> node names, for the nodes a pass tagged."""
    found: dict[str, list[str]] = {}
    for node in graph.module.graph.nodes:
        info = annotations(node)
        if "pass" in info:
            found.setdefault(info["role"], []).append(node.name)
    return found


def test_lhep_inserts_gather_mask_and_scatter_only_where_it_acts(captured):
    result = LHEP(LHEPConfig(last=2))(captured)
    assert isinstance(result, PassResult) and result.modified and all(isinstance(e, GraphEdit) for e in result.edits)
    assert {(e.region, e.scale) for e in result.edits} == {("scale", 5), ("scale", 6), ("residual", 4),
                                                           ("residual", 5), ("residual", 6)}
    for scale in captured.scales[:5]:
        assert roles(scale) == {}  # untouched: not an LHEP scale, and no LHEP scale before it
    for scale in captured.scales[5:]:
        found = roles(scale)
        assert {"mask", "select", "gather", "attention_mask", "scatter_logits", "kv_validity"} <= set(found)
        assert "gather_side_input" in found  # the learned positions sliced inside the step are gathered too
        tokens = next(n for n in scale.module.graph.nodes if n.op == "placeholder" and n.target == "tokens")
        assert {annotations(u).get("role") for u in tokens.users} <= {"select", "gather"}  # nothing else reads all tokens
        attention = [n for n in scale.module.graph.nodes if n.target is F.scaled_dot_product_attention]
        assert attention and all("attn_mask" in n.kwargs for n in attention)
        assert scale.output_names[-2:] == ["lhep_history_out", "lhep_keep"] or "lhep_keep" in scale.output_names
    assert roles(captured.residual[4]) == {}  # the step before the first LHEP scale only hands its values on
    assert captured.residual[4].output_names[-1] == "indices"
    for graph in captured.residual[5:]:
        assert set(roles(graph)) == {"mask_input", "residual_input", "scatter_residual"}


def test_sats_guards_the_declared_rows_and_measures_only_at_its_scales(captured):
    result = SATS(SATSConfig(last=2))(captured)
    assert [e.scale for e in result.edits] == [5, 6]
    for scale in captured.scales[:5]:
        assert roles(scale) == {}
    for scale in captured.scales[5:]:
        found = roles(scale)
        assert len(found["cfg_branch_guard"]) == 1 and "branch_discrepancy" in found
        for name in ("tokens", "cond", *scale.state_inputs):  # every declared row input and the caches
            node = next(n for n in scale.module.graph.nodes if n.op == "placeholder" and n.target == name)
            assert [annotations(u).get("role") for u in node.users] == ["cfg_branch_guard"]


def test_preconditions_refuse_before_any_graph_is_edited(captured):
    before = [str(s.module.graph) for s in captured.scales]
    with pytest.raises(ConfigError, match="cannot act on scale 0"):
        LHEP(LHEPConfig(scales=(0, 6)))(captured)
    with pytest.raises(ConfigError, match="stop_scale"):
        SATS(SATSConfig(last=2, stop_scale=-1))(captured)
    assert [str(s.module.graph) for s in captured.scales] == before


def test_order_comes_from_declared_constraints():
    lhep, sats = resolve_passes(["lhep", "sats"])
    assert [p.name for p in order_passes([lhep, sats])] == ["sats", "lhep"]  # SATS runs_before LHEP

    class First(GraphPass):
        name: ClassVar[str] = "first"
        Config = PassConfig
        runs_before: ClassVar[tuple[str, ...]] = ("second",)

        def rewrite(self, captured):
            return []

    class Second(First):
        name: ClassVar[str] = "second"
        runs_before: ClassVar[tuple[str, ...]] = ("first",)

    with pytest.raises(ConfigError, match="cycle"):
        order_passes([First(PassConfig()), Second(PassConfig())])


def test_two_passes_providing_the_same_thing_are_refused_before_capture():
    class OtherSelection(GraphPass):
        name: ClassVar[str] = "other_selection"
        Config = PassConfig
        provides: ClassVar[tuple[str, ...]] = ("token_selection",)

        def rewrite(self, captured):
            return []

    from graphsurgeon.passes import _REGISTRY, register_pass

    register_pass(OtherSelection)
    try:
        with pytest.raises(ConfigError, match="'lhep' and 'other_selection' cannot be combined: both provide "
                                              "'token_selection'"):
            resolve_passes(["lhep", "sats", "other_selection"])
        assert [p.name for p in resolve_passes(["sats", "other_selection"])] == ["sats", "other_selection"]
    finally:
        _REGISTRY.pop("other_selection")
