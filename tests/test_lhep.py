"""LHEP: token gather/scatter as graph surgery on the captured Infinity scales."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.meta import annotations
from model_adapters.infinity import bits_to_codes, get_scale_schedule
from graphsurgeon.runner import GraphRunner
from passes.lhep import energy_map, keep_mask

from .helpers import generate_kwargs, outputs_equal, random_text, slice_text

SCHEDULE = get_scale_schedule(1.0, "0.25M")  # 10 scales: LHEP on 7, 8, 9 by default
GRIDS = [(h, w) for _, h, w in SCHEDULE]


@pytest.fixture(scope="module")
def tiny(tiny_float32):
    return tiny_float32


def kwargs(lens=(5, 9, 3), **extra):
    return generate_kwargs(SCHEDULE, lens, **extra)


def test_rho_one_is_bit_identical(tiny):
    baseline = get_adapter("infinity").generate(tiny, **kwargs())
    assert outputs_equal(optimize(tiny, passes=["lhep"], config={"lhep": {"rho": 1.0}}).generate(**kwargs()), baseline)
    both = optimize(tiny, passes=["lhep", "sats"], config={"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}})
    assert outputs_equal(both.generate(**kwargs()), baseline)


def test_paper_semantics_with_defaults(tiny, monkeypatch):
    cache_lengths = []
    real_run = GraphRunner.scale

    def run(self, *args, **kw):
        logits = real_run(self, *args, **kw)
        cache_lengths.append(self.state["kv0_k"].shape[2])
        return logits

    monkeypatch.setattr(GraphRunner, "scale", run)
    fast = optimize(tiny, passes=["lhep"])  # rho 0.5 on the last 3 scales
    out = fast.generate(**kwargs())
    stats = fast.stats["lhep"]
    assert [s["kept"] is not None for s in stats] == [False] * 7 + [True] * 3
    for k in (7, 8, 9):
        previous = bits_to_codes(out.bits[k - 1], 32)[:, :, 0]  # R_{k-1}, recomputed independently
        energy = energy_map(previous, GRIDS[k]).flatten(1)
        keep = keep_mask(energy, 0.5)
        assert stats[k]["kept"] == keep.sum(1).tolist()  # the graph kept exactly this set's size
        for row in range(3):  # ... the smallest set holding half the energy
            kept_energy = energy[row][keep[row]]
            assert kept_energy.sum() >= 0.5 * energy[row].sum() > kept_energy.sum() - kept_energy.min()
        upsampled = F.interpolate(out.bits[k - 1][:, 0].permute(0, 3, 1, 2).float(), size=GRIDS[k], mode="nearest")
        skipped = ~keep.reshape(3, *GRIDS[k])
        assert torch.equal(out.bits[k][:, 0].permute(0, 3, 1, 2).float()[skipped[:, None].expand_as(upsampled)],
                           upsampled[skipped[:, None].expand_as(upsampled)])  # skipped positions carry UpNearest(R_{k-1})
    widest = [max(stats[k]["kept"]) for k in (7, 8, 9)]
    earlier = sum(h * w for h, w in GRIDS[:7])
    assert cache_lengths[7] == earlier + widest[0]  # only kept tokens (padded to the widest row) enter the cache
    assert cache_lengths[9] == earlier + sum(widest)


def test_each_prompt_keeps_the_same_tokens_and_logits_as_alone(tiny):
    fast = optimize(tiny, passes=["lhep"])
    batch = fast.generate(**kwargs())
    kept = [s["kept"] for s in fast.stats["lhep"][7:]]
    assert len({tuple(k) for k in kept}) > 1 or len(set(kept[0])) > 1  # ragged: padding is exercised
    text = random_text([5, 9, 3], 256)
    for row in range(3):
        alone_fast = optimize(tiny, passes=["lhep"])
        alone = alone_fast.generate(**kwargs(lens=[[5, 9, 3][row]], text=slice_text(text, row),
                                             force_bits=[b[row:row + 1] for b in batch.bits]))
        assert [s["kept"] for s in alone_fast.stats["lhep"][7:]] == [[k[row]] for k in kept]
        for ours, ref in zip(alone.logits, batch.logits):
            assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-5


def test_with_sats_only_conditional_rows_run_after_the_stop(tiny):
    rows = []
    handle = tiny.unregistered_blocks[0].sa.proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    fast = optimize(tiny, passes=["sats", "lhep"], config={"sats": {"delta": 10.0}})
    fast.generate(**kwargs())
    handle.remove()
    widest = [max(s["kept"]) for s in fast.stats["lhep"][7:]]
    assert [r[0] for r in rows] == [6] * 8 + [3] * 2
    assert [r[1] for r in rows[7:]] == widest  # LHEP gathers from the rows the guard let through


def test_stats_summary_per_scale_and_sample(tiny):
    fast = optimize(tiny, passes=["lhep", "sats"], config={"sats": {"delta": 10.0}})
    fast.generate(**kwargs())
    summary = fast.stats["summary"]
    assert [s["scale"] for s in summary] == list(range(10))
    assert summary[5]["work_vs_baseline"] == 1.0 and summary[5]["samples"][0]["uncond_ran"]
    last = summary[9]
    kept = fast.stats["lhep"][9]["kept"]
    assert [s["tokens_computed"] for s in last["samples"]] == kept
    assert not any(s["uncond_ran"] for s in last["samples"])  # SATS stopped every sample at scale 7
    assert last["token_rows_kept"] == sum(kept) and last["work_vs_baseline_unpadded"] == sum(kept) / (1024 * 6)
    assert last["token_rows"] == 3 * max(kept) == last["token_rows_kept"] + last["token_rows_padding"]  # 3 rows ran
    assert summary[7]["samples"][0]["gamma"] is not None


def test_inserted_nodes_are_tagged(tiny):
    fast = optimize(tiny, passes=["lhep"])
    fast.capture(**{k: v for k, v in kwargs().items() if k in ("text", "scale_schedule", "cfg")})
    module = fast.graph_modules()[8]
    roles = {annotations(n)["role"] for n in module.graph.nodes if annotations(n).get("pass") == "lhep"}
    assert {"mask", "select", "gather", "gather_side_input", "attention_mask", "scatter_logits", "kv_validity"} <= roles
    gathers = [n for n in module.graph.nodes if annotations(n).get("role") == "gather_side_input"]
    assert len(gathers) == 2  # RoPE cos and sin: each of the 4 attentions slices the same rows, gathered once
    rope_uses = sum(len(g.users) for g in gathers)
    assert rope_uses == 32  # ... and used by all 4 attentions (q and k, rotated halves: 8 uses each)
    assert "keep_mask = passes_lhep_keep_mask(lhep_energy, 0.5)" in module.code


def test_lhep_cannot_act_on_the_first_scale(tiny):
    fast = optimize(tiny, passes=["lhep"], config={"lhep": {"scales": [0, 9]}})
    with pytest.raises(ConfigError, match="cannot act on scale 0"):
        fast.generate(**kwargs())
