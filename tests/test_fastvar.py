"""FastVAR: pivotal tokens (distance to the mean token) before every sub-layer, restoration from the cache scale.

The semantics test runs an independent reference on the worked example: its blocks split into their residual
branches by hand (the toy's own modules), tokens ranked by a Python sort of the squared distance to the mean token
(``x.mean``, not the pass's pooling), branch outputs at the cache scale kept in a dict and area-resized. The pass's
graphs must keep the same tokens in every row and sub-layer and give the same logits.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError, get_adapter, optimize
from graphsurgeon.flops import measure_flops
from graphsurgeon.meta import annotations
from graphsurgeon.runner import GraphRunner
from model_adapters.infinity import build_infinity, get_scale_schedule
from passes.fastvar import pivotal_tokens

from .helpers import generate_kwargs, outputs_equal

LABELS = torch.tensor([1, 3, 7])
TOY_SETTINGS = {"ratios": {-3: 0.4, -2: 0.5}, "cache_scale": -4, "blocks": (1, 4)}  # scales 4, 5 from 3; blocks 1-3


# -- the independent reference ----------------------------------------------------------------------------
def reference_keep(x: torch.Tensor, keep: int) -> list[list[int]]:
    """Per row, the ``keep`` tokens farthest from the row's mean token, farthest first (equal: earlier first)."""
    score = ((x.double() - x.double().mean(dim=1, keepdim=True)) ** 2).sum(dim=-1)
    return [sorted(range(x.shape[1]), key=lambda p: (-row[p], p))[:keep] for row in score.tolist()]


def branches(block, cond, cache):
    """The toy block as its residual branches (condition add, attention, MLP), written out from its modules."""
    def attention(h):
        rows, length, dim = h.shape
        q, k, v = block.qkv(block.norm1(h)).view(rows, length, 3, block.heads, dim // block.heads).permute(2, 0, 3, 1, 4)
        name_k, name_v = f"k{block.index}", f"v{block.index}"
        if name_k in cache:
            k, v = torch.cat([cache[name_k], k], dim=2), torch.cat([cache[name_v], v], dim=2)
        cache[name_k], cache[name_v] = k, v
        return block.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, length, dim))

    return [attention, lambda h: block.mlp(block.norm2(h))]


