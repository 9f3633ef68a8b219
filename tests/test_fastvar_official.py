"""FastVAR against the official code (csguoh/FastVAR), on one small random-weight Infinity (depth 8) on CPU.

The official code is not in this repository. Set ``GRAPHSURGEON_OFFICIAL_FASTVAR`` to the ``Infinity`` folder of a
csguoh/FastVAR checkout to run this test (about 3 minutes on 2 cores); without it it skips. The official release
prunes by width (32x32: 0.4, 40x40: 0.5; blocks 3..27; cache 24x24) and always skips the 48x48 and 64x64 scales; on
the 13-scale 1024 schedule that is ``fastvar`` with ratios {9: 0.4, 10: 0.5}, cache scale 8, blocks (3, 8) of 8,
plus ``scaleskip`` (last 2). It runs one prompt only (its RoPE gather assumes batch 1 with CFG; docs/pass_fastvar.md).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from graphsurgeon import optimize
from model_adapters.infinity import build_infinity, get_scale_schedule

CHECKOUT = os.environ.get("GRAPHSURGEON_OFFICIAL_FASTVAR")
pytestmark = pytest.mark.skipif(not CHECKOUT, reason="set GRAPHSURGEON_OFFICIAL_FASTVAR to the Infinity folder of a "
                                                     "csguoh/FastVAR checkout")
CONFIG = dict(depth=8, embed_dim=256, num_heads=2, block_chunks=2, text_channels=256, codebook_dim=32)
RELEASE = {"fastvar": {"ratios": {9: 0.4, 10: 0.5}, "cache_scale": 8, "blocks": (3, 8)}}
SUBLAYERS = ("sa", "ca", "ffn")


@pytest.fixture(scope="module")
def case():
    loaded = sys.modules.get("infinity.models.infinity")
    if loaded is not None and not str(Path(loaded.__file__).resolve()).startswith(str(Path(CHECKOUT).resolve())):
        pytest.skip(f"another official Infinity is imported in this process ({loaded.__file__})")
    from .official_fastvar import official_fastvar_case

    return official_fastvar_case(CHECKOUT, CONFIG, get_scale_schedule(1.0, "1M"), [7], seed=1234)


def test_token_choices_logits_bits_and_latent_match_the_release(case, monkeypatch):
    import passes.fastvar as module

    assert case["status"] == "ok", case["error"]
    calls, real = [], module.pivotal_tokens

    def spy(stream, grid, keep):
        index, valid = real(stream, grid, keep)
        calls.append(index.clone())
        return index, valid

    monkeypatch.setattr(module, "pivotal_tokens", spy)
    ours = build_infinity(case["config"], seed=0)
    ours.load_state_dict(case["state_dict"], strict=True)
    text = (case["text_kv"], case["text_lens"], case["text_cu_seqlens"], case["text_max_len"])
    kwargs = dict(text=text, scale_schedule=case["scale_schedule"], cfg=case["cfg"], tau=case["tau"],
                  top_k=case["top_k"], top_p=case["top_p"], seed=case["g_seed"], return_logits=True)
    fast = optimize(ours, passes=["fastvar", "scaleskip"], config=RELEASE)
    out = fast.generate(**kwargs)

    official = case["kept"]  # per call: width, layer, sub-layer, the kept indices of both CFG rows (farthest first)
    assert len(calls) == len(official) == 2 * 5 * 3  # 2 scales x blocks 3..7 x (sa, ca, ffn)
    assert [(o["width"], o["layer"], o["sublayer"]) for o in official] == [
        (w, b, s) for w in (32, 40) for b in range(3, 8) for s in SUBLAYERS]
    for ours_index, theirs in zip(calls, official):
        assert ours_index.shape == theirs["index"].shape
        assert [set(r.tolist()) for r in ours_index] == [set(r.tolist()) for r in theirs["index"]]
    in_order = sum(torch.equal(a, o["index"]) for a, o in zip(calls, official))
    assert in_order >= len(calls) - 2  # the order differs only within equal scores (the release's sort is unstable)

    assert case["ran_scales"] == list(range(11)) and len(out.bits) == 13
    for i, si in enumerate(case["ran_scales"]):
        assert torch.equal(out.bits[si], case["sampled_bits"][i]), si
        assert torch.equal(out.logits[si], case["cfg_logits"][i]), si
    assert torch.equal(out.summed_codes, case["summed_codes"])  # the 48/64 scales add nothing, as there


def test_without_the_scale_skip_the_computed_scales_are_the_same(case):
    ours = build_infinity(case["config"], seed=0)
    ours.load_state_dict(case["state_dict"], strict=True)
    text = (case["text_kv"], case["text_lens"], case["text_cu_seqlens"], case["text_max_len"])
    kwargs = dict(text=text, scale_schedule=case["scale_schedule"], cfg=case["cfg"], tau=case["tau"],
                  top_k=case["top_k"], top_p=case["top_p"], seed=case["g_seed"], return_logits=True)
    out = optimize(ours, passes=["fastvar"], config=RELEASE).generate(**kwargs)
    for i, si in enumerate(case["ran_scales"]):
        assert torch.equal(out.bits[si], case["sampled_bits"][i]), si
    assert not torch.equal(out.summed_codes, case["summed_codes"])  # the last two scales now add their detail
