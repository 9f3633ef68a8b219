"""`graphsurgeon compare`: methods side by side on the same inputs, with their distance to the unaccelerated model."""
from __future__ import annotations

import json

import pytest

from graphsurgeon.cli import main
from graphsurgeon.compare import RANDOM_WEIGHTS_NOTE
from graphsurgeon.fidelity import choice_agreement, latent_psnr, latent_ssim, logit_errors

FAST = ["--repeats", "1", "--warmup", "0"]


@pytest.mark.parametrize("adapter, extra", [
    ("infinity", ["--pn", "0.06M"]),
    pytest.param("var", [], marks=pytest.mark.slow),  # ~1 min on 2 idle cores (a 4096-way codebook per token)
])
def test_neutral_methods_are_at_zero_distance_and_defaults_are_not(tmp_path, capsys, adapter, extra):
    neutral = json.dumps({"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}})
    stem = tmp_path / "neutral"
    assert main(["compare", "--adapter", adapter, *extra, *FAST, "--no-flops", "--methods", "lhep+sats",
                 "--method-config", neutral, "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    same = result["fidelity"]["lhep+sats"]
    assert set(same["teacher_forced"]["logit_rel_l2"]) == {0.0} and set(same["teacher_forced"]["choice_agreement"]) == {1.0}
    assert same["free_running"]["latent_psnr_db"] is None and same["free_running"]["latent_ssim"] == pytest.approx(1.0)
    assert RANDOM_WEIGHTS_NOTE in capsys.readouterr().out and RANDOM_WEIGHTS_NOTE in stem.with_suffix(".md").read_text()
    stem = tmp_path / "defaults"
    assert main(["compare", "--adapter", adapter, *extra, *FAST, "--methods", "lhep+sats,sats", "--images",
                 "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    moved = result["fidelity"]["lhep+sats"]
    assert not moved["images"]["identical"] and 0 < moved["images"]["ssim"] < 1  # decoded pictures compared too
    assert max(moved["teacher_forced"]["logit_rel_l2"]) > 0 and moved["free_running"]["latent_psnr_db"] is not None
    flops = {name: v["flops"]["total"] for name, v in result["variants"].items()}
    assert flops["lhep+sats"] < flops["sats"] < flops["baseline"]
    table = stem.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in ("baseline", "lhep+sats", "sats"))
    page = stem.with_suffix(".html").read_text()  # the decoded images side by side, one row per sample
    for name in ("baseline", "lhep+sats", "sats"):
        assert page.count(f'data-method="{name}"') == 1 and f"<td>{name}</td>" in page
    assert page.count("data:image/png;base64,") == 3 and "http" not in page
    assert RANDOM_WEIGHTS_NOTE in page


def test_fidelity_metrics():
    import torch

    a = [torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    b = [torch.tensor([[[1.0, 0.5], [3.0, 2.0]]])]
    assert logit_errors(a, a) == [0.0] and choice_agreement(a, b) == [0.5]  # position 1 flips its choice
    assert logit_errors(a, b)[0] == pytest.approx((0.25 + 9) ** 0.5 / 5 ** 0.5)
    latent = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    assert latent_psnr(latent, latent) is None and latent_ssim(latent, latent) == pytest.approx(1.0)
    shifted = latent + 1.0
    assert latent_psnr(latent, shifted) == pytest.approx(20 * torch.log10(latent.max() - latent.min()).item())


def test_an_unknown_method_fails_before_any_run(tmp_path, capsys):
    assert main(["compare", "--methods", "lhep+nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err


def test_per_scale_figures_come_from_the_pass_that_reports_them():
    from graphsurgeon.fidelity import per_scale_figure

    stats = {"lhep": [{"scale": 0, "kept": None}], "sparvar": [{"scale": 0, "entries_vs_dense": None},
                                                               {"scale": 1, "entries_vs_dense": 0.5}],
             "depthvar": [{"scale": 0, "token_layers_vs_dense": None}, {"scale": 1, "token_layers_vs_dense": 0.3}]}
    assert per_scale_figure(stats, "entries_vs_dense") == [None, 0.5]
    assert per_scale_figure(stats, "token_layers_vs_dense") == [None, 0.3]
    assert per_scale_figure({"lhep": stats["lhep"]}, "entries_vs_dense") is None
