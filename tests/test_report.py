"""The graph diff report: Markdown, HTML (checked in headless Chromium) and versioned JSON."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from graphsurgeon import optimize
from graphsurgeon.cli import main
from graphsurgeon.flops import measure_flops
from graphsurgeon.report import REPORT_SCHEMA_VERSION
from model_adapters.infinity import build_infinity, get_scale_schedule

from .helpers import random_text

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def report():
    model = build_infinity("infinity-tiny", seed=0)
    fast = optimize(model, passes=["lhep", "sats"])
    measure_flops(fast, text=random_text([7, 12], 256), scale_schedule=get_scale_schedule(1.0, "0.25M"), cfg=3.0,
                  tau=0.5, top_k=900, top_p=0.97, seed=1234)
    return fast.report


def test_json_schema_and_content(report):
    data = json.loads(report.json())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION and [p["name"] for p in data["passes"]] == ["lhep", "sats"]
    lhep, sats = data["passes"]
    assert lhep["scales"] == [7, 8, 9] and sats["scales"] == [6, 7, 8, 9]
    assert lhep["roles"]["gather_side_input"] == 6 and sats["roles"]["cfg_branch_guard"] == 4
    scale9 = data["scales"][9]
    assert scale9["tokens_before"] == 1024 and all(k < 1024 for k in scale9["tokens_after"])
    assert scale9["flops_after"] < scale9["flops_before"] and scale9["flops_ideal"] <= scale9["flops_after"]
    added = scale9["regions"]["scale"]["added"]
    assert {"lhep", "sats"} <= set(added) and scale9["regions"]["residual"]["added"]["lhep"]
    assert data["scales"][2]["regions"]["scale"]["added"] == {}  # untouched scales show no change
    assert 0 < data["flops"]["ratio"]["optimized_vs_baseline"] < 1
    masks = data["lhep_masks"]  # the keep masks as strings (the pictures are only in the HTML)
    assert [m["scale"] for m in masks] == [7, 8, 9] and [len(m["masks"][0]) for m in masks] == [20, 24, 32]


def test_json_is_strict_non_finite_numbers_are_null(report):
    """SATS has no gamma at a sample's first scale: it was written NaN, which JSON.parse rejects."""
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    data = json.loads(report.json(), parse_constant=refuse)
    gammas = [g for d in data["sats_decisions"] if d["gamma"] is not None for g in d["gamma"]]
    assert None in gammas and any(isinstance(g, float) for g in gammas)


def test_markdown_has_the_summary(report):
    text = report.markdown()
    assert "| scale | grid | tokens before |" in text and "| 9 | 32x32 | 1024 |" in text
    assert "added by lhep: `lhep_history`" in text
    assert "Pictures (LHEP keep masks, SATS decisions, FLOP bars) are in the HTML report" in text


def chromium(path, tmp_path, *action: str):
    """Headless Chromium on the page at ``path``, doing ``action`` (``--dump-dom``, ``--screenshot=...``), offline."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *action, path.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
def test_html_loads_in_headless_chromium_without_console_errors(report, tmp_path):
    page = report.write(tmp_path / "report.html")
    result = chromium(page, tmp_path, "--dump-dom")
    assert result.returncode == 0
    assert '<table id="summary">' in result.stdout and "<td>1024</td>" in result.stdout
    assert "CONSOLE" not in result.stderr and "Uncaught" not in result.stderr
    broken = tmp_path / "broken.html"  # control: a page that does throw is caught by the same check
    broken.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    assert "Uncaught" in chromium(broken, tmp_path, "--dump-dom").stderr


def test_cli_diff_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["diff", "--adapter", "infinity", "--config", "infinity-tiny", "--pn", "0.06M", "--passes", "lhep,sats",
                 "--out", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    assert out.read_text().startswith("<!DOCTYPE html>") and 'id="summary"' in out.read_text()
