"""Extra cases produced by the official Infinity code (8B patchify, non-square, batch 3, active top-p).

The case files are not part of the repository (they hold random weights, ~20 MB each). Point
``GRAPHSURGEON_OFFICIAL_CASES`` at a folder of them (same keys as the golden, see reference/README.md, plus
``pn`` in ``config``) to run these tests; without it they skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from graphsurgeon import get_adapter
from model_adapters.infinity import build_infinity

CASES_DIR = os.environ.get("GRAPHSURGEON_OFFICIAL_CASES")
CASES = sorted(Path(CASES_DIR).glob("*.pt")) if CASES_DIR else []


@pytest.mark.skipif(not CASES, reason="set GRAPHSURGEON_OFFICIAL_CASES to a folder of official case files")
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_official_case(path):
    case = torch.load(path, weights_only=True)
    config = {k: v for k, v in case["config"].items() if k not in ("h_div_w", "B", "pn")}
    model = build_infinity(config, device="meta")
    model.load_state_dict(case["state_dict"], strict=True, assign=True)
    text = (case["text_kv"], case["text_lens"], case["text_cu_seqlens"], max(case["text_lens"]))
    common = dict(text=text, scale_schedule=case["scale_schedule"], cfg=case["cfg"], tau=case["tau"],
                  top_k=case["top_k"], top_p=case["top_p"], seed=case["g_seed"])
    adapter = get_adapter("infinity")
    forced = adapter.generate(model.eval(), force_bits=case["sampled_bits"], return_logits=True, **common)
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(forced.logits, case["cfg_logits"])]
    assert max(errors) <= 5e-4, errors
    assert torch.equal(forced.summed_codes, case["summed_codes"])
    free = adapter.generate(model, **common)
    mismatch = sum(int((a != b).sum()) for a, b in zip(free.bits, case["sampled_bits"]))
    total = sum(b.numel() for b in case["sampled_bits"])
    assert mismatch / total < 1e-4, (mismatch, total)
