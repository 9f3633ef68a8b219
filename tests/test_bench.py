"""The benchmark runner: what it measures and records (not how fast anything is: benchmarks are scripts)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from graphsurgeon import ConfigError
from graphsurgeon.bench import make_spec, markdown, run_benchmark
from graphsurgeon.bench.timing import Clock, InsertedNodeTimer
from graphsurgeon.cli import main
from graphsurgeon.meta import annotate

REPO = Path(__file__).resolve().parents[1]
GRIDS = [1, 2, 4, 6, 8, 12, 16]  # the 0.06M 1:1 schedule: the paper point acts on scales 4, 5, 6 (stop at 4)


@pytest.fixture(scope="module")
def result():
    spec = make_spec(config="infinity-tiny", pn="0.06M", batch=2, operating_point="paper", warmup=1, repeats=2)
    return run_benchmark(spec, log=lambda *_: None)


def test_fixed_operating_point_computes_the_expected_token_rows(result):
    tokens = [g * g for g in GRIDS]
    half = [round(0.5 * n) for n in tokens]
    rows = {  # 2 prompts with CFG: 4 rows; LHEP keeps half at 4-6; SATS drops the 2 unconditional rows after 4
        "baseline": [4 * n for n in tokens],
        "none": [4 * n for n in tokens],
        "lhep": [4 * n for n in tokens[:4]] + [4 * k for k in half[4:]],
        "sats": [4 * n for n in tokens[:5]] + [2 * n for n in tokens[5:]],
        "lhep+sats": [4 * n for n in tokens[:4]] + [4 * half[4]] + [2 * k for k in half[5:]],
    }
    assert result["mode"] == "fixed"
    assert {name: v["tokens_per_scale"] for name, v in result["variants"].items()} == rows
    assert result["variants"]["lhep+sats"]["pass_config"] == {"lhep": {"keep_fraction": {-3: 0.5, -2: 0.5, -1: 0.5}},
                                                              "sats": {"stop_scale": -3}}


def test_ratios_come_from_the_same_run(result):
    variants = result["variants"]
    base = variants["baseline"]
    for name, v in variants.items():
        assert len(v["time_s"]["runs"]) == 2 and v["time_s"]["min"] <= v["time_s"]["median"] <= v["time_s"]["max"]
        assert v["time_per_image_s"]["median"] == pytest.approx(v["time_s"]["median"] / 2)
        assert v["speedup_vs_baseline"] == pytest.approx(base["time_s"]["median"] / v["time_s"]["median"])
        assert v["ideal_speedup"] == pytest.approx(base["flops"]["total"] / v["flops"]["total"])
        assert v["achieved_fraction_of_ideal"] == pytest.approx(v["speedup_vs_baseline"] / v["ideal_speedup"])
        assert len(v["per_scale_ms"]) == len(GRIDS) and all(ms > 0 for ms in v["per_scale_ms"])
        assert sum(v["flops"]["per_scale"]) == v["flops"]["total"]
    assert variants["none"]["flops"]["total"] == base["flops"]["total"]  # the pass-free graphs compute the baseline
    assert variants["lhep+sats"]["flops"]["total"] < variants["lhep"]["flops"]["total"] < base["flops"]["total"]
    assert variants["lhep+sats"]["ideal_speedup"] > 1.5


def test_inserted_nodes_are_timed_and_removed_again(result):
    variants = result["variants"]
    assert "inserted" not in variants["baseline"] and "inserted" not in variants["none"]
    for name in ("lhep", "sats", "lhep+sats"):
        inserted = variants[name]["inserted"]
        assert 0 < inserted["ms_total"] < inserted["run_s"] * 1e3 and 0 < inserted["share_of_run"] < 1
        assert inserted["ms_total"] == pytest.approx(inserted["graph_nodes_ms"] + inserted["host_runtime_ms"])
        assert sum(inserted["per_scale_ms"]) == pytest.approx(inserted["graph_nodes_ms"])
        assert all(key.split(":")[0] in name.split("+") for key in inserted["by_role_ms"])
    roles = variants["lhep+sats"]["inserted"]["by_role_ms"]
    assert {"lhep:mask", "lhep:gather", "lhep:scatter_logits", "sats:cfg_branch_guard"} <= set(roles)
    assert variants["lhep"]["inserted"]["scales"][0] == 4  # the first scale the rewrite touched


def test_instrumentation_brackets_only_inserted_nodes():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    doubled = annotate(graph.call_function(torch.mul, (x, 2)), **{"pass": "demo", "role": "double"})
    graph.output(graph.call_function(torch.add, (doubled, 1)))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    before = module.code
    timer = InsertedNodeTimer(Clock(torch.device("cpu")))
    timer.instrument(module, "scale", 3)
    assert module.code.count("inserted_node_start(") == 1 and module.code.count("inserted_node_stop(") == 1
    with timer:
        assert module(torch.ones(2)).tolist() == [3.0, 3.0]
    assert set(timer.ms) == {("demo", "double", "scale", 3)}
    timer.remove(module)
    assert module.code == before


def test_markdown_has_every_variant_and_scale(result):
    table = markdown(result)
    for name in result["variants"]:
        assert re.search(rf"^\| {re.escape(name)} \| [0-9.]+ \|", table, re.M)
    assert "mode: fixed (operating point 'paper')" in table and table.count("\n| 6 |") == 1


def test_result_keys_are_documented(result):
    doc = (REPO / "docs" / "BENCHMARKS.md").read_text()
    keys = set(result) | set(result["variants"]["lhep+sats"]) | set(result["variants"]["lhep+sats"]["inserted"])
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/BENCHMARKS.md does not document {missing}"


@pytest.mark.parametrize("values, needle", [
    (dict(repeats=0), "repeats"), (dict(pass_sets=("lhep+",)), "pass_sets"), (dict(dtype="float16"), "dtype"),
    (dict(batch=0), "batch"),
])
def test_bad_settings_name_the_key(values, needle):
    with pytest.raises(ConfigError, match=needle):
        make_spec(**values)


@pytest.mark.parametrize("values, needle", [
    (dict(operating_point="fastest"), "operating_point 'fastest'"),
    (dict(keep_fraction={3: 0.5}), "names scales \\[3\\] but LHEP acts on"),
    (dict(pass_sets=("lhep+nope",)), "unknown pass"),
    (dict(device="cuda"), "CUDA is not available") if not torch.cuda.is_available() else (dict(device="nope"), "nope"),
    (dict(dtype="bfloat16"), "bfloat16 on CUDA"),
])
def test_bad_benchmarks_fail_before_timing(values, needle):
    spec = make_spec(config="infinity-tiny", pn="0.06M", repeats=1, warmup=0, flops=False, inserted_timing=False,
                     **values)
    with pytest.raises(ConfigError, match=needle):
        run_benchmark(spec, log=lambda *_: None)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--pn", "0.06M", "--pass-sets", "lhep", "--repeats", "1", "--warmup", "0", "--no-flops",
                 "--no-inserted-timing", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["schema_version"] == 1 and set(data["variants"]) == {"baseline", "lhep"} and data["mode"] == "adaptive"
    assert out.with_suffix(".md").read_text() in capsys.readouterr().out


@pytest.mark.parametrize("values, needle", [
    (dict(pass_sets=("none", "lhep"), pass_config={"sats": {"delta": 0.1}}),
     r"pass_config: .*settings for passes that are not enabled: \['sats'\]"),
    (dict(pass_sets=("sats",), keep_fraction={4: 0.5}), "keep_fraction: .*fixes lhep but no pass set enables it"),
    (dict(pass_sets=("lhep",), stop_scale=4), "stop_scale: .*fixes sats but no pass set enables it"),
])
def test_settings_for_passes_no_set_runs_are_refused(values, needle):
    with pytest.raises(ConfigError, match=needle):
        make_spec(**values)
    make_spec(**dict(values, pass_sets=("lhep+sats",)))  # the same settings with the pass enabled are fine


@pytest.mark.parametrize("values, needle", [
    (dict(pass_sets=("sats",), stop_scale=99), "stop_scale=99"),
    (dict(pass_sets=("lhep",), keep_fraction={99: 0.5}), "scale 99 is outside"),
])
def test_settings_the_schedule_refutes_fail_before_any_run(monkeypatch, values, needle):
    def run(*_, **__):
        raise AssertionError("a generation ran before the settings were checked")

    monkeypatch.setattr("graphsurgeon.bench.runner.Variant.generate", run)
    spec = make_spec(config="infinity-tiny", pn="0.06M", warmup=1, repeats=1, flops=False, inserted_timing=False,
                     **values)
    with pytest.raises(ConfigError, match=needle):
        run_benchmark(spec, log=lambda *_: None)
