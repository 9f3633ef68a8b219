"""Capture and emit on the reference Infinity model: equality, explicit state, token axes, refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.capture import CaptureError, capture
from graphsurgeon.graph_view import to_networkx
from graphsurgeon.meta import annotations
from model_adapters.infinity import build_infinity, get_scale_schedule
from model_adapters.infinity.model import SelfAttention

from .helpers import outputs_equal, random_text

SCHEDULE = get_scale_schedule(1.0, "0.25M")  # 10 scales, up to 32x32


@pytest.fixture(scope="module")
def tiny():
    return build_infinity("infinity-tiny", seed=0)


@pytest.mark.parametrize("lens", [[7], [5, 9, 3]], ids=["batch1", "batch3"])
def test_no_passes_is_bit_identical_to_baseline(tiny, lens):
    kwargs = dict(text=random_text(lens, 256), scale_schedule=SCHEDULE, cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
                  seed=5, return_logits=True)
    baseline = get_adapter("infinity").generate(tiny, **kwargs)
    fast = optimize(tiny, adapter="infinity", passes=[])
    assert outputs_equal(fast.generate(**kwargs), baseline)
    modules = fast.graph_modules()
    assert len(modules) == len(SCHEDULE) and all(isinstance(m, torch.fx.GraphModule) for m in modules)


def test_graphs_are_cached_per_specialisation(tiny):
    fast = optimize(tiny)
    kwargs = dict(scale_schedule=get_scale_schedule(1.0, "0.06M"), cfg=3.0, seed=1)
    fast.generate(text=random_text([4], 256), **kwargs)
    first = fast.graph_modules()
    fast.generate(text=random_text([4], 256, seed=9), **kwargs)  # same lengths: same graphs
    assert fast.graph_modules()[0] is first[0]
    fast.generate(text=random_text([6], 256), **kwargs)  # other text length: new capture
    assert fast.graph_modules()[0] is not first[0]


def capture_tiny(model, lens=(5, 9), pn="0.06M"):
    adapter = get_adapter("infinity")
    args = adapter.validate(model, text=random_text(list(lens), 256), scale_schedule=get_scale_schedule(1.0, pn), cfg=3.0)
    return capture(adapter.capture_plan(model, args))


def test_kv_caches_are_explicit_graph_inputs_and_outputs(tiny):
    captured = capture_tiny(tiny)
    first, later = captured.scales[0], captured.scales[3]
    assert first.state_inputs == [] and first.state_outputs == [f"kv{i}_{kv}" for i in range(4) for kv in "kv"]
    placeholders = [n.target for n in later.module.graph.nodes if n.op == "placeholder"]
    assert placeholders[-8:] == later.state_outputs == later.state_inputs
    appends = [n for n in later.module.graph.nodes if annotations(n).get("role") == "kv_cache_append"]
    assert len(appends) == 8 and all(n.target is torch.cat for n in appends)
    assert all(n.args[0][0].op == "placeholder" for n in appends)  # cache input first, then this scale's k/v
    assert all(b.sa.cached_k is None and not b.sa.caching for b in tiny.unregistered_blocks)  # model untouched


def test_token_axes_and_side_inputs(tiny):
    scale = capture_tiny(tiny).scales[4]  # 8x8 grid, 64 tokens
    nodes = {n.name: n for n in scale.module.graph.nodes}
    axis = lambda n: annotations(n).get("token_axis")  # noqa: E731
    assert axis(nodes["tokens"]) == 1
    attention = [n for n in nodes.values() if n.target is F.scaled_dot_product_attention]
    assert len(attention) == 4 and all(axis(n) == 2 for n in attention)  # (B, H, L, c)
    logits = next(n for n in nodes.values() if annotations(n).get("output") == "logits")
    assert axis(logits) == 1 and logits.meta["val"].shape == (4, 64, 64)
    roots = [n for n in nodes.values() if annotations(n).get("side_input_root")]
    assert roots and all(n.meta["val"].shape[annotations(n)["token_axis"]] == 64 for n in roots)
    assert {source_of(n) for n in roots} == {"rope_table"}  # every per-token side input is a RoPE slice
    assert len(roots) == 8  # cos and sin slice, in each of the 4 attentions


def source_of(node: torch.fx.Node) -> str:
    while node.op != "placeholder":
        node = node.all_input_nodes[0]
    return node.target


def test_autocast_regions_survive_capture(tiny):
    graph = capture_tiny(tiny).scales[1].module.graph
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    enters = [n for n in graph.nodes if n.target is _enter_autocast]
    exits = [n for n in graph.nodes if n.target is _exit_autocast]
    assert len(enters) == len(exits) == 4 + 4 + 1  # block gates, RoPE, head
    assert all(n.args[2] is False for n in enters)  # all of them disable autocast


def test_networkx_view(tiny):
    module = capture_tiny(tiny).scales[2].module
    view = to_networkx(module)
    assert view.number_of_nodes() == len(module.graph.nodes)
    assert view.nodes["tokens"]["token_axis"] == 1 and view.nodes["tokens"]["shape"] == (4, 16, 256)
    assert view.number_of_edges() == sum(len(n.all_input_nodes) for n in module.graph.nodes)


class LeakyAttention(SelfAttention):
    """Stores its last output in an attribute the adapter does not declare."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.last_output = out
        return out


def test_capture_refuses_undeclared_state():
    model = build_infinity("infinity-tiny", seed=0)
    leaky = model.unregistered_blocks[1].sa
    leaky.__class__ = LeakyAttention
    with pytest.raises(CaptureError, match=r"block_chunks\.0\.module\.1\.sa\.last_output \(LeakyAttention\)"):
        capture_tiny(model)
    assert "last_output" not in vars(leaky)  # the refused capture left nothing behind on the model


class BranchyAttention(SelfAttention):
    """Branches on tensor data: tracing would freeze the branch."""

    def forward(self, x, *args, **kwargs):
        if x.abs().max() > 100:
            x = x / 100
        return super().forward(x, *args, **kwargs)


def test_capture_refuses_data_dependent_branch():
    model = build_infinity("infinity-tiny", seed=0)
    model.unregistered_blocks[2].sa.__class__ = BranchyAttention
    with pytest.raises(CaptureError, match=r"branch.*block_chunks\.1\.module\.0\.sa' \(BranchyAttention\)"):
        capture_tiny(model)


def test_capture_refuses_writes_into_weights():
    class Writer(SelfAttention):
        def forward(self, x, *args, **kwargs):
            self.q_bias.add_(1.0)
            return super().forward(x, *args, **kwargs)

    model = build_infinity("infinity-tiny", seed=0)
    model.unregistered_blocks[0].sa.__class__ = Writer
    with pytest.raises(CaptureError, match="writes into model tensor 'model.block_chunks.0.module.0.sa.q_bias'"):
        capture_tiny(model)


def test_optimize_rejects_unknown_pass_before_work(tiny):
    with pytest.raises(ConfigError, match=r"unknown pass\(es\) \['warp-drive'\]; available: \[.*'lhep', 'sats'"):
        optimize(tiny, passes=["warp-drive"])
