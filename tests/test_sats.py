"""SATS: the CFG-branch guard as graph surgery on the captured Infinity scales."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.meta import annotations
from model_adapters.infinity import get_scale_schedule
from graphsurgeon.runner import GraphRunner
from passes.sats import cfg_branch_guard, guard_discrepancy, guided_mix

from .helpers import generate_kwargs, outputs_equal, random_text, slice_text

SCHEDULE = get_scale_schedule(1.0, "0.25M")  # 10 scales: SATS on 6-9 by default


@pytest.fixture(scope="module")
def tiny(tiny_float32):
    return tiny_float32


def kwargs(lens=(5, 9, 3), **extra):
    return generate_kwargs(SCHEDULE, lens, **extra)


def test_never_stopping_is_bit_identical(tiny):
    baseline = get_adapter("infinity").generate(tiny, **kwargs())
    fast = optimize(tiny, passes=["sats"], config={"sats": {"delta": 0.0}})
    assert outputs_equal(fast.generate(**kwargs()), baseline)
    assert [r["rows"] for r in fast.stats["sats"]] == [6] * 10


class RowCounter:
    """Counts the rows reaching the first block's attention projection, per call."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.unregistered_blocks[0].sa.proj.register_forward_hook(
            lambda module, args, out: self.rows.append(args[0].shape[0]))


def test_after_the_stop_no_unconditional_row_runs_and_caches_have_b_rows(tiny, monkeypatch):
    cache_rows = []
    real_run = GraphRunner.scale

    def run(self, *args, **kw):
        logits = real_run(self, *args, **kw)
        cache_rows.append({t.shape[0] for t in self.state.values()})
        return logits

    monkeypatch.setattr(GraphRunner, "scale", run)
    counter = RowCounter(tiny)
    fast = optimize(tiny, passes=["sats"], config={"sats": {"delta": 10.0}})  # every sample stops at once
    fast.generate(**kwargs())
    counter.handle.remove()
    stats = fast.stats["sats"]
    assert [r["delta"] is not None for r in stats] == [False] * 6 + [True] * 4
    assert stats[7]["stopped_after"] == [True] * 3  # first possible stop: the second SATS scale
    assert counter.rows == [6] * 8 + [3] * 2  # scales 8 and 9: only the 3 conditional rows reach the blocks
    assert cache_rows[7] == {6} and cache_rows[8] == {3} and cache_rows[9] == {3}


def test_each_sample_stops_on_its_own_and_matches_itself_alone(tiny):
    """Batch invariance under teacher forcing: same stop scale and logits as the prompt generated alone."""
    probe = optimize(tiny, passes=["sats"], config={"sats": {"delta": 0.0}})
    probe.generate(**kwargs())
    gammas = probe.stats["sats"][7]["gamma"]
    delta = sorted(gammas)[1] - 1e-6  # between the smallest and the middle gamma: exactly one sample stops
    fast = optimize(tiny, passes=["sats"], config={"sats": {"delta": delta}})
    batch = fast.generate(**kwargs())
    stopped = fast.stats["sats"][7]["stopped_after"]
    assert sum(stopped) == 1 and fast.stats["sats"][8]["rows"] == 5
    text = random_text([5, 9, 3], 256)
    for row in range(3):
        alone_fast = optimize(tiny, passes=["sats"], config={"sats": {"delta": delta}})
        alone = alone_fast.generate(**kwargs(lens=[[5, 9, 3][row]], text=slice_text(text, row),
                                             force_bits=[b[row:row + 1] for b in batch.bits]))
        assert alone_fast.stats["sats"][7]["stopped_after"] == [stopped[row]]
        for ours, ref in zip(alone.logits, batch.logits):
            assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-5


def test_guard_node_selects_rows_text_and_caches():
    batch = 2
    stopped = torch.tensor([False, True])
    rows = (torch.arange(4.0)[:, None],)
    values, offsets = torch.arange(10.0), torch.tensor([0, 1, 3, 6, 10], dtype=torch.int32)  # texts of 1, 2, 3, 4
    caches = (torch.arange(4.0)[:, None] * 10,)
    active, tokens, new_values, new_offsets, cache = cfg_branch_guard(stopped, torch.arange(4), batch, rows,
                                                                      (values, offsets), caches)
    assert active.tolist() == [0, 1, 2] and tokens.flatten().tolist() == [0, 1, 2]
    assert new_values.tolist() == [0, 1, 2, 3, 4, 5] and new_offsets.tolist() == [0, 1, 3, 6]
    assert cache.flatten().tolist() == [0, 10, 20]
    # next scale: the caches already hold rows [0, 1, 2]
    active, *_, next_cache = cfg_branch_guard(stopped, active, batch, rows, (values, offsets), (cache,))
    assert next_cache is cache  # not copied again
    assert cache._base is caches[0]  # rows 0-2 of the caches: a view, not a copy
    active, *_, cache = cfg_branch_guard(torch.tensor([True, False]), torch.arange(4), batch, rows, (values, offsets),
                                         caches)
    assert active.tolist() == [0, 1, 3] and cache.flatten().tolist() == [0, 10, 30]  # rows 0, 1, 3: gathered
    everything = cfg_branch_guard(torch.tensor([False, False]), torch.arange(4), batch, rows, (values, offsets), caches)
    assert everything[1] is rows[0] and everything[-1] is caches[0]  # nothing dropped: inputs untouched


def test_mix_uses_conditional_logits_after_the_stop():
    logits = torch.tensor([[[1.0]], [[2.0]], [[5.0]]])  # cond 0, cond 1, uncond 0 (sample 1 stopped)
    active = torch.tensor([0, 1, 2])
    mixed = guided_mix(logits, active, batch=2, rule=lambda c, u: 3.0 * c + (1 - 3.0) * u)
    assert mixed.flatten().tolist() == [3 * 1.0 - 2 * 5.0, 2.0]
    delta = guard_discrepancy(logits, active, batch=2)
    assert delta[0].item() == 4.0 and torch.isnan(delta[1])


def test_guard_nodes_are_named_and_tagged(tiny):
    fast = optimize(tiny, passes=["sats"])
    fast.capture(**{k: v for k, v in kwargs().items() if k in ("text", "scale_schedule", "cfg")})
    modules = fast.graph_modules()
    for index, module in enumerate(modules):
        roles = {annotations(n).get("role") for n in module.graph.nodes if annotations(n).get("pass") == "sats"}
        assert roles == (set() if index < 6 else {"guard_input", "cfg_branch_guard", "guarded_input", "branch_discrepancy"})
    assert "cfg_branch_guard = passes_sats_cfg_branch_guard(sats_stopped, sats_cache_rows, 3," in modules[6].code
    assert {e["scale"] for e in fast.edits} == {6, 7, 8, 9}


def test_sats_needs_cfg(tiny):
    fast = optimize(tiny, passes=["sats"])
    with pytest.raises(ConfigError, match="needs classifier-free guidance"):
        fast.generate(**kwargs(cfg=1.0))
