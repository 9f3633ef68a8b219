"""The adapter on the official ``infinity.models.infinity.Infinity`` class, traced unchanged.

The official code is not in this repository. Set ``GRAPHSURGEON_OFFICIAL_INFINITY`` to a checkout of
FoundationVision/Infinity to run these tests (numpy must be installed); without it they skip.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from graphsurgeon import get_adapter, optimize
from graphsurgeon.capture import capture
from model_adapters.infinity import build_infinity, get_scale_schedule

from .helpers import random_text

CHECKOUT = os.environ.get("GRAPHSURGEON_OFFICIAL_INFINITY")
pytestmark = pytest.mark.skipif(
    not CHECKOUT or importlib.util.find_spec("numpy") is None,
    reason="set GRAPHSURGEON_OFFICIAL_INFINITY to a FoundationVision/Infinity checkout (and install numpy)")

SCHEDULE = get_scale_schedule(1.0, "0.25M")


@pytest.fixture(scope="module")
def pair():
    from model_adapters.infinity.official import build_official_infinity

    ours = build_infinity("infinity-tiny", seed=0)
    official = build_official_infinity(CHECKOUT, "infinity-tiny")
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours, official


def test_module_tree_and_state_dict_match(pair):
    ours, official = pair
    assert type(official).__module__ == "infinity.models.infinity"
    assert [n for n, _ in official.named_modules()] == [n for n, _ in ours.named_modules()]
    assert [(k, v.shape) for k, v in official.state_dict().items()] == [(k, v.shape) for k, v in ours.state_dict().items()]


@pytest.mark.parametrize("lens", [[7], [5, 9, 3]], ids=["batch1", "batch3"])
def test_optimized_official_is_bit_identical_and_matches_ours(pair, lens):
    ours, official = pair
    kwargs = dict(text=random_text(lens, 256), scale_schedule=SCHEDULE, cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
                  seed=5, return_logits=True)
    baseline = get_adapter("infinity").generate(official, **kwargs)
    fast = optimize(official).generate(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(baseline.bits, fast.bits))
    assert all(torch.equal(a, b) for a, b in zip(baseline.logits, fast.logits))
    assert torch.equal(baseline.summed_codes, fast.summed_codes)
    reference = get_adapter("infinity").generate(ours, **kwargs)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(reference.logits, baseline.logits)) <= 5e-4


def test_official_capture_finds_state_and_side_inputs(pair):
    _, official = pair
    adapter = get_adapter("infinity")
    args = adapter.validate(official, text=random_text([5], 256), scale_schedule=SCHEDULE, cfg=3.0)
    captured = capture(adapter.capture_plan(official, args))
    report = captured.report
    assert len(report.state) == 8 and report.scales[3].kv_appends == 8
    assert report.scales[3].autocast_regions == 9
    roots = {entry["root_source"] for entry in report.scales[3].side_inputs}
    assert roots == {"placeholder:rope_table", "get_attr:_tensor_constant0"}  # RoPE slices, per-token level embedding
    assert report.wrapped  # flash-attn's packed attention became one custom-op node


def test_ld_pruning_on_the_official_class(pair):
    """The passes rewrite the official graphs too: nothing pruned is bit-identical; pruned matches ours."""
    ours, official = pair
    kwargs = dict(text=random_text([5, 9, 3], 256), scale_schedule=SCHEDULE, cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
                  seed=5, return_logits=True)
    baseline = get_adapter("infinity").generate(official, **kwargs)
    nothing = optimize(official, passes=["sats", "lhep"], config={"sats": {"delta": 0.0}, "lhep": {"rho": 1.0}})
    unpruned = nothing.generate(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(baseline.logits, unpruned.logits))
    assert torch.equal(baseline.summed_codes, unpruned.summed_codes)
    settings = {"sats": {"delta": 0.06}}
    fast_official, fast_ours = optimize(official, passes=["sats", "lhep"], config=settings), optimize(
        ours, passes=["sats", "lhep"], config=settings)
    a, b = fast_official.generate(**kwargs), fast_ours.generate(**kwargs)
    decisions = lambda stats: ([(s["rows"], s["stopped_after"]) for s in stats["sats"]],  # noqa: E731
                               [s["kept"] for s in stats["lhep"]])
    assert decisions(fast_official.stats) == decisions(fast_ours.stats)
    assert any(s["rows"] < 6 for s in fast_official.stats["sats"])  # some unconditional rows did stop
    assert max(((x - y).norm() / y.norm().clamp_min(1e-9)).item() for x, y in zip(a.logits, b.logits)) <= 5e-4
