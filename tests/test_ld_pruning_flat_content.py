"""LHEP and SATS on content that stresses their rules: flat regions (zero high-frequency energy) and ragged
batches (samples keeping very different token counts, so that padding is large)."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon import get_adapter, optimize
from model_adapters.infinity import get_scale_schedule

from .helpers import generate_kwargs, outputs_equal, random_text, slice_text

SCHEDULE = get_scale_schedule(1.0, "0.25M")  # 10 scales: LHEP on 7-9, SATS on 6-9 by default
LENS = (5, 9)


@pytest.fixture(scope="module")
def tiny(tiny_float32):
    return tiny_float32


def kwargs(lens=LENS, **extra):
    return generate_kwargs(SCHEDULE, lens, **extra)


def flat_bits(bits: list[torch.Tensor], samples: tuple[int, ...], flat_fraction: float = 0.5) -> list[torch.Tensor]:
    """``bits`` with the left ``flat_fraction`` of every scale set to one constant code for ``samples``: a flat
    region, whose residual has no high-frequency energy."""
    out = []
    for scale in bits:
        scale = scale.clone()
        width = max(1, int(scale.shape[3] * flat_fraction))
        for sample in samples:
            scale[sample, :, :, :width] = 1
        out.append(scale)
    return out


@pytest.fixture(scope="module")
def ragged_bits(tiny):
    """Bits of a free run where sample 1 (the one whose branches differ most) has a flat left part at every
    scale: it keeps far fewer tokens than sample 0, so most of its row is padding."""
    free = get_adapter("infinity").generate(tiny, **kwargs())
    return flat_bits(free.bits, samples=(1,), flat_fraction=0.6)


def test_rho_one_keeps_flat_tokens_and_is_bit_identical_forced(tiny, ragged_bits):
    forced = kwargs(force_bits=ragged_bits)
    baseline = get_adapter("infinity").generate(tiny, **forced)
    fast = optimize(tiny, passes=["lhep", "sats"], config={"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}})
    assert outputs_equal(fast.generate(**forced), baseline)
    assert all(s["kept"] == [s["tokens"]] * 2 for s in fast.stats["lhep"][7:])


def test_rho_one_is_bit_identical_running_free_after_flat_scales(tiny, ragged_bits):
    """Scales 0-6 forced (flat regions in R_6), then free: a dropped flat token would change the bits."""
    forced = kwargs(force_bits=ragged_bits[:7])
    baseline = get_adapter("infinity").generate(tiny, **forced)
    fast = optimize(tiny, passes=["lhep"], config={"lhep": {"rho": 1.0}})
    assert outputs_equal(fast.generate(**forced), baseline)


def test_a_samples_sats_decision_does_not_depend_on_its_batch(tiny, ragged_bits):
    """Ragged kept counts (padding is most of the narrow sample's row): Delta covers each sample's own kept tokens,
    so kept tokens, Delta, stop scale and logits equal those of the sample generated alone."""
    passes, config = ["lhep", "sats"], {"sats": {"delta": 0.15}}
    fast = optimize(tiny, passes=passes, config=config)
    batch = fast.generate(**kwargs(force_bits=ragged_bits))
    lhep, sats = fast.stats["lhep"], fast.stats["sats"]
    kept = [s["kept"] for s in lhep[7:]]
    assert all(k[1] < 0.7 * k[0] for k in kept), kept  # the flat sample keeps far fewer: its row is mostly padding
    text = random_text(list(LENS), 256)
    for row in range(2):
        alone_fast = optimize(tiny, passes=passes, config=config)
        alone = alone_fast.generate(**kwargs(lens=[LENS[row]], text=slice_text(text, row),
                                             force_bits=[b[row:row + 1] for b in ragged_bits]))
        assert [s["kept"] for s in alone_fast.stats["lhep"][7:]] == [[k[row]] for k in kept]
        for together, single in zip(sats, alone_fast.stats["sats"]):
            if together["delta"] is not None and together["delta"][row] == together["delta"][row]:  # not NaN
                # float noise of a batch of 2 vs 1 on a difference of logits; padding moved Delta by ~20 %
                tolerance = 1e-4 * max(together["delta"])
                assert abs(single["delta"][0] - together["delta"][row]) <= tolerance, (
                    together["scale"], single["delta"], together["delta"])
            assert single["stopped_after"] == [together["stopped_after"][row]]
        for ours, ref in zip(alone.logits, batch.logits):
            assert ((ours[0] - ref[row]).norm() / ref[row].norm()).item() < 1e-5


def test_passes_and_stats_with_fewer_scales_run(tiny):
    """``num_scales`` stops before the last LHEP scales: those graphs never run and the stats list what ran."""
    from graphsurgeon.flops import measure_flops

    short = kwargs(num_scales=8)  # LHEP scales 7 (runs), 8 and 9 (do not)
    baseline = get_adapter("infinity").generate(tiny, **short)
    neutral = optimize(tiny, passes=["lhep", "sats"], config={"lhep": {"rho": 1.0}, "sats": {"delta": 0.0}})
    assert outputs_equal(neutral.generate(**short), baseline)
    fast = optimize(tiny, passes=["lhep", "sats"])
    measure_flops(fast, **short)
    summary = fast.stats["summary"]
    assert [s["scale"] for s in summary] == list(range(8)) and "flops" in summary[-1]
    assert summary[7]["token_rows_kept"] < summary[7]["token_rows_baseline"]
