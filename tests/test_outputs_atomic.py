"""What `generate` leaves in its folder: only a finished run's files, listed exactly by a manifest written last;
a folder with files refused unless --overwrite; an interrupted run (KeyboardInterrupt, SIGTERM) or a failing
report leaves no lie; strict JSON; the manifest's timings, settings, threads; progress bars; captions."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
from PIL import Image

import graphsurgeon.emit
import graphsurgeon.generate
from graphsurgeon.cli import main
from graphsurgeon.jsonio import to_strict_json, write_json_atomic
from model_adapters.var.adapter import VARAdapter

ROOT = Path(__file__).resolve().parents[1]
VAR = ["generate", "--adapter", "var"]


def strict_load(text: str):
    """json.loads that refuses NaN and Infinity, as a browser's JSON.parse does."""
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def folder(path: Path) -> dict[str, bytes]:
    """Every entry of ``path`` (hidden ones too) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def earlier_run(out: Path, count: int) -> dict[str, bytes]:
    """A folder as an earlier run of ``count`` images left it, in the manifest format before ``files`` existed
    (the images' records name the files), and a file of the user's that no manifest lists."""
    out.mkdir()
    for i in range(count):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(out / f"{i:04d}.png")
    records = [{"index": i, "condition": "9", "seed": 100 + i, "file": f"{i:04d}.png"} for i in range(count)]
    (out / "manifest.json").write_text(json.dumps({"adapter": "var", "images": records}))
    (out / "notes.txt").write_text("mine")
    return folder(out)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the progress bars are drawn (into the string)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a model was loaded although the command line was bad")

    monkeypatch.setattr(VARAdapter, "image_pipeline", refuse)


def test_strict_json_writes_non_finite_numbers_as_null(tmp_path):
    value = {"gamma": [math.nan, 0.5], "inf": math.inf, "nested": ({"x": -math.inf},), "text": "NaN"}
    assert strict_load(to_strict_json(value)) == {"gamma": [None, 0.5], "inf": None, "nested": [{"x": None}],
                                                  "text": "NaN"}
    path = write_json_atomic(tmp_path / "a.json", value)
    assert strict_load(path.read_text())["inf"] is None and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(TypeError):  # a failed write leaves neither a file nor a temporary one
        write_json_atomic(tmp_path / "b.json", {1j: 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("contents, needle", [
    ("earlier", "already holds an earlier run (manifest.json): give --overwrite"),
    ("other", "already holds 1 file(s) (notes.txt, ...): give --overwrite"),
])
def test_a_folder_that_holds_files_is_refused_before_any_model_loads(tmp_path, capsys, nothing_loads, contents,
                                                                      needle):
    out = tmp_path / "out"
    before = earlier_run(out, 2) if contents == "earlier" else None
    if contents == "other":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main([*VAR, "--prompt", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert before is None or folder(out) == before


def test_overwrite_refuses_a_manifest_that_is_not_a_generate_runs(tmp_path, capsys, nothing_loads):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "graphs": []}))  # an export's
    assert main([*VAR, "--prompt", "3", "--overwrite", "--out", str(out)]) == 2
    assert "its manifest.json is not a graphsurgeon generate manifest" in capsys.readouterr().err
    assert main([*VAR, "--prompt", "3", "--report", str(tmp_path / "new" / "manifest.json"),
                 "--out", str(tmp_path / "new")]) == 2
    assert "that is the run's manifest" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of 2 images (LHEP + SATS, --compare, --report) with --overwrite over an earlier run of 3 images,
    on a "terminal" (progress bars drawn), with the capture's start and end and each generation's start noted."""
    out = tmp_path_factory.mktemp("run") / "out"
    earlier_run(out, 3)
    report = out / "report.html"
    moments: dict[str, list[float]] = {"capture_start": [], "capture_end": [], "generate_start": []}
    real_capture, real_generate = graphsurgeon.emit.capture, graphsurgeon.emit.OptimizedModel.generate

    def noted_capture(plan):
        moments["capture_start"].append(time.perf_counter())
        try:
            return real_capture(plan)
        finally:
            moments["capture_end"].append(time.perf_counter())

    def noted_generate(self, **kwargs):
        moments["generate_start"].append(time.perf_counter())
        return real_generate(self, **kwargs)

    terminal = Terminal()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graphsurgeon.emit, "capture", noted_capture)
        patch.setattr(graphsurgeon.emit.OptimizedModel, "generate", noted_generate)
        patch.setattr(sys, "stderr", terminal)
        code = main([*VAR, "--passes", "lhep,sats", "--prompt", "3", "--prompt", "7", "--compare", "--overwrite",
                     "--report", str(report), "--out", str(out)])
    assert code == 0
    text = (out / "manifest.json").read_text()
    return SimpleNamespace(out=out, text=text, manifest=strict_load(text), moments=moments, bars=terminal.getvalue(),
                           report=report)


