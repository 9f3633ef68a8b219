"""StepVAR: texture + structure token scores, top-fraction pruning at the late scales, nearest-kept logits.

The scores and the kept set are recomputed here independently, from the public description's formulas (an
average-pool residual by ``avg_pool2d``, the first principal component by an SVD, ``S = w * S_str + S_txt``,
the ranking by a Python sort) on the token inputs the graphs received, recorded by wrapping
``GraphRunner.scale``; the pruned positions' logits are checked against a brute-force nearest kept token.
"""
from __future__ import annotations

import dataclasses

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
from passes.lhep import fixed_keep_mask
from passes.stepvar import nearest_kept, nearest_kept_logits, stepvar_scores

from .helpers import generate_kwargs, outputs_equal

LABELS = torch.tensor([1, 3, 7])


# -- the independent reference -------------------------------------------------------------------------------
def reference_scores(tokens: torch.Tensor, grid: tuple[int, int], weight: float = 1.0, components: int = 1
                     ) -> torch.Tensor:
    """(B, h*w, C) -> (B, h*w) in float64: ``weight * S_str + S_txt``; S_txt the channel norm of the residual to a
    3x3 average pool of the replicate-padded map, S_str the norm of the projection on the first ``components``
    principal components (an SVD of the centred tokens)."""
    x = tokens.double()
    maps = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    pooled = F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    texture = (maps - pooled).norm(dim=1).flatten(1)
    centred = x - x.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)  # its own sign convention: must not matter
    structure = (u[..., :components] * s[:, None, :components]).norm(dim=-1)
    return weight * structure + texture


def reference_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The top round(ratio * n) scores per row, equal scores (to 1e-9 of the largest): the earlier position."""
    n = scores.shape[1]
    count = max(1, round(ratio * n))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row, values in enumerate(scores):
        level = (values / values.abs().max() * 1e9).round().tolist()
        for position in sorted(range(n), key=lambda p: (-level[p], p))[:count]:
            keep[row, position] = True
    return keep


def reference_nearest(keep: torch.Tensor, grid: tuple[int, int]) -> list[list[int]]:
    """Brute force: per sample and position, the kept position of least squared distance, then least index."""
    width = grid[1]
    result = []
    for flags in keep.tolist():
        kept = [p for p, f in enumerate(flags) if f]
        result.append([min(kept, key=lambda q: ((p // width - q // width) ** 2 + (p % width - q % width) ** 2, q))
                       for p in range(len(flags))])
    return result


def mask_of(entry: dict) -> torch.Tensor:
    """The stats' kept mask (per sample, h strings of w "0"/"1") as (B, h*w) bool."""
    return torch.tensor([[c == "1" for c in "".join(rows)] for rows in entry["mask"]])


def record(monkeypatch, edit=None) -> dict:
    """Wrap GraphRunner.scale: per scale the inputs the graph received (after ``edit``), its outputs and the
    length of the first KV cache it left."""
    seen = {}
    real = GraphRunner.scale

    def run(self, index, inputs):
        inputs = edit(index, inputs) if edit else inputs
        outputs = real(self, index, inputs)
        first_state = next(iter(self.state.values()))
        seen[index] = {"inputs": inputs, "outputs": outputs, "cache": first_state.shape[2]}
        return outputs

    monkeypatch.setattr(GraphRunner, "scale", run)
    return seen


def check_scale(entry: dict, tokens: torch.Tensor, guided: torch.Tensor, raw: torch.Tensor, batch: int,
                ratio: float = 0.6) -> torch.Tensor:
    """The kept set is the reference's; every row (both CFG rows of a sample) and the guided logits carry the
    nearest kept token's logits at pruned positions. Returns the kept mask."""
    grid = tuple(entry["grid"])
    keep = mask_of(entry)
    assert entry["kept"] == [max(1, round(ratio * grid[0] * grid[1]))] * batch
    assert torch.equal(keep, reference_keep(reference_scores(tokens[:batch], grid), ratio))
    nearest = torch.tensor(reference_nearest(keep, grid))
    assert (nearest != torch.arange(keep.shape[1])).any()
    assert torch.equal(guided, guided.gather(1, nearest[..., None].expand_as(guided)))
    rows = raw.shape[0]
    per_row = nearest[torch.arange(rows) % batch]
    assert torch.equal(raw, raw.gather(1, per_row[..., None].expand_as(raw)))
    return keep


