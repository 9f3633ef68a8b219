"""DepthVAR: per-token depth from the previous scale's block changes, per-block gather/merge, code blending.

The semantics test runs an independent reference on the worked example: a sampler written here with the toy's own
blocks, each called on the tokens whose depth covers it (plain indexing, Python loops for the ranking, the
rotation and the bit-reversal order), skipped tokens given the upsampled change of the block at the previous scale,
codes weighted by depth. The pass's graphs must give the same depths and the same logits, bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy, residual_step
from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.flops import measure_flops
from graphsurgeon.meta import annotations
from graphsurgeon.runner import GraphRunner
from model_adapters.infinity import build_infinity, get_scale_schedule
from passes.depthvar import bit_reversal_order, layer_ranks, token_depths

from .helpers import generate_kwargs, outputs_equal

LABELS = torch.tensor([1, 3, 7])


# -- the independent reference ----------------------------------------------------------------------------
def reversed_bits(value: int, bits: int) -> int:
    return int(format(value, f"0{bits}b")[::-1], 2)


def reference_order(layers: int) -> list[int]:
    """Layers sorted by their bit-reversed index (the bit-reversal permutation, larger values left out)."""
    bits = max(1, math.ceil(math.log2(layers)))
    return sorted(range(layers), key=lambda layer: reversed_bits(layer, bits))


def reference_depths(decision: list[float], layers: int, budget: float, theta: float) -> list[int]:
    n = len(decision)
    ranked = sorted(range(n), key=lambda p: (decision[p], p))
    rank = {p: r for r, p in enumerate(ranked)}
    depths = []
    for p in range(n):
        score = ((rank[p] + 0.5) / n + theta) % 1.0
        score = score ** (1.0 / budget - 1.0)
        depths.append(min(layers, max(0, math.floor(score * layers + 0.5))))
    return depths


def upsample(delta: torch.Tensor, grid_from: int, grid_to: int) -> torch.Tensor:
    rows, _, channels = delta.shape
    maps = delta.transpose(1, 2).reshape(rows, channels, grid_from, grid_from)
    return F.interpolate(maps, size=(grid_to, grid_to), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


@torch.no_grad()
def reference_generate(toy, labels, cfg, seed, reference=-4, rotation=0.25, proxy=True, blend=True, flatten=None):
    """The toy sampler with DepthVAR written out; returns (logits per scale, total, depths per DepthVAR scale)."""
    config, batch = toy.config, labels.numel()
    grids, layers = config.grids, config.depth
    reference %= len(grids)
    order = reference_order(layers)
    labels2 = torch.cat([labels, torch.full_like(labels, config.num_classes)])
    cond = toy.class_emb(labels2)
    rows = 2 * batch
    tokens = toy.sos.expand(rows, 1, -1)
    total = torch.zeros(batch, config.code_dim, grids[-1], grids[-1])
    generator = torch.Generator().manual_seed(seed)
    cache, deltas, logits_out, depth_maps = {}, None, [], {}
    every_row = torch.arange(rows)[:, None]
    for si, grid in enumerate(grids):
        if si == 0:
            x = cond.view(rows, config.prefix, -1)
            for block in toy.blocks:
                x = block(x, cond, cache)
        if flatten == si:
            tokens = tokens[:, :1].expand_as(tokens)
        start = sum(g * g for g in grids[:si])
        x = tokens + toy.pos[start:start + grid * grid] + toy.scale_emb.weight[si]
        new_deltas, depth = [], None
        if si > reference:
            budget = min(1.0, grids[reference] ** 2 / grid ** 2)
            theta = ((si - reference - 1) * rotation) % 1.0
            decision = sum(d[:batch].abs().mean(dim=-1) for d in deltas)
            decision = F.interpolate(decision.reshape(batch, 1, grids[si - 1], grids[si - 1]), size=(grid, grid),
                                     mode="bilinear", align_corners=False).flatten(1)
            depth = [reference_depths(decision[b].tolist(), layers, budget, theta) for b in range(batch)]
            depth_maps[si] = depth
        for layer, block in enumerate(toy.blocks):
            if depth is None:
                y = block(x, cond, cache)
            else:
                place = order.index(layer)
                index = torch.tensor([[p for p in range(grid * grid) if depth[r % batch][p] > place] for r in range(rows)])
                y = x + upsample(deltas[layer], grids[si - 1], grid) if proxy else x.clone()
                y[every_row, index] = block(x[every_row, index], cond, cache)
            new_deltas.append(y - x)
            x = y
        deltas = new_deltas
        logits = toy.head(x)
        logits = logits[batch:] + cfg * (logits[:batch] - logits[batch:])
        logits_out.append(logits)
        drawn = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator).view(batch, grid, grid)
        codes = toy.codebook(drawn).permute(0, 3, 1, 2)
        if blend and depth is not None:
            codes = codes * (torch.tensor(depth, dtype=torch.float64) / layers).reshape(batch, 1, grid, grid).float()
        total = total + F.interpolate(codes, size=(grids[-1], grids[-1]), mode="bilinear", align_corners=False)
        if si + 1 < len(grids):
            nxt = F.interpolate(total, size=(grids[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
            tokens = toy.code_in(nxt).repeat(2, 1, 1)
    return logits_out, total, depth_maps


# -- the schedule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2, 3, 4, 16, 24, 30, 32])
def test_bit_reversal_order_and_ranks(layers):
    order = bit_reversal_order(layers)
    assert order == reference_order(layers)
    assert sorted(order) == list(range(layers))
    assert [layer_ranks(layers)[layer] for layer in order] == list(range(layers))
    if layers == 32:
        assert order[:5] == [0, 16, 8, 24, 4]  # the paper's example: depth 5 of 32


def test_depths_match_the_reference_on_random_and_flat_maps():
    generator = torch.Generator().manual_seed(0)
    decision = torch.rand(3, 13 * 13, generator=generator)
    decision[1] = 0.5  # flat: ranks by position
    decision[2, 20:60] = decision[2, 20]  # a flat patch inside a random map
    for layers, budget, theta in [(4, 0.3, 0.0), (32, 0.25, 0.75), (30, 0.6, 0.5), (4, 1.0, 0.25)]:
        ours = token_depths(decision, layers, budget, theta)
        assert ours.tolist() == [reference_depths(row.tolist(), layers, budget, theta) for row in decision]
        assert ours[0].sort().values.tolist() == ours[1].sort().values.tolist()  # same depths in every sample
        if budget == 1.0:
            assert bool((ours == layers).all())
        else:
            assert abs(ours.double().mean().item() / layers - budget) < 0.05
    flat = token_depths(decision[1:2], 4, 0.3, 0.0)[0]
    assert flat.tolist() == sorted(flat.tolist())  # equal values: the earlier position ranks lower
    rotated = token_depths(decision, 4, 0.3, 0.5)
    assert not torch.equal(rotated, token_depths(decision, 4, 0.3, 0.0))


# -- the worked example, against the reference ------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return build_toy({"depth": 4}, seed=0)  # 4 blocks: bit-reversal order 0, 2, 1, 3


def toy_kwargs(**overrides):
    return {"labels": LABELS, "cfg": 2.5, "seed": 5, **overrides}


def flatten_tokens(monkeypatch, scale: int) -> None:
    """Scale ``scale``'s tokens all equal to the first (the reference does the same): a flat decision map next."""
    real = GraphRunner.scale

    def run(self, index, inputs):
        if index == scale:
            inputs = {**inputs, "tokens": inputs["tokens"][:, :1].expand_as(inputs["tokens"]).contiguous()}
        return real(self, index, inputs)

    monkeypatch.setattr(GraphRunner, "scale", run)