def test_the_manifest_lists_exactly_the_runs_files_and_the_earlier_ones_are_gone(run):
    names = ["0000.png", "0000_baseline.png", "0000_compare.png", "0001.png", "0001_baseline.png",
             "0001_compare.png", "report.html"]
    assert run.manifest["files"] == names
    assert sorted(folder(run.out)) == sorted(names + ["manifest.json", "notes.txt"])  # 0002.png (stale) removed
    assert (run.out / "notes.txt").read_text() == "mine"  # no manifest listed it: kept
    assert [r["seed"] for r in run.manifest["images"]] == [0, 1] and run.manifest["kind"] == "graphsurgeon generate"


def test_the_manifest_is_strict_json(run):
    assert "NaN" not in run.text and "Infinity" not in run.text  # SATS has no gamma at its first scale
    gammas = [s["gamma"] for r in run.manifest["images"] for entry in r["stats"] for s in entry["samples"]]
    assert None in gammas and any(isinstance(g, float) for g in gammas)


def test_the_manifest_records_the_sampling_values_used_threads_and_device(run):
    settings = run.manifest["settings"]
    assert (settings["cfg"], settings["top_k"], settings["top_p"]) == (4.0, 900, 0.95)  # VAR's defaults
    assert settings["tau"] is None  # VAR samples without a temperature
    assert run.manifest["threads"] == torch.get_num_threads() and run.manifest["device"] == "cpu"


def test_the_capture_is_timed_apart_from_the_images(run):
    moments, records = run.moments, run.manifest["images"]
    assert len(moments["capture_end"]) == 1 and len(moments["generate_start"]) == 2  # one graph set for both
    assert moments["capture_end"][0] <= moments["generate_start"][0]  # captured before image 0's clock started
    captured_for = moments["capture_end"][0] - moments["capture_start"][0]
    assert records[0]["capture_seconds"] >= captured_for and records[1]["capture_seconds"] < captured_for
    assert run.manifest["capture_seconds"] == pytest.approx(sum(r["capture_seconds"] for r in records))


def test_progress_bars_have_totals_and_name_the_run(run):
    for label in ("image 0 (1/2) optimized", "image 0 (1/2) baseline", "image 1 (2/2) optimized",
                  "image 1 (2/2) baseline"):  # a bar per run, each over var-tiny's 10 scales, with a time left
        assert f"{label}:   0%|          | 0/10 [00:00<?" in run.bars
    assert "scale [" not in run.bars  # a bar without a total reads "18scale [..."


def test_the_comparison_picture_says_which_side_is_which(run):
    picture = torch.from_numpy(numpy.array(Image.open(run.out / "0000_compare.png")))
    baseline = torch.from_numpy(numpy.array(Image.open(run.out / "0000_baseline.png")))
    strip = picture.shape[0] - 256
    assert strip > 0 and picture.shape[1] == 2 * 256 + 8
    assert torch.equal(picture[strip:, :256], baseline)
    left, right = picture[:strip, :256], picture[:strip, 264:]
    assert (left < 128).any() and (right < 128).any() and not torch.equal(left, right)  # two different captions


def test_the_report_names_the_image_and_its_prompt(run):
    page = run.report.read_text()
    assert '<th>image 1: &quot;7&quot;</th>' in page and "sample 0" not in page


def test_a_failing_report_write_still_leaves_the_images_and_the_manifest(tmp_path, capsys, monkeypatch):
    from graphsurgeon.report import DiffReport

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(DiffReport, "write", disk_full)
    out = tmp_path / "out"
    assert main([*VAR, "--passes", "lhep", "--prompt", "3", "--report", str(out / "r.html"), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graphsurgeon: error")]
    assert len(errors) == 1 and "--report" in errors[0] and "No space left on device" in errors[0]
    manifest = strict_load((out / "manifest.json").read_text())
    assert manifest["files"] == ["0000.png"] and sorted(folder(out)) == ["0000.png", "manifest.json"]


def test_an_interrupt_after_image_0_leaves_the_earlier_run_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = earlier_run(out, 2)
    real = graphsurgeon.generate._one_image
    made = []

    def interrupted(*args, **kwargs):
        if made:
            raise KeyboardInterrupt  # Ctrl-C while image 1 is made
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(graphsurgeon.generate, "_one_image", interrupted)
    assert main([*VAR, "--prompt", "3", "--prompt", "7", "--overwrite", "--out", str(out)]) == 130  # Ctrl-C's status
    assert made and folder(out) == before  # image 0 was made, yet nothing in the folder changed


def test_sigterm_after_image_0_leaves_the_earlier_run_as_it_was(tmp_path):
    out = tmp_path / "out"
    before = earlier_run(out, 2)
    command = [sys.executable, "-m", "graphsurgeon", *VAR, "--passes", "lhep", *("--prompt", "3") * 4, "--overwrite",
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stderr:
            if line.startswith("image 0 "):
                process.send_signal(signal.SIGTERM)
                break
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert folder(out) == before
