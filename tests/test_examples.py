"""Examples run as tests (on a small schedule, to stay fast)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_prints_per_scale_tokens():
    result = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--pn", "0.06M"], capture_output=True,
                            text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert "7 scales, final grid 16x16" in result.stdout
    table = [line.split() for line in lines if line.strip()[:1].isdigit() and "x" in line]
    assert [int(row[2]) for row in table] == [1, 4, 16, 36, 64, 144, 256]
    assert lines[-1].startswith("total ")