# -- the nodes, on synthetic inputs ------------------------------------------------------------------------
def test_scores_match_the_reference_and_equal_tokens_tie_to_the_earlier_position():
    generator = torch.Generator().manual_seed(0)
    grid, batch = (9, 9), 2
    tokens = torch.randn(2 * batch, 81, 8, generator=generator)
    flat = tokens[0].reshape(9, 9, 8)
    flat[2:7, 1:6] = flat[2, 1]  # a flat 5x5 block in sample 0
    tokens[1] = tokens[1, :1]  # sample 1: one feature everywhere
    tokens[batch:] = torch.randn(batch, 81, 8, generator=generator)  # unconditional rows: never scored
    scores = stepvar_scores(tokens, batch, grid, 1.0, 1)
    assert torch.allclose(scores.double(), reference_scores(tokens[:batch], grid), rtol=1e-4, atol=1e-5)
    assert torch.allclose(stepvar_scores(tokens, batch, grid, 0.3, 2).double(),
                          reference_scores(tokens[:batch], grid, 0.3, 2), rtol=1e-4, atol=1e-5)
    texture_only = stepvar_scores(tokens, batch, grid, 0.0, 1)
    assert bool((texture_only[0].reshape(9, 9)[3:6, 2:5] == 0).all())  # a flat neighbourhood has no texture
    interior = scores[0].reshape(9, 9)[3:6, 2:5]
    assert bool((interior == interior[0, 0]).all())  # equal neighbourhoods: bit-equal scores
    assert bool((scores[1] == scores[1, 0]).all())
    keep = fixed_keep_mask(scores, 0.6)
    assert keep[1].nonzero().flatten().tolist() == list(range(49))  # all equal: the earliest 49 of 81
    assert torch.equal(keep[0], reference_keep(reference_scores(tokens[:1], grid), 0.6)[0])
    twins = tokens.clone()
    twins[batch:] = tokens[:batch]
    assert torch.equal(stepvar_scores(twins, batch, grid, 1.0, 1), scores)  # only the conditional rows count


@pytest.mark.parametrize("grid", [(5, 7), (13, 13)])
def test_nearest_kept_is_the_closest_kept_token_then_the_lowest_position(grid):
    generator = torch.Generator().manual_seed(1)
    n = grid[0] * grid[1]
    keep = torch.rand(3, n, generator=generator) < 0.3
    keep[1] = False
    keep[1, n // 2 + 1] = True  # one kept token: everyone's nearest
    keep[2] = False
    keep[2, [0, 2]] = True  # position 1 is as far from both: the lower wins
    assert nearest_kept(keep, grid).tolist() == reference_nearest(keep, grid)
    logits = torch.randn(6, n, 4, generator=generator)
    kept_rows = torch.stack([torch.cat([k.nonzero().flatten(), (~k).nonzero().flatten()]) for k in keep])
    rows = torch.tensor([0, 1, 2, 5, 3])  # the running rows of a guarded batch: sample r % 3
    gathered = logits.gather(1, kept_rows[rows % 3][..., None].expand(-1, -1, 4))[:, : int(keep.sum(1).max())]
    dense = nearest_kept_logits(gathered, keep, rows, 3, grid)
    expected = logits.gather(1, nearest_kept(keep, grid)[rows % 3][..., None].expand(-1, -1, 4))
    assert torch.equal(dense, expected)


# -- the worked example (odd grids 7, 9, 13; CFG with a batch of 3) ----------------------------------------
@pytest.fixture(scope="module")
def toy():
    return build_toy(seed=0)


def toy_kwargs(**overrides):
    return {"labels": LABELS, "cfg": 2.5, "seed": 5, **overrides}


def toy_same(a, b) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and torch.equal(a.total, b.total)
            and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits)))


@pytest.mark.parametrize("config, needle", [
    ({"stepvar": {"keep_ratio": 0.0}}, "keep_ratio"),
    ({"stepvar": {"structure_weight": -0.5}}, "structure_weight"),
    ({"stepvar": {"alpha": 0.5}}, "alpha"),
    ({"stepvar": {"components": 0}}, "components"),
    ({"stepvar": {"rho": 0.5}}, "rho"),
    ({"stepvar": {"scales": [0, 6]}}, "cannot act on scale 0"),
    ({"stepvar": {"scales": [7]}}, "outside the schedule"),
])
def test_bad_settings_are_refused_before_any_edit(toy, config, needle):
    with pytest.raises(ConfigError, match=needle):
        optimize(toy, adapter=ToyAdapter(), passes=["stepvar"], config=config).generate(**toy_kwargs())