@pytest.mark.parametrize("settings", [
    {},
    {"proxy": "identity", "rotation": 0.5},
    {"blend": False, "reference_scale": 2, "rotation": 0.0},
    {"flatten": 3},  # a flat stream at R: its block changes equal up to rounding, the ranking decided by it
])
def test_matches_the_reference_sampler_bit_for_bit(toy, monkeypatch, settings):
    settings = dict(settings)
    flatten = settings.pop("flatten", None)
    if flatten is not None:
        flatten_tokens(monkeypatch, flatten)
        start = sum(g * g for g in toy.config.grids[:flatten])
        table = toy.pos.detach().clone()
        table[start:start + toy.config.grids[flatten] ** 2] = table[start]  # the positions too: a flat stream
        monkeypatch.setattr(toy.pos, "data", table)
    fast = optimize(toy, adapter=ToyAdapter(), passes=["depthvar"], config={"depthvar": settings})
    out = fast.generate(**toy_kwargs())
    logits, total, depths = reference_generate(
        toy, LABELS, 2.5, 5, reference=settings.get("reference_scale", -4), rotation=settings.get("rotation", 0.25),
        proxy=settings.get("proxy", "cached_delta") == "cached_delta", blend=settings.get("blend", True),
        flatten=flatten)
    stats = fast.stats["depthvar"]
    acting = [s["scale"] for s in stats if s["depth_map"] is not None]
    assert acting == sorted(depths) and acting
    for k in acting:
        assert [sum(rows, []) for rows in stats[k]["depth_map"]] == depths[k]
        counts = [sum(d > r for d in depths[k][0]) for r in layer_ranks(4)]
        assert stats[k]["layer_tokens"] == counts and len(set(counts)) > 1  # blocks computed different subsets
    assert all(torch.equal(a, b) for a, b in zip(out.logits, logits))
    assert torch.equal(out.total, total)


