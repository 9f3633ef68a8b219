"""`graphsurgeon generate`: conditions in, PNGs and a manifest out; --compare; bad input refused before any model
is loaded; torchrun shards give the images of one process."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from graphsurgeon.cli import main
from graphsurgeon.images import image_seeds, psnr, side_by_side, ssim
from model_adapters.var.adapter import VARAdapter

ROOT = Path(__file__).resolve().parents[1]
VAR = ["generate", "--adapter", "var", "--passes", "lhep,sats"]


def test_var_images_manifest_and_comparison(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*VAR, "--prompt", "3", "--prompt", "7", "--seed", "5", "--compare", "--out", str(out)]) == 0
    assert "random weights" in capsys.readouterr().out  # a random model makes noise, and says so
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["condition"], r["seed"]) for r in manifest["images"]] == [("3", 5), ("7", 6)]
    for record in manifest["images"]:
        image = Image.open(out / record["file"])
        assert image.size == (256, 256) and image.mode == "RGB"  # var-tiny: 16x16 codes, 16x upsampling
        width, height = Image.open(out / record["compare_file"]).size
        assert width == 256 * 2 + 8 and height > 256  # a caption strip above the two images
        assert 0 < record["ssim"] <= 1 and record["psnr_db"] > 0
        summary = record["stats"]
        assert [s["work_vs_baseline"] < 1 for s in summary][-3:] == [True] * 3  # LHEP's scales
        baseline = torch.from_numpy(numpy.array(Image.open(out / record["baseline_file"])))
        optimized = torch.from_numpy(numpy.array(image))
        assert record["psnr_db"] == round(psnr(baseline, optimized), 3)


def test_without_passes_the_comparison_is_identical(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--adapter", "var", "--prompt", "2", "--compare", "--out", str(out)]) == 0
    record = json.loads((out / "manifest.json").read_text())["images"][0]
    assert record["identical"] and record["psnr_db"] is None and record["ssim"] == 1.0


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a model was loaded although the command line was bad")

    monkeypatch.setattr(VARAdapter, "image_pipeline", refuse)


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "3", "--vae", "{missing}"], "--vae"),
    (["--prompt", "3", "--checkpoint", "{missing}", "--config", "var-d16"], "--checkpoint"),
    (["--prompt", "3", "--checkpoint", "{missing}"], "needs --config"),
    (["--prompt", "3", "--text-encoder", "{tmp}"], "class-conditional"),
    (["--prompt", "cat"], "class labels"),
    (["--prompt", "12"], "class labels"),  # var-tiny has 10 classes
    (["--prompts", "{empty}"], "holds no prompt"),
    ([], "no prompts"),
    (["--prompt", "3", "--passes", "nope"], "unknown pass"),
    (["--prompt", "3", "--dtype", "float7"], "--dtype"),
])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, capsys, nothing_loads, args, needle):
    (tmp_path / "empty.txt").write_text("\n  \n")
    values = {"missing": str(tmp_path / "missing.pth"), "tmp": str(tmp_path), "empty": str(tmp_path / "empty.txt")}
    argv = ["generate", "--adapter", "var", *(a.format(**values) for a in args), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_an_unwritable_out_is_refused_before_any_model_loads(tmp_path, capsys, nothing_loads):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["generate", "--adapter", "var", "--prompt", "1", "--out", str(blocker / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_metrics():
    a = torch.full((16, 16, 3), 100, dtype=torch.uint8)
    b = torch.full((16, 16, 3), 110, dtype=torch.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 100))
    c1 = (0.01 * 255) ** 2  # flat images: no variance, so SSIM is the luminance term alone
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1))
    noisy = (a.int() + torch.randint(-40, 40, a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    assert 0 < ssim(a, noisy.to(torch.uint8)) < ssim(a, b)  # structure destroyed vs a uniform shift
    assert side_by_side(a, b).shape == (16, 40, 3) and image_seeds(7, 3) == [7, 8, 9]


def test_torchrun_shards_give_the_images_of_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"{torchrun} is not installed")
    args = ["generate", "--adapter", "var", "--prompt", "3", "--prompt", "7", "--prompt", "1", "--passes", "lhep,sats"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process: CPU results depend on threads
    sharded = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "graphsurgeon", *args,
                              "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "graphsurgeon", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and [r["index"] for r in manifest["images"]] == [0, 1, 2]
    assert "[rank 1] image 1" in sharded.stderr  # rank 1 made image 1; rank 0 images 0 and 2
    for name in ("0000.png", "0001.png", "0002.png"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_the_report_draws_the_keep_masks_over_the_generated_image(tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.html"
    assert main([*VAR, "--prompt", "4", "--report", str(report), "--out", str(out)]) == 0
    html = report.read_text()
    assert html.count('class="keep-mask"') == 3 and 'class="decoded"' in html  # LHEP's 3 scales, over the image
    assert main([*VAR, "--prompt", "4", "--report", str(tmp_path / "report.txt"), "--out", str(out)]) == 2


def test_infinity_prompt_to_png_of_the_schedules_size(tmp_path, capsys):
    """The issue's command: a random tiny Infinity, a random text encoder and decoder (said), a 1024 px PNG at 1M."""
    out = tmp_path / "out"
    assert main(["generate", "--config", "infinity-tiny", "--prompt", "a red apple", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random text encoder" in printed and "random decoder" in printed and "random weights" in printed
    assert Image.open(out / "0000.png").size == (1024, 1024)  # 64x64 codes of the 1:1 1M schedule, 16 px each
    assert json.loads((out / "manifest.json").read_text())["images"][0]["condition"] == "a red apple"


def test_infinity_with_passes_and_comparison(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--config", "infinity-tiny", "--pn", "0.06M", "--h-div-w", "1.0", "--prompt", "a red apple",
                 "--prompt", "a blue bird", "--passes", "lhep,sats", "--compare", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["seed"] for r in manifest["images"]] == [0, 1]
    for record in manifest["images"]:
        assert Image.open(out / record["file"]).size == (256, 256)
        assert record["ssim"] <= 1 and record["stats"][-1]["work_vs_baseline"] < 1
    without = tmp_path / "plain"
    assert main(["generate", "--config", "infinity-tiny", "--pn", "0.06M", "--prompt", "a red apple", "--compare",
                 "--out", str(without)]) == 0
    assert json.loads((without / "manifest.json").read_text())["images"][0]["identical"]


def test_a_vae_that_does_not_fit_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from model_adapters.infinity import InfinityAdapter, build_infinity_vae

    def refuse(*_, **__):
        raise AssertionError("a model was loaded although the VAE does not fit")

    monkeypatch.setattr(InfinityAdapter, "image_pipeline", refuse)
    small_d14 = dict(codebook_dim=14, patch_size=8, ch_mult=(1, 1, 1, 1), base_ch=24, num_res_blocks=1)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.clone().contiguous() for k, v in build_infinity_vae(small_d14, seed=0).state_dict().items()}, path)
    assert main(["generate", "--config", "infinity-tiny", "--prompt", "x", "--vae", str(path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "14" in err and "32" in err
    assert main(["generate", "--prompt", "x", "--text-encoder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
