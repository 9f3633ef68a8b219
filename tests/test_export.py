"""Export for inspection: readable code, drawings, ONNX with a dynamic token count, manifest."""
from __future__ import annotations

import json
import logging
import warnings
import xml.dom.minidom

import onnx
import pytest
import torch

import graphsurgeon.export
from graphsurgeon import ConfigError, GraphsurgeonError, optimize
from graphsurgeon.capture.dynamic import generalize_token_count
from model_adapters.infinity import build_infinity, get_scale_schedule, set_text_attention_bf16

from .helpers import random_text

SCHEDULE = get_scale_schedule(1.0, "0.06M")


def optimized_tiny(bf16: bool = True):
    model = build_infinity("infinity-tiny", seed=0)
    set_text_attention_bf16(model, bf16)
    fast = optimize(model)
    fast.capture(text=random_text([5, 9], 256), scale_schedule=SCHEDULE, cfg=3.0)
    return fast


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def exported_fp32(tmp_path_factory):
    """The tiny model's export, with every warning and torch.onnx registry log line the export itself raised."""
    directory = tmp_path_factory.mktemp("export")
    fast = optimized_tiny(bf16=False)
    logs, registration = Records(), logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addHandler(logs)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manifest = fast.export(directory, onnx_scale=4)
    finally:
        registration.removeHandler(logs)
    return directory, manifest, [str(w.message) for w in caught] + logs.messages


def test_files_and_manifest(exported_fp32):
    directory, manifest, _ = exported_fp32
    assert json.loads((directory / "manifest.json").read_text()) == manifest
    assert [g["scale"] for g in manifest["graphs"]] == list(range(7))
    code = (directory / "scale_03.py").read_text()
    assert 'def forward(self, tokens: "f32[4, 36, 256]", cond_gss: "f32[4, 1, 6, 256]"' in code  # shapes annotated
    assert 'kv3_v: "f32[4, 2, 21, 128]"' in code  # caches of the earlier scales (1+4+16 tokens) are inputs
    assert "torch.cat((kv0_k," in code  # the KV-cache append is a node on an explicit input
    dot = (directory / "scale_03.dot").read_text()
    assert dot.startswith('digraph "scale_03"') and '"tokens" -> ' in dot
    svg = xml.dom.minidom.parse(str(directory / "scale_03.svg"))  # well-formed XML
    assert len(svg.getElementsByTagName("rect")) == manifest["graphs"][3]["nodes"]


def test_onnx_step_has_dynamic_tokens_and_matches_pytorch(exported_fp32):
    directory, manifest, _ = exported_fp32
    entry = manifest["onnx"]
    model = onnx.load(str(directory / entry["file"]))
    onnx.checker.check_model(model, full_check=True)
    assert entry["opset"] >= 18 and entry["dynamic_dims"]["tokens"] == ["tokens"]
    assert entry["op_histogram"]["MatMul"] > 0 and ("Softmax" in entry["op_histogram"] or "Attention" in entry["op_histogram"])
    runs = entry["onnxruntime"]
    assert [r["tokens"] for r in runs] == [64, 32]
    assert all(r["max_abs_err"] <= 1e-4 for r in runs), runs


def test_an_export_prints_no_third_party_notices(exported_fp32):
    """torch.onnx logged "torchvision is not installed" four times and warned of training mode and of its own
    LeafSpec deprecation on every export."""
    assert exported_fp32[2] == []


def test_onnx_with_official_bf16_rounding_matches_in_relative_terms(tmp_path):
    """bf16 rounding turns ~1e-7 kernel differences into ~1e-3 absolute ones (measured 3.8e-3); relative L2 stays small."""
    entry = optimized_tiny(bf16=True).export(tmp_path, onnx_scale=2)["onnx"]
    assert all(r["max_rel_l2"] <= 5e-4 for r in entry["onnxruntime"]), entry["onnxruntime"]


def test_generalized_graph_equals_specialised_and_runs_other_counts():
    fast = optimized_tiny(bf16=False)
    captured = fast._current()
    scale = captured.scales[3]
    inputs = [torch.randn(v.shape) if v.is_floating_point() else captured.example_values["text_cu_seqlens"]
              for v in (n.meta["val"] for n in scale.module.graph.nodes if n.op == "placeholder")]
    reference = scale.module(*[t.clone() for t in inputs])
    generic = torch.fx.GraphModule(scale.module, __import__("copy").deepcopy(scale.module.graph))
    changed = generalize_token_count(generic, "tokens", 1, scale.tokens)
    assert len(changed) > 10
    assert all(torch.equal(a, b) for a, b in zip(generic(*[t.clone() for t in inputs]), reference))
    inputs[0] = inputs[0][:, :7]
    logits = generic(*inputs)[0]
    assert logits.shape == (4, 7, 64)


@pytest.fixture(scope="module")
def exported_with_passes(tmp_path_factory):
    """LHEP + SATS on the tiny model; scale 4 is an LHEP and a SATS scale (gather, mask, scatter, guard)."""
    model = build_infinity("infinity-tiny", seed=0)
    set_text_attention_bf16(model, False)
    fast = optimize(model, passes=["lhep", "sats"])
    fast.capture(text=random_text([5, 9], 256), scale_schedule=SCHEDULE, cfg=3.0)
    directory = tmp_path_factory.mktemp("export_passes")
    return directory, fast, fast.export(directory, onnx_scale=4)