def test_neutral_settings_are_bit_identical_on_the_example(toy):
    baseline = ToyAdapter().generate(toy, **toy_kwargs())
    for settings in ({"budget": 1.0}, {"reference_scale": -1}, {"budget": 1.0, "proxy": "identity"}):
        fast = optimize(toy, adapter=ToyAdapter(), passes=["depthvar"], config={"depthvar": settings})
        out = fast.generate(**toy_kwargs())
        assert all(torch.equal(a, b) for a, b in zip(out.logits, baseline.logits))
        assert torch.equal(out.total, baseline.total)
        assert bool(fast.edits) == ("budget" in settings)  # budget 1 runs rewritten graphs, R = -1 edits nothing


def test_graph_roles_flops_and_cache_growth_on_the_example(toy):
    fast = optimize(toy, adapter=ToyAdapter(), passes=["depthvar"])
    caches = {}
    real = GraphRunner.scale

    def run(self, index, inputs):
        outputs = real(self, index, inputs)
        caches[index] = [self.state[f"k{i}"].shape[2] for i in range(4)]
        return outputs

    GraphRunner.scale, saved = run, real
    try:
        fast.generate(**toy_kwargs())
    finally:
        GraphRunner.scale = saved
    stats = fast.stats["depthvar"]
    for k in (4, 5, 6):  # each block's KV cache grows by the tokens it computed
        assert [b - a for a, b in zip(caches[k - 1], caches[k])] == stats[k]["layer_tokens"]
    roles = {annotations(n).get("role") for n in fast.graph_modules()[5].graph.nodes
             if annotations(n).get("pass") == "depthvar"}
    assert roles == {"block_deltas_input", "decision_map", "depths", "layer_mask", "select", "gather", "proxy",
                     "merge", "block_deltas"}
    flops = measure_flops(fast, **toy_kwargs())
    assert flops["optimized"][:3] == flops["baseline"][:3]
    assert all(o < 0.8 * b for o, b in zip(flops["optimized"][4:], flops["baseline"][4:]))


# -- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, needle", [
    ({"depthvar": {"budget": 0.0}}, "budget"),
    ({"depthvar": {"rotation": 1.0}}, "rotation"),
    ({"depthvar": {"proxy": "nearest"}}, "proxy"),
    ({"depthvar": {"reference_scale": 7}}, "outside the schedule"),
    ({"depthvar": {"keep_ratio": 0.5}}, "keep_ratio"),
])
def test_bad_settings_are_refused(toy, config, needle):
    with pytest.raises(ConfigError, match=needle):
        optimize(toy, adapter=ToyAdapter(), passes=["depthvar"], config=config).generate(**toy_kwargs())


def test_combinations_it_cannot_follow_are_refused_before_capture(toy):
    for other, what in (("lhep", "token_selection"), ("stepvar", "token_selection"), ("sparvar", "attention_pattern")):
        with pytest.raises(ConfigError, match=f"both provide '{what}'"):
            optimize(toy, adapter=ToyAdapter(), passes=["depthvar", other])
    with pytest.raises(ConfigError, match="row guard"):
        optimize(toy, adapter=ToyAdapter(), passes=["depthvar", "sats"]).generate(**toy_kwargs())


