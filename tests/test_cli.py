"""The command line."""
from __future__ import annotations

from graphsurgeon.cli import main


def test_check_prints_the_capture_report(capsys):
    assert main(["check", "--adapter", "infinity", "--config", "infinity-tiny", "--pn", "0.25M", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "captured 10 scales" in out
    assert "    9    1x32x32    1024" in out  # per-scale token counts
    assert "state (explicit graph inputs/outputs): 8 slots" in out
    assert "leaf modules: Linear" in out and "packed_cross_attention" in out
    assert "from placeholder:rope_table" in out  # token side inputs
    assert "batch 2" in out


def test_check_bad_config_is_a_clear_error(capsys):
    assert main(["check", "--config", "infinity-3b"]) == 2
    assert "unknown Infinity config 'infinity-3b'" in capsys.readouterr().err
