"""Examples run as tests (on a small schedule, to stay fast)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_prints_tokens_flops_and_the_report(tmp_path):
    report = tmp_path / "report.html"
    result = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--pn", "0.25M", "--report", str(report)],
                            capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert "10 scales, final grid 32x32" in result.stdout
    table = [line.split() for line in lines if line.strip()[:1].isdigit() and "x" in line.split()[1]]
    assert [int(row[2]) for row in table] == [1, 4, 16, 36, 64, 144, 256, 400, 576, 1024]
    assert [row[3] == "all" for row in table] == [True] * 7 + [False] * 3  # LHEP on the last 3 scales
    assert any(line.startswith("FLOPs: baseline") for line in lines)
    assert lines[-1] == f"graph diff report: {report}" and report.exists()