@torch.no_grad()
def reference_generate(toy, labels, cfg, seed, ratios: dict[int, float], cache_scale: int, blocks: range):
    """The toy sampler with FastVAR written out; returns (logits per scale, total, kept per (scale, block, branch))."""
    config, batch = toy.config, labels.numel()
    grids = config.grids
    labels2 = torch.cat([labels, torch.full_like(labels, config.num_classes)])
    cond = toy.class_emb(labels2)
    rows = 2 * batch
    tokens = toy.sos.expand(rows, 1, -1)
    total = torch.zeros(batch, config.code_dim, grids[-1], grids[-1])
    generator = torch.Generator().manual_seed(seed)
    cache, stored, kept, logits_out = {}, {}, {}, []
    every_row = torch.arange(rows)[:, None]
    for si, grid in enumerate(grids):
        if si == 0:
            x = cond.view(rows, config.prefix, -1)
            for block in toy.blocks:
                x = block(x, cond, cache)
        start = sum(g * g for g in grids[:si])
        x = tokens + toy.pos[start:start + grid * grid] + toy.scale_emb.weight[si]
        for b, block in enumerate(toy.blocks):
            x = x + block.cond(cond)[:, None]
            for j, branch in enumerate(branches(block, cond, cache)):
                if si in ratios and b in blocks:
                    n = grid * grid
                    order = reference_keep(x, n - int(n * ratios[si]))
                    kept[si, b, j] = order
                    index = torch.tensor(order)
                    g = grids[cache_scale]
                    stale = stored[b, j].transpose(1, 2).reshape(rows, -1, g, g)
                    out = F.interpolate(stale, size=(grid, grid), mode="area").flatten(2).transpose(1, 2).clone()
                    out[every_row, index] = branch(x[every_row, index])
                else:
                    out = branch(x)
                if si == cache_scale:
                    stored[b, j] = out
                x = x + out
        logits = toy.head(x)
        logits = logits[batch:] + cfg * (logits[:batch] - logits[batch:])
        logits_out.append(logits)
        drawn = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator).view(batch, grid, grid)
        codes = toy.codebook(drawn).permute(0, 3, 1, 2)
        total = total + F.interpolate(codes, size=(grids[-1], grids[-1]), mode="bilinear", align_corners=False)
        if si + 1 < len(grids):
            nxt = F.interpolate(total, size=(grids[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
            tokens = toy.code_in(nxt).repeat(2, 1, 1)
    return logits_out, total, kept


# -- the selection ------------------------------------------------------------------------------------------
def test_pivotal_tokens_on_random_flat_and_odd_grids():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 63, 8, generator=generator)  # a 7x9 grid
    x[1] = x[1, :1]  # a flat row: every score 0, the earliest positions kept
    x[2, 10:40] = x[2, 10]  # a flat patch
    index, valid = pivotal_tokens(x, (7, 9), 40)
    assert index.tolist() == reference_keep(x, 40) and bool(valid.all())
    assert index[1].tolist() == list(range(40))
    same, _ = pivotal_tokens(x, (7, 9), 63)  # every token: the positions in order (the neutral setting)
    assert torch.equal(same, torch.arange(63).expand(4, 63))


# -- the worked example, against the reference ---------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return build_toy({"depth": 4}, seed=0)


def toy_kwargs(**overrides):
    return {"labels": LABELS, "cfg": 2.5, "seed": 5, **overrides}


def record_selections(monkeypatch) -> list:
    """Every selection the graphs make: (grid, index) in call order."""
    calls = []
    import passes.fastvar as module

    real = module.pivotal_tokens

    def spy(stream, grid, keep):
        index, valid = real(stream, grid, keep)
        calls.append((tuple(grid), index.tolist()))
        return index, valid

    monkeypatch.setattr(module, "pivotal_tokens", spy)
    return calls


def test_matches_the_reference_sampler(toy, monkeypatch):
    calls = record_selections(monkeypatch)
    fast = optimize(toy, adapter=ToyAdapter(), passes=["fastvar"], config={"fastvar": TOY_SETTINGS})
    out = fast.generate(**toy_kwargs())
    logits, total, kept = reference_generate(toy, LABELS, 2.5, 5, {4: 0.4, 5: 0.5}, 3, range(1, 4))
    expected = [((g, g), kept[si, b, j]) for si, g in ((4, 7), (5, 9)) for b in (1, 2, 3) for j in (0, 1)]
    assert calls == expected  # every row's own tokens, in every sub-layer of the pruning blocks
    assert any(rows[0] != rows[3] for _, rows in calls)  # a sample's CFG rows choose for themselves
    assert all(torch.equal(a, b) for a, b in zip(out.logits, logits))
    assert torch.equal(out.total, total)
    stats = fast.stats["fastvar"]
    assert [(s["scale"], s["kept_per_sublayer"]) for s in stats if s["kept_per_sublayer"]] == [(4, 30), (5, 41)]
    assert stats[5]["token_layers_vs_dense"] == pytest.approx((6 * 41 + 2 * 81) / (8 * 81))


def test_neutral_is_bit_identical_and_the_cache_grows_by_the_kept_tokens(toy):
    baseline = ToyAdapter().generate(toy, **toy_kwargs())
    neutral = optimize(toy, adapter=ToyAdapter(), passes=["fastvar"],
                       config={"fastvar": {**TOY_SETTINGS, "ratios": {-3: 0.0, -2: 0.0}}})
    same = neutral.generate(**toy_kwargs())
    assert neutral.edits and all(torch.equal(a, b) for a, b in zip(same.logits, baseline.logits))
    assert torch.equal(same.total, baseline.total)
    assert not optimize(toy, adapter=ToyAdapter(), passes=["fastvar"], config={"fastvar": {"ratios": {}}}).edits
    fast = optimize(toy, adapter=ToyAdapter(), passes=["fastvar"], config={"fastvar": TOY_SETTINGS})
    caches = {}
    real = GraphRunner.scale

    def run(self, index, inputs):
        outputs = real(self, index, inputs)
        caches[index] = [self.state[f"k{i}"].shape[2] for i in range(4)]
        return outputs

    GraphRunner.scale = run
    try:
        fast.generate(**toy_kwargs())
    finally:
        GraphRunner.scale = real
    assert [b - a for a, b in zip(caches[3], caches[4])] == [49, 30, 30, 30]  # block 0 runs dense
    roles = {annotations(n).get("role") for n in fast.graph_modules()[4].graph.nodes
             if annotations(n).get("pass") == "fastvar"}
    assert roles == {"cache_input", "select", "gather", "restore"}


# -- Infinity and VAR ---------------------------------------------------------------------------------------
def test_infinity_neutral_is_bit_identical_and_defaults_cut_flops():
    model = build_infinity("infinity-tiny", seed=0)
    kwargs = generate_kwargs(get_scale_schedule(1.0, "0.06M"), (5, 3))  # 7 scales: cache 2, pruned 3 and 4
    baseline = get_adapter("infinity").generate(model, **kwargs)
    neutral = optimize(model, passes=["fastvar"], config={"fastvar": {"ratios": {-4: 0.0, -3: 0.0}}})
    assert outputs_equal(neutral.generate(**kwargs), baseline)
    fast = optimize(model, passes=["fastvar"])
    out = fast.generate(**kwargs)
    assert not outputs_equal(out, baseline)
    stats = fast.stats["fastvar"]
    assert [(s["scale"], s["kept_per_sublayer"]) for s in stats if s["kept_per_sublayer"]] == [(3, 22), (4, 32)]
    flops = measure_flops(fast, **kwargs)
    assert flops["optimized"][:3] == flops["baseline"][:3] and flops["optimized"][5:] == flops["baseline"][5:]
    assert all(o < 0.8 * b for o, b in zip(flops["optimized"][3:5], flops["baseline"][3:5]))


def test_var_and_composition_with_sats():
    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    vae = adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]
    kwargs = {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11, "return_logits": True}
    baseline = adapter.generate(model, **kwargs)
    neutral = optimize(model, adapter="var", passes=["fastvar", "sats"],
                       config={"fastvar": {"ratios": {-4: 0.0, -3: 0.0}}, "sats": {"delta": 0.0}})
    same = neutral.generate(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(same.logits, baseline.logits)) and torch.equal(same.f_hat, baseline.f_hat)
    alone = optimize(model, adapter="var", passes=["fastvar"])
    forced = {**kwargs, "force_indices": alone.generate(**kwargs).indices}
    raw = record_logits(lambda: alone.generate(**forced))
    guarded = optimize(model, adapter="var", passes=["fastvar", "sats"], config={"sats": {"stop_scale": -4}})
    rows = record_logits(lambda: guarded.generate(**forced))  # unconditional rows stop after scale 6
    assert [s["rows"] for s in guarded.stats["sats"]][7:] == [3, 3, 3]
    assert [s["kept_per_sublayer"] for s in guarded.stats["fastvar"]][6:8] == [39, 50]  # 8x8 and 10x10
    assert rows[7].shape[0] == 3  # pruned scale 7 ran the conditional rows, restored from their own cache rows
    assert ((rows[7] - raw[7][:3]).norm() / raw[7][:3].norm()).item() < 1e-5


def record_logits(run) -> dict[int, torch.Tensor]:
    """The raw (per-row) logits each scale graph returned during ``run()``."""
    seen, real = {}, GraphRunner.scale

    def scale(self, index, inputs):
        outputs = real(self, index, inputs)
        seen[index] = outputs["logits"]
        return outputs

    GraphRunner.scale = scale
    try:
        run()
    finally:
        GraphRunner.scale = real
    return seen


# -- refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, needle", [
    ({"fastvar": {"ratios": {-3: 1.0}}}, "ratios"),
    ({"fastvar": {"ratios": {-5: 0.4}, "cache_scale": -4}}, "not after the cache scale"),
    ({"fastvar": {"cache_scale": 9}}, "cache_scale"),
    ({"fastvar": {"blocks": (3, 3)}}, "selects no blocks"),
    ({"fastvar": {"rho": 0.5}}, "rho"),
])
def test_bad_settings_are_refused(toy, config, needle):
    with pytest.raises(ConfigError, match=needle):
        optimize(toy, adapter=ToyAdapter(), passes=["fastvar"], config=config).generate(**toy_kwargs())


def test_token_selecting_passes_are_refused_with_it(toy):
    for other, what in (("lhep", "token_selection"), ("depthvar", "token_selection"), ("sparvar", "attention_pattern")):
        with pytest.raises(ConfigError, match=f"both provide '{what}'"):
            optimize(toy, adapter=ToyAdapter(), passes=["fastvar", other])


def test_a_sample_alone_keeps_what_it_kept_in_its_batch():
    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    vae = adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]
    kwargs = {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11, "return_logits": True}
    together = optimize(model, adapter="var", passes=["fastvar"]).generate(**kwargs)
    for row in (0, 2):  # alone, teacher-forced to the batch's indices: the same selections, the same logits
        alone = optimize(model, adapter="var", passes=["fastvar"]).generate(
            **{**kwargs, "labels": LABELS[row:row + 1], "force_indices": [i[row:row + 1] for i in together.indices]})
        for ours, ref in zip(alone.logits, together.logits):
            assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-4