def test_missing_roles_and_other_token_pruning_are_refused(toy, monkeypatch):
    for order in (["lhep", "stepvar"], ["stepvar", "lhep"]):  # refused before capture: both select tokens
        with pytest.raises(ConfigError, match="both provide 'token_selection'"):
            optimize(toy, adapter=ToyAdapter(), passes=order)
    neutral = {"stepvar": {"keep_ratio": 1.0}, "sats": {"delta": 0.0}}  # any listed order: SATS runs first
    listed_last = optimize(toy, adapter=ToyAdapter(), passes=["stepvar", "sats"], config=neutral)
    baseline = ToyAdapter().generate(toy, **toy_kwargs())
    assert all(torch.equal(a, b) for a, b in zip(listed_last.generate(**toy_kwargs()).indices, baseline.indices))
    real_plan = ToyAdapter.capture_plan

    def without_logits(self, model, args):
        plan = real_plan(self, model, args)
        return dataclasses.replace(plan, scales=[dataclasses.replace(s, logits_output=None) for s in plan.scales])

    monkeypatch.setattr(ToyAdapter, "capture_plan", without_logits)
    with pytest.raises(ConfigError, match="scale 4 declares no token_input / logits_output"):
        optimize(toy, adapter=ToyAdapter(), passes=["stepvar"]).generate(**toy_kwargs())


def test_neutral_setting_is_bit_identical_on_the_example_alone_and_after_sats(toy):
    baseline = ToyAdapter().generate(toy, **toy_kwargs())
    neutral = optimize(toy, adapter=ToyAdapter(), passes=["stepvar"], config={"stepvar": {"keep_ratio": 1.0}})
    assert toy_same(neutral.generate(**toy_kwargs()), baseline)
    both = optimize(toy, adapter=ToyAdapter(), passes=["sats", "stepvar"],
                    config={"stepvar": {"keep_ratio": 1.0}, "sats": {"delta": 0.0}})
    assert toy_same(both.generate(**toy_kwargs()), baseline)


def test_semantics_on_the_example_with_a_flat_region_and_a_flat_map(toy, monkeypatch):
    def flatten(index, inputs):
        """Scale 4: a flat 4x4 block; scale 5: one feature everywhere (every score equal). Both rows of a
        sample keep the same input, as the model's own are."""
        tokens = inputs["tokens"].clone()
        if index == 4:
            grid = tokens.reshape(tokens.shape[0], 7, 7, -1)
            grid[:, 1:5, 2:6] = grid[:, 1:2, 2:3]
        elif index == 5:
            tokens[:] = tokens[:, :1]
        return {**inputs, "tokens": tokens}

    seen = record(monkeypatch, flatten)
    fast = optimize(toy, adapter=ToyAdapter(), passes=["stepvar"])
    out = fast.generate(**toy_kwargs())
    stats = fast.stats["stepvar"]
    assert [s["kept"] is not None for s in stats] == [False] * 4 + [True] * 3  # the last 3 scales by default
    for k in (4, 5, 6):
        keep = check_scale(stats[k], seen[k]["inputs"]["tokens"], out.logits[k], seen[k]["outputs"]["logits"], 3)
        assert seen[k]["cache"] - seen[k - 1]["cache"] == max(stats[k]["kept"])  # only kept tokens enter the cache
    assert keep.shape == (3, 169)
    assert mask_of(stats[5]).nonzero()[:, 1].tolist() == list(range(49)) * 3  # all scores equal: the earliest

    roles = {annotations(n).get("role") for n in fast.graph_modules()[6].graph.nodes
             if annotations(n).get("pass") == "stepvar"}
    assert roles == {"score", "mask", "select", "gather", "gather_side_input", "nearest_fill"}
    monkeypatch.undo()
    flops = measure_flops(fast, **toy_kwargs())
    assert flops["optimized"][:4] == flops["baseline"][:4]
    assert all(o < 0.75 * b for o, b in zip(flops["optimized"][4:], flops["baseline"][4:]))