def test_optimized_module_exports_with_what_the_passes_inserted(exported_with_passes):
    directory, _, manifest = exported_with_passes
    inserted = manifest["graphs"][4]["inserted_by_passes"]
    assert {"gather", "select", "mask", "attention_mask", "scatter_logits"} <= set(inserted["lhep"])
    assert {"cfg_branch_guard", "branch_discrepancy", "guard_input"} <= set(inserted["sats"])
    assert manifest["graphs"][2]["inserted_by_passes"] == {}  # before the passes' scales: untouched
    assert manifest["regions"]["residual"][4]["inserted_by_passes"]["lhep"]["scatter_residual"] == 1
    code = (directory / "scale_04.py").read_text()
    assert "cfg_branch_guard" in code and "gather_tokens" in code and "scatter_tokens" in code
    assert "residual_scatter" in (directory / "residual_04.py").read_text()


def test_onnx_of_a_rewritten_scale_matches_the_graph(exported_with_passes):
    directory, _, manifest = exported_with_passes
    entry = manifest["onnx"]
    model = onnx.load(str(directory / entry["file"]))
    onnx.checker.check_model(model, full_check=True)
    assert "lhep_prev_codes" in entry["inputs"] and "sats_stopped" in entry["inputs"]
    ops = entry["op_histogram"]
    assert "NonZero" in ops and "GatherElements" in ops and "ScatterElements" in ops  # guard, gather, scatter
    runs = entry["onnxruntime"]
    assert [r["variant"] for r in runs] == [0, 1]  # all rows running / a row dropped, two kept-token counts
    assert all(r["max_abs_err"] <= 1e-4 and r["vs_graph"]["max_abs_err"] <= 1e-4 for r in runs), runs


def test_export_refuses_bad_targets_and_clears_an_earlier_export(exported_with_passes, tmp_path):
    _, fast, _ = exported_with_passes
    with pytest.raises(ConfigError, match="onnx_scale=99 is outside the 7 scales"):
        fast.export(tmp_path / "new", onnx_scale=99)
    assert not (tmp_path / "new").exists()  # refused before anything was written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        fast.export(tmp_path / "file", onnx_scale=None)
    folder = tmp_path / "again"
    folder.mkdir()
    (folder / "scale_09.py").write_text("stale")  # from a longer schedule's export, listed in its manifest
    (folder / "scale_12.onnx").write_text("stale")
    (folder / "manifest.json").write_text(json.dumps({"graphs": [{"files": ["scale_09.py"]}], "onnx": {"file": "scale_12.onnx"}}))
    (folder / "train_2.py").write_text("mine")  # looks like an export file, but no manifest lists it
    fast.export(folder, onnx_scale=None)
    assert not (folder / "scale_09.py").exists() and not (folder / "scale_12.onnx").exists()
    assert (folder / "train_2.py").read_text() == "mine"
    assert (folder / "scale_06.py").exists() and not list(folder.glob("*.onnx"))
    (folder / "manifest.json").write_text("[not ours")
    with pytest.raises(ConfigError, match="is not a graphsurgeon export manifest"):
        fast.export(folder, onnx_scale=None)


def contents(folder) -> dict:
    """Every entry of ``folder`` (hidden ones too) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_onnx_step_leaves_the_previous_export_and_says_why_on_one_line(exported_with_passes, tmp_path,
                                                                                monkeypatch):
    _, fast, _ = exported_with_passes
    fast.export(tmp_path, onnx_scale=None)
    before = contents(tmp_path)

    def failing(*_, **__):  # as torch.onnx fails on StepVAR's eigh: a page of coloured advice around the cause
        try:
            raise RuntimeError("No ONNX function found for <OpOverload(op='aten._linalg_eigh')>.\n\u26a0\ufe0f")
        except RuntimeError as cause:
            raise ValueError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting.\n## Summary") from cause

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(GraphsurgeonError) as failure:
        fast.export(tmp_path, onnx_scale=4)
    assert str(failure.value) == ("ONNX export of scale 4 failed: RuntimeError: No ONNX function found for "
                                  "<OpOverload(op='aten._linalg_eigh')>.")
    assert contents(tmp_path) == before  # the previous export, whole; nothing of the new one, no staging folder


def test_an_interrupted_export_leaves_the_previous_export(exported_with_passes, tmp_path, monkeypatch):
    _, fast, _ = exported_with_passes
    fast.export(tmp_path, onnx_scale=None)
    before = contents(tmp_path)

    def interrupted(*_, **__):
        raise KeyboardInterrupt  # Ctrl-C during the ONNX step, every drawing already written

    monkeypatch.setattr(graphsurgeon.export, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fast.export(tmp_path, onnx_scale=4)
    assert contents(tmp_path) == before


def test_a_folder_of_generated_images_is_refused_saying_what_to_do(exported_with_passes, tmp_path):
    _, fast, _ = exported_with_passes
    (tmp_path / "manifest.json").write_text(json.dumps({"adapter": "var", "images": [{"file": "0000.png"}]}))
    with pytest.raises(ConfigError, match=r"\(a graphsurgeon generate run's\); export into a new or empty folder, "
                                          r"e\.g\. .*export$"):
        fast.export(tmp_path, onnx_scale=None)
