"""The worked example of docs/adapters.md: a next-scale model unlike Infinity and VAR (class prefix prefilled into
a dict KV cache, learned positions added inside the step, VQ code indices on odd grids, its own CFG rule), run
through LHEP and SATS unchanged by a small, declarative adapter."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from examples.toy_nsp import adapter as toy_adapter
from examples.toy_nsp.adapter import ToyAdapter
from examples.toy_nsp.model import build_toy
from graphsurgeon import ConfigError, optimize
from graphsurgeon.capture import CaptureError, capture
from passes.lhep import energy_map, keep_mask

ROOT = Path(__file__).resolve().parents[1]
LABELS = torch.tensor([1, 3, 7])


@pytest.fixture(scope="module")
def toy():
    return build_toy(seed=0)


def kwargs(**overrides):
    return {"labels": LABELS, "cfg": 2.5, "seed": 5, **overrides}


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices)) and torch.equal(a.total, b.total)


def test_the_adapter_is_small_and_declarative():
    source = Path(toy_adapter.__file__).read_text()
    assert len(source.splitlines()) < 60
    assert "for si, grid in enumerate" not in source and "multinomial" not in source  # no sampling loop of its own
    assert "GraphRunner" not in source and "def scale(" not in source  # no runner of its own


def test_graphs_without_passes_and_passes_at_neutral_settings_equal_the_baseline(toy):
    adapter = ToyAdapter()
    baseline = adapter.generate(toy, **kwargs())
    assert same(optimize(toy, adapter=adapter).generate(**kwargs()), baseline)
    neutral = optimize(toy, adapter=adapter, passes=["lhep", "sats"], config={"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}})
    assert same(neutral.generate(**kwargs()), baseline)  # SATS keeps the model's own guidance rule: u + cfg (c - u)


def test_lhep_keeps_the_energy_set_and_scatters_code_indices(toy):
    fast = optimize(toy, adapter=ToyAdapter(), passes=["lhep"])
    out = fast.generate(**kwargs())
    grids = toy.config.grids
    stats = fast.stats["lhep"]
    for k in (4, 5, 6):  # the last 3 scales: odd grids 7, 9, 13
        previous = toy.codebook(out.indices[k - 1]).permute(0, 3, 1, 2)  # R_{k-1}, recomputed independently
        keep = keep_mask(energy_map(previous, (grids[k], grids[k])).flatten(1), 0.5)
        assert stats[k]["kept"] == keep.sum(1).tolist() and max(stats[k]["kept"]) < grids[k] ** 2
        upsampled = F.interpolate(out.indices[k - 1][:, None].double(), size=(grids[k], grids[k]), mode="nearest")
        skipped = ~keep.reshape(3, 1, grids[k], grids[k])
        assert torch.equal(out.indices[k][:, None][skipped], upsampled.long()[skipped])  # Eq. 14 on categorical values
    summary = fast.stats["summary"]
    assert [s["work_vs_baseline"] < 1 for s in summary] == [False] * 4 + [True] * 3


def test_sats_stops_unconditional_rows_of_a_class_conditional_model(toy):
    fast = optimize(toy, adapter=ToyAdapter(), passes=["sats"], config={"sats": {"delta": 10.0}})
    out = fast.generate(**kwargs())
    stats = fast.stats["sats"]
    assert stats[4]["stopped_after"] == [True] * 3  # first possible stop: the second SATS scale
    assert [s["rows"] for s in stats][-2:] == [3, 3]
    plain = ToyAdapter().generate(toy, **kwargs())
    assert all(torch.equal(a, b) for a, b in zip(out.indices[:5], plain.indices[:5]))  # same until the stop


def test_dict_state_without_a_state_slot_is_a_capture_error_naming_the_entry(toy):
    adapter = ToyAdapter()
    plan = adapter.capture_plan(toy, adapter.validate(toy, **kwargs()))
    with pytest.raises(CaptureError, match=r"\.cache\['k0'\].*StateSlot\(\.\.\., attribute='cache', key='k0'\)"):
        capture(dataclasses.replace(plan, state=[]))
    assert toy.cache == {}  # nothing traced was left behind


@pytest.mark.parametrize("change, needle", [
    (dict(sampled_axes=(2, 3)), "sampled_axes"),
    (dict(residual_output="missing"), "has no output 'missing'"),
    (dict(sampled_input="total"), "do not hold the token grid"),
])
def test_a_wrong_residual_declaration_fails_in_lheps_preconditions(toy, monkeypatch, change, needle):
    real_plan = ToyAdapter.capture_plan

    def wrong(self, model, args):
        plan = real_plan(self, model, args)
        return dataclasses.replace(plan, residual=[dataclasses.replace(spec, **change) for spec in plan.residual])

    monkeypatch.setattr(ToyAdapter, "capture_plan", wrong)
    with pytest.raises(ConfigError, match=needle):
        optimize(toy, adapter=ToyAdapter(), passes=["lhep"]).generate(**kwargs())


def test_sats_without_guidance_is_refused(toy):
    with pytest.raises(ConfigError, match="cfg_batch"):
        optimize(toy, adapter=ToyAdapter(), passes=["sats"]).generate(**kwargs(cfg=1.0))


def test_the_cli_takes_an_adapter_outside_model_adapters():
    done = subprocess.run([sys.executable, "-m", "graphsurgeon", "check", "--adapter",
                           "examples.toy_nsp.adapter:ToyAdapter"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "config toy-nsp" in done.stdout and "scale 6" in done.stdout.lower()
    bad = subprocess.run([sys.executable, "-m", "graphsurgeon", "check", "--adapter", "examples.toy_nsp.adapter:Nope"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "has no attribute 'Nope'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_diff_and_export_run_on_an_outside_adapter(tmp_path):
    from graphsurgeon.cli import main

    adapter = ["--adapter", "examples.toy_nsp.adapter:ToyAdapter"]
    assert main(["diff", *adapter, "--passes", "lhep,sats", "--out", str(tmp_path / "report.md")]) == 0
    assert "lhep" in (tmp_path / "report.md").read_text()
    assert main(["export", *adapter, "--passes", "lhep,sats", "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "scale_06.onnx").exists()  # the last scale, rewritten by both passes