def test_after_sats_the_guarded_rows_keep_their_samples_tokens(toy, monkeypatch):
    seen = record(monkeypatch)
    fast = optimize(toy, adapter=ToyAdapter(), passes=["sats", "stepvar"], config={"sats": {"delta": 10.0}})
    out = fast.generate(**toy_kwargs())
    assert [s["rows"] for s in fast.stats["sats"]][-2:] == [3, 3]  # unconditional rows stopped after scale 4
    for k in (4, 5, 6):
        check_scale(fast.stats["stepvar"][k], seen[k]["inputs"]["tokens"], out.logits[k], seen[k]["outputs"]["logits"], 3)


# -- VAR: 13x13 among the last scales; batch invariance under teacher forcing ----------------------------------
@pytest.fixture(scope="module")
def var():
    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    return adapter, model, adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]


def var_kwargs(vae, **overrides):
    return {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11, "return_logits": True,
            **overrides}


def test_var_neutral_is_bit_identical_and_defaults_keep_the_reference_set(var, monkeypatch):
    adapter, model, vae = var
    baseline = adapter.generate(model, **var_kwargs(vae))

    def same(a, b):
        return (all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and torch.equal(a.f_hat, b.f_hat)
                and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits)))

    neutral = optimize(model, adapter="var", passes=["sats", "stepvar"],
                       config={"stepvar": {"keep_ratio": 1.0}, "sats": {"delta": 0.0}})
    assert same(neutral.generate(**var_kwargs(vae)), baseline)
    seen = record(monkeypatch)
    fast = optimize(model, adapter="var", passes=["stepvar"])
    together = fast.generate(**var_kwargs(vae))
    stats = fast.stats["stepvar"]
    assert [tuple(stats[k]["grid"]) for k in (7, 8, 9)] == [(10, 10), (13, 13), (16, 16)]
    for k in (7, 8, 9):
        check_scale(stats[k], seen[k]["inputs"]["tokens"], together.logits[k], seen[k]["outputs"]["logits"], 3)
    for row in (0, 2):  # each sample alone, teacher-forced to the batch's indices: the same kept tokens
        alone_fast = optimize(model, adapter="var", passes=["stepvar"])
        alone = alone_fast.generate(**var_kwargs(vae, labels=LABELS[row:row + 1],
                                                 force_indices=[i[row:row + 1] for i in together.indices]))
        for mine, theirs in zip(alone_fast.stats["stepvar"], stats):
            assert mine["mask"] is None or mine["mask"] == [theirs["mask"][row]]
        for ours, ref in zip(alone.logits, together.logits):
            assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-4


# -- Infinity ----------------------------------------------------------------------------------------------
def test_infinity_neutral_is_bit_identical_and_defaults_keep_the_reference_set(monkeypatch):
    model = build_infinity("infinity-tiny", seed=0)
    kwargs = generate_kwargs(get_scale_schedule(1.0, "0.06M"), (5, 3))  # grids ..., 8x8, 12x12, 16x16
    baseline = get_adapter("infinity").generate(model, **kwargs)
    neutral = optimize(model, adapter="infinity", passes=["stepvar"], config={"stepvar": {"keep_ratio": 1.0}})
    assert outputs_equal(neutral.generate(**kwargs), baseline)
    seen = record(monkeypatch)
    fast = optimize(model, passes=["stepvar"])
    out = fast.generate(**kwargs)
    stats = fast.stats["stepvar"]
    assert [s["kept"] for s in stats][4:] == [[38, 38], [86, 86], [154, 154]]
    for k in (4, 5, 6):  # out.logits are the guided logits
        check_scale(stats[k], seen[k]["inputs"]["tokens"], out.logits[k], seen[k]["outputs"]["logits"], 2)


def test_the_diff_report_draws_stepvars_masks(toy, tmp_path):
    from graphsurgeon.report import DiffReport, build_report

    fast = optimize(toy, adapter=ToyAdapter(), passes=["stepvar"])
    fast.generate(**toy_kwargs())
    html = DiffReport(build_report(fast)).html()
    assert html.count('class="keep-mask"') == 3 * len(toy_kwargs()["labels"])  # its 3 scales, one per sample
