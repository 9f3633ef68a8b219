"""LHEP and SATS on VAR, unchanged: a class-conditional model with a VQ codebook, Phi residual mixing and a CFG ramp."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphsurgeon import get_adapter, optimize
from passes.lhep import energy_map, keep_mask

LABELS = torch.tensor([3, 1, 7])


@pytest.fixture(scope="module")
def var():
    adapter = get_adapter("var")
    model = adapter.build_model("var-tiny", device="cpu", seed=0)
    return adapter, model, adapter.benchmark_args(model, batch_size=3, seed=1)["vae"]


def kwargs(vae, **overrides):
    return {"vae": vae, "labels": LABELS, "cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 11, **overrides}


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and torch.equal(a.f_hat, b.f_hat)


def test_graphs_and_neutral_passes_equal_the_baseline_bit_for_bit(var):
    adapter, model, vae = var
    baseline = adapter.generate(model, **kwargs(vae))
    assert same(optimize(model, adapter="var").generate(**kwargs(vae)), baseline)
    neutral = optimize(model, adapter="var", passes=["lhep", "sats"], config={"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}})
    assert same(neutral.generate(**kwargs(vae)), baseline)  # SATS keeps VAR's ramp (1+t) c - t u


def test_lhep_keeps_the_energy_set_of_the_code_maps_on_odd_grids(var):
    adapter, model, vae = var
    fast = optimize(model, adapter="var", passes=["lhep"])
    out = fast.generate(**kwargs(vae))
    stats = {s["scale"]: s for s in fast.stats["lhep"]}
    pns = model.patch_nums  # ..., 10, 13, 16: the 13x13 grid is odd

    def code_map(indices, pn):
        return vae.quantize.embedding(indices).transpose(1, 2).reshape(3, model.Cvae, pn, pn)

    residual = code_map(out.indices[6], pns[6])  # R_6: scale 6 is not pruned
    for k in (7, 8, 9):
        keep = keep_mask(energy_map(residual, (pns[k], pns[k])).flatten(1), 0.5)
        assert stats[k]["kept"] == keep.sum(1).tolist() and max(stats[k]["kept"]) < pns[k] ** 2
        base = F.interpolate(residual, size=(pns[k], pns[k]), mode="nearest")  # Eq. 14: UpNearest(R_{k-1}) where skipped
        mask = keep.reshape(3, 1, pns[k], pns[k])
        residual = torch.where(mask, code_map(out.indices[k], pns[k]), base)
    assert [s["work_vs_baseline"] < 0.6 for s in fast.stats["summary"]][-3:] == [True] * 3


def test_sats_stops_the_unconditional_rows_of_a_class_conditional_model(var):
    adapter, model, vae = var
    fast = optimize(model, adapter="var", passes=["sats"], config={"sats": {"delta": 10.0}})
    fast.generate(**kwargs(vae))
    stats = fast.stats["sats"]
    assert stats[7]["stopped_after"] == [True] * 3 and [s["rows"] for s in stats][-2:] == [3, 3]


def test_each_sample_decides_as_it_would_alone(var):
    """Teacher-forced to a batch run's indices, each sample alone keeps the same tokens, stops at the same scale and
    gets the same guided logits (float noise aside) as in the batch."""
    adapter, model, vae = var
    config = {"lhep": {"rho": 0.5}, "sats": {"delta": 0.3}}
    batch = optimize(model, adapter="var", passes=["lhep", "sats"], config=config)
    together = batch.generate(**kwargs(vae, return_logits=True))
    forced = together.indices
    for row in range(3):
        alone = optimize(model, adapter="var", passes=["lhep", "sats"], config=config).generate(
            **kwargs(vae, labels=LABELS[row:row + 1], force_indices=[f[row:row + 1] for f in forced], return_logits=True))
        for mine, theirs in zip(alone.stats["lhep"], together.stats["lhep"]):
            assert mine["kept"] is None or mine["kept"] == [theirs["kept"][row]]
        stops = [s["stopped_after"][0] for s in alone.stats["sats"]]
        assert stops == [s["stopped_after"][row] for s in together.stats["sats"]]
        for ours, ref in zip(alone.logits, together.logits):
            assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-4


def test_check_runs_with_the_var_adapter(capsys):
    from graphsurgeon.cli import main

    assert main(["check", "--adapter", "var", "--config", "var-d16"]) == 0  # meta device: no weights
    out = capsys.readouterr().out
    assert "config var-d16" in out and "kv0_k <- var.blocks.0.attn.cached_k" in out