def test_missing_blocks_and_unblendable_residual_steps_are_refused(toy, monkeypatch):
    real_plan = ToyAdapter.capture_plan

    def without_blocks(self, model, args):
        return dataclasses.replace(real_plan(self, model, args), blocks=())

    monkeypatch.setattr(ToyAdapter, "capture_plan", without_blocks)
    with pytest.raises(ConfigError, match="declares no blocks"):
        optimize(toy, adapter=ToyAdapter(), passes=["depthvar"]).generate(**toy_kwargs())

    def wrong_blocks(self, model, args):
        return dataclasses.replace(real_plan(self, model, args), blocks=("blocks.0", "head"))

    monkeypatch.setattr(ToyAdapter, "capture_plan", wrong_blocks)
    with pytest.raises(ConfigError, match="'head'"):
        optimize(toy, adapter=ToyAdapter(), passes=["depthvar"]).generate(**toy_kwargs())

    def sum_from_indices(model, si, inputs, repeat):  # the running sum bypasses R_k: blending could not reach it
        out = residual_step(model, si, inputs, repeat)
        return {**out, "total": out["total"] + inputs["indices"].sum() * 0}

    monkeypatch.setattr(ToyAdapter, "capture_plan", real_plan)
    monkeypatch.setattr("examples.toy_nsp.model.residual_step", sum_from_indices)
    with pytest.raises(ConfigError, match="other than through its residual_output"):
        optimize(toy, adapter=ToyAdapter(), passes=["depthvar"]).generate(**toy_kwargs())
    optimize(toy, adapter=ToyAdapter(), passes=["depthvar"], config={"depthvar": {"blend": False}}).generate(**toy_kwargs())


# -- Infinity and VAR, unchanged -------------------------------------------------------------------------------
def test_infinity_neutral_is_bit_identical_and_defaults_cut_block_work():
    model = build_infinity("infinity-tiny", seed=0)
    kwargs = generate_kwargs(get_scale_schedule(1.0, "0.06M"), (5, 3))  # ..., 8x8, 12x12, 16x16
    baseline = get_adapter("infinity").generate(model, **kwargs)
    neutral = optimize(model, passes=["depthvar"], config={"depthvar": {"budget": 1.0}})
    assert outputs_equal(neutral.generate(**kwargs), baseline)
    fast = optimize(model, passes=["depthvar"])
    out = fast.generate(**kwargs)
    stats = fast.stats["depthvar"]
    assert [s["scale"] for s in stats if s["depth_map"]] == [4, 5, 6]
    for k in (4, 5, 6):  # budget: scale 3's 36 tokens over this scale's
        assert abs(stats[k]["token_layers_vs_dense"] - 36 / stats[k]["tokens"]) < 0.1
        assert stats[k]["mean_depth"][0] == stats[k]["mean_depth"][1]
    assert not outputs_equal(out, baseline)
    flops = measure_flops(fast, **kwargs)
    assert flops["optimized"][:4] == flops["baseline"][:4]
    assert sum(flops["optimized"][4:]) < 0.6 * sum(flops["baseline"][4:])


def test_var_neutral_is_bit_identical_and_a_sample_alone_gets_its_batch_depths():
    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    vae = adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]
    kwargs = {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11, "return_logits": True}
    baseline = adapter.generate(model, **kwargs)
    neutral = optimize(model, adapter="var", passes=["depthvar"], config={"depthvar": {"budget": 1.0}})
    same = neutral.generate(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(same.logits, baseline.logits)) and torch.equal(same.f_hat, baseline.f_hat)
    fast = optimize(model, adapter="var", passes=["depthvar"])
    together = fast.generate(**kwargs)
    stats = fast.stats["depthvar"]
    assert [tuple(s["grid"]) for s in stats if s["depth_map"]] == [(10, 10), (13, 13), (16, 16)]
    flops = measure_flops(fast, **kwargs)
    assert sum(flops["optimized"][7:]) < 0.8 * sum(flops["baseline"][7:])  # 2 blocks: the head (V 4096) stays
    row = 2
    alone_fast = optimize(model, adapter="var", passes=["depthvar"])
    alone = alone_fast.generate(**{**kwargs, "labels": LABELS[row:row + 1],
                                   "force_indices": [i[row:row + 1] for i in together.indices]})
    for mine, theirs in zip(alone_fast.stats["depthvar"], stats):
        assert mine["depth_map"] is None or mine["depth_map"] == [theirs["depth_map"][row]]
    for ours, ref in zip(alone.logits, together.logits):
        assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-4


def test_a_depthvar_scale_exports_to_onnx_and_runs_the_same(toy, tmp_path):
    fast = optimize(toy, adapter=ToyAdapter(), passes=["depthvar"])
    fast.generate(**toy_kwargs())
    entry = fast.export(tmp_path)["onnx"]
    assert entry["inserted_by_passes"]["depthvar"]["merge"] == 4
    assert entry["checker"].endswith("passed")
    assert entry["onnxruntime"] and all(r["vs_graph"]["max_rel_l2"] <= 5e-4 for r in entry["onnxruntime"])
