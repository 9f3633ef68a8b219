"""Benchmark-only fixed operating points: a kept fraction per LHEP scale and a SATS stop scale."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon import ConfigError, get_adapter, optimize
from model_adapters.infinity import bits_to_codes, get_scale_schedule
from passes.lhep import energy_map, fixed_keep_mask

from .helpers import generate_kwargs, outputs_equal

SCHEDULE = get_scale_schedule(1.0, "0.25M")  # 10 scales: LHEP on 7, 8, 9 and SATS on 6-9 by default
TOKENS = [h * w for _, h, w in SCHEDULE]


@pytest.fixture(scope="module")
def tiny(tiny_float32):
    return tiny_float32


def test_fixed_keep_mask_keeps_the_highest_energy_tokens():
    energy = torch.tensor([[0.1, 5.0, 3.0, 3.0, 0.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    keep = fixed_keep_mask(energy, 0.5)
    assert keep[0].tolist() == [False, True, True, False, False, True]  # 7, 5, then the first of the tied 3s
    assert keep[1].tolist() == [True, True, True, False, False, False]  # all tied: the earliest positions
    assert fixed_keep_mask(energy, 0.01).sum(1).tolist() == [1, 1]  # at least one token


def test_keep_fraction_one_is_bit_identical(tiny):
    baseline = get_adapter("infinity").generate(tiny, **generate_kwargs(SCHEDULE))
    config = {"lhep": {"keep_fraction": {-3: 1.0, -2: 1.0, -1: 1.0}}}
    assert outputs_equal(optimize(tiny, passes=["lhep"], config=config).generate(**generate_kwargs(SCHEDULE)), baseline)


def test_fixed_fraction_keeps_that_many_of_the_highest_energy_tokens(tiny):
    fast = optimize(tiny, passes=["lhep"], config={"lhep": {"keep_fraction": {7: 0.5, 8: 0.25, 9: 0.5}}})
    out = fast.generate(**generate_kwargs(SCHEDULE))
    for scale, fraction in ((7, 0.5), (8, 0.25), (9, 0.5)):
        assert fast.stats["lhep"][scale]["kept"] == [round(fraction * TOKENS[scale])] * 3
        previous = bits_to_codes(out.bits[scale - 1], 32)[:, :, 0]  # R_{k-1}, recomputed independently
        energy = energy_map(previous, SCHEDULE[scale][1:]).flatten(1)
        keep = fixed_keep_mask(energy, fraction)
        for row in range(3):  # every kept token has at least the energy of every skipped one
            assert energy[row][keep[row]].min() >= energy[row][~keep[row]].max()


def test_fixed_stop_scale_stops_every_sample_there_and_nowhere_else(tiny):
    adaptive = optimize(tiny, passes=["sats"], config={"sats": {"delta": 10.0}})
    adaptive.generate(**generate_kwargs(SCHEDULE))
    assert [s["rows"] for s in adaptive.stats["sats"]] == [6] * 8 + [3] * 2  # delta 10 alone: every sample stops at 7
    fast = optimize(tiny, passes=["sats"], config={"sats": {"stop_scale": 8, "delta": 10.0}})
    fast.generate(**generate_kwargs(SCHEDULE))
    assert [s["rows"] for s in fast.stats["sats"]] == [6] * 9 + [3]  # fixed: both branches up to 8, then 3 rows
    assert [s["stopped_after"] for s in fast.stats["sats"][7:]] == [[False] * 3, [True] * 3, [True] * 3]


@pytest.mark.parametrize("config, needle", [
    ({"lhep": {"keep_fraction": {9: 1.5}}}, "fractions must be in"),
    ({"lhep": {"keep_fraction": {9: 0.5}}}, "names scales \\[9\\] but LHEP acts on \\[7, 8, 9\\]"),
    ({"sats": {"stop_scale": 9}}, "must be a SATS scale before the last"),
    ({"sats": {"stop_scale": 3}}, "must be a SATS scale before the last"),
])
def test_bad_operating_points_are_clear_errors(tiny, config, needle):
    with pytest.raises(ConfigError, match=needle):
        optimize(tiny, passes=list(config), config=config).generate(**generate_kwargs(SCHEDULE))
