"""Bad command lines fail before any work, with one line on stderr, status 2 and no traceback (issue 9, item 7)."""
from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest

import graphsurgeon.cli as cli
from graphsurgeon.cli import main
from model_adapters.infinity import InfinityAdapter

TINY = ["--config", "infinity-tiny", "--pn", "0.06M"]
FAST_BENCH = ["--repeats", "1", "--warmup", "0", "--no-flops", "--no-inserted-timing"]


def _work_started(*_, **__):
    raise AssertionError("work started although the command line was bad")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything beyond the checks runs: capture, a model with weights, optimize, bench, export."""
    build = InfinityAdapter.build_model

    def meta_only(self, config, device="meta", **kwargs):
        if device != "meta":
            _work_started()
        return build(self, config, device=device, **kwargs)

    monkeypatch.setattr(InfinityAdapter, "build_model", meta_only)
    monkeypatch.setattr(cli, "capture", _work_started)
    monkeypatch.setattr("graphsurgeon.api.optimize", _work_started)
    monkeypatch.setattr("graphsurgeon.bench.run_benchmark", _work_started)
    monkeypatch.setattr("graphsurgeon.export.export_captured", _work_started)


def fails_cleanly(capsys, argv: list[str]) -> str:
    """Run the CLI, check status 2 and a single traceback-free line on stderr, and return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("graphsurgeon")
    return err


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("argv, needle", [
    (["check", *TINY, "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["check", *TINY, "--batch-size", "two"], "--batch-size"),
    (["export", *TINY, "--h-div-w", "-1", "--out", "x"], "--h-div-w: expected a finite number > 0"),
    (["check", "--adapter", "not-a-model"], "unknown adapter 'not-a-model' (known: infinity"),
    (["check", "--config", "infinity-3b"], "unknown Infinity config 'infinity-3b'"),
    (["bench", *TINY, "--batch", "0"], "batch"),
    (["bench", *TINY, "--pass-sets", "lhep", "--pass-config", '{"sats": {"delta": 0.1}}'],
     "settings for passes that are not enabled: ['sats']"),
    (["bench", *TINY, "--pass-sets", "none,sats", "--keep-fraction", "4:0.5"], "fixes lhep but no pass set enables it"),
    (["bench", *TINY, "--pass-config", "[1]"], "expected a JSON object"),
    (["bench", *TINY, "--pass-config", "{lhep"], "not valid JSON"),
    (["bench", *TINY, "--out", "out/bench.json"], "give a stem"),
    (["diff", *TINY, "--out", "d.txt"], "must end in .html, .md, .json"),
    (["diff", *TINY, "--passes", "lhep,nope", "--out", "d.html"], "unknown pass(es) ['nope']"),
])
def test_bad_arguments_fail_before_work(capsys, argv, needle):
    assert needle in fails_cleanly(capsys, argv)


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("command, suffix", [(["bench", *TINY, *FAST_BENCH], "/bench"), (["diff", *TINY], "/d.html"),
                                             (["export", *TINY], "/out")])
def test_output_below_a_file_fails_before_work(capsys, a_file, command, suffix):
    err = fails_cleanly(capsys, [*command, "--out", f"{a_file}{suffix}"])
    assert f"--out {a_file}{suffix}" in err and f": {a_file} is a file, not a folder" in err


@pytest.mark.usefixtures("no_work")
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_bench_into_proc_fails_before_work(capsys):
    err = fails_cleanly(capsys, ["bench", *TINY, *FAST_BENCH, "--out", "/proc/x/bench"])
    assert "--out /proc/x/bench.json: cannot create or write to the folder /proc/x" in err


@pytest.mark.usefixtures("no_work")
def test_export_refuses_an_existing_file_and_a_folder_as_report(capsys, a_file, tmp_path):
    assert "is a file, not a folder" in fails_cleanly(capsys, ["export", *TINY, "--out", str(a_file)])
    (tmp_path / "report.html").mkdir()
    assert "is a folder" in fails_cleanly(capsys, ["diff", *TINY, "--out", str(tmp_path / "report.html")])


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("scale", ["7", "99", "-8"])
def test_export_onnx_scale_out_of_range(capsys, tmp_path, scale):
    err = fails_cleanly(capsys, ["export", *TINY, "--onnx-scale", scale, "--out", str(tmp_path / "out")])
    assert f"--onnx-scale {scale}: the schedule (0.06M) has 7 scales" in err
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_export_passes_a_valid_scale_and_the_created_folder(monkeypatch, capsys, tmp_path):
    calls = []

    def fake_export(captured, directory, onnx_scale=-1):
        calls.append((len(captured.scales), Path(directory), onnx_scale))
        return {"graphs": [None] * len(captured.scales)}

    monkeypatch.setattr("graphsurgeon.export.export_captured", fake_export)
    out = tmp_path / "new" / "out"
    assert main(["export", *TINY, "--onnx-scale", "-7", "--out", str(out)]) == 0
    assert calls == [(7, out, -7)] and out.is_dir()
    assert "wrote 7 graphs" in capsys.readouterr().out


def test_failing_write_is_one_line_and_the_table_is_printed(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("graphsurgeon.bench.run_benchmark", lambda spec, **_: {"figures": 1})
    monkeypatch.setattr("graphsurgeon.bench.markdown", lambda result: "| the table |")

    def disk_full(self, *_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(["bench", *TINY, "--out", str(tmp_path / "bench")]) == 2
    out, err = capsys.readouterr()
    assert err == f"graphsurgeon: error: No space left on device: {tmp_path / 'bench.json'}\n"
    assert "| the table |" in out  # printed before the write failed: the figures are not lost


def test_bugs_keep_their_traceback(monkeypatch):
    def bug(*_, **__):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "capture", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["check", *TINY])


def _script() -> Path:
    script = Path(sys.executable).parent / "graphsurgeon"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    return script


@pytest.mark.parametrize("args, needle", [
    (["check", *TINY, "--batch-size", "0"], "--batch-size"),
    (["bench", *TINY, *FAST_BENCH, "--out", "{file}/bench"], "is a file, not a folder"),
])
def test_installed_command(tmp_path, a_file, args, needle):
    start = time.perf_counter()
    done = subprocess.run([str(_script()), *(a.format(file=a_file) for a in args)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not done.stdout  # nothing ran: a benchmark prints its progress and table
    assert time.perf_counter() - start < 60  # interpreter and torch start-up only


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "capture", interrupted)
    assert main(["check", *TINY]) == 130
    assert capsys.readouterr().err == "graphsurgeon: interrupted\n"
