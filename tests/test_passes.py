"""Pass settings and the LD-Pruning building blocks: LHEP's mask and SATS's guard."""
from __future__ import annotations

import math

import pytest
import torch

from graphsurgeon import ConfigError, optimize
from graphsurgeon.passes import resolve_passes
from model_adapters.infinity import build_infinity
from passes.lhep import LHEP, energy_map, haar_high_frequency_energy, keep_mask
from passes.sats import GuardState, branch_discrepancy


def test_defaults_follow_the_paper():
    lhep, sats = resolve_passes(["lhep", "sats"])
    assert lhep.config.rho == 0.5 and lhep.scales(13) == (10, 11, 12)
    assert sats.config.delta == 0.15 and sats.scales(13) == (9, 10, 11, 12)


def test_dict_config_and_explicit_scales():
    (lhep,) = resolve_passes(["lhep"], {"lhep": {"rho": 0.7, "scales": [-1, 11]}})
    assert lhep.config.rho == 0.7 and lhep.scales(13) == (11, 12)


@pytest.mark.parametrize("names,config,needle", [
    (["lhep"], {"lhep": {"rho": 0.0}}, r"lhep\.rho: Input should be greater than 0"),
    (["lhep"], {"lhep": {"rho": 1.5}}, r"lhep\.rho: Input should be less than or equal to 1"),
    (["sats"], {"sats": {"delta": -0.1}}, r"sats\.delta: Input should be greater than or equal to 0"),
    (["lhep"], {"lhep": {"rh0": 0.5}}, r"lhep\.rh0: Extra inputs are not permitted"),
    (["lhep"], {"sats": {"delta": 0.1}}, r"settings for passes that are not enabled: \['sats'\]"),
    (["lhep", "lhep"], None, "listed twice"),
    (["lhep"], {"lhep": 0.5}, r"config\['lhep'\] must be a dict"),
])
def test_bad_settings_are_clear_errors(names, config, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_passes(names, config)


def test_scale_selection_outside_the_schedule():
    (lhep,) = resolve_passes(["lhep"], {"lhep": {"scales": [13]}})
    with pytest.raises(ConfigError, match=r"lhep\.scales \[13\] are outside the schedule's 13 scales"):
        lhep.scales(13)


def test_optimize_validates_settings_before_any_work():
    model = build_infinity("infinity-tiny", device="meta")
    with pytest.raises(ConfigError, match="lhep.rho"):
        optimize(model, passes=["lhep"], config={"lhep": {"rho": 2}})
    fast = optimize(model, passes=["lhep", "sats"], config={"sats": {"delta": 0.1}})
    assert [p.name for p in fast.passes] == ["lhep", "sats"] and fast.passes[1].config.delta == 0.1
    assert fast.cache_info().size == 0  # settings are checked at optimize(); capture waits for the first generate


def test_haar_energy_of_a_known_patch():
    """One channel, one 2x2 patch [[a, b], [c, d]]: LH, HL, HH as in the paper, LL ignored."""
    a, b, c, d = 1.0, 2.0, 4.0, 8.0
    energy = haar_high_frequency_energy(torch.tensor([[[[a, b], [c, d]]]]))
    lh, hl, hh = (-a + b - c + d) / 2, (-a - b + c + d) / 2, (-a + b + c - d) / 2
    assert energy.shape == (1, 1, 1) and math.isclose(energy.item(), lh**2 + hl**2 + hh**2, rel_tol=1e-6)
    assert haar_high_frequency_energy(torch.ones(2, 3, 4, 4)).abs().max() == 0  # flat: no high frequency
    assert haar_high_frequency_energy(torch.randn(1, 2, 5, 3)).shape == (1, 3, 2)  # odd grids are padded


def test_keep_mask_is_the_smallest_set_reaching_rho():
    energy = torch.tensor([[5.0, 1.0, 3.0, 0.0, 1.0]])  # total 10; sorted 5, 3, 1, 1, 0
    assert keep_mask(energy, 0.5).tolist() == [[True, False, False, False, False]]  # 5 >= 5
    assert keep_mask(energy, 0.51).tolist() == [[True, False, True, False, False]]  # 8 >= 5.1
    assert keep_mask(energy, 0.85).tolist() == [[True, True, True, False, True]]  # 9 < 8.5 needs a 1: ties kept
    assert keep_mask(energy, 0.99).sum() == 4  # below 1 the zero-energy token is never needed
    assert keep_mask(energy, 1.0).all()  # rho = 1 is the off switch: flat tokens are kept too
    assert keep_mask(torch.zeros(1, 4), 0.5).all()  # nothing to rank: keep everything


def test_keep_mask_threshold_does_not_lose_tiny_energies_to_float32_rounding():
    """One large energy and many tiny ones: in float32 the tiny ones vanish in the cumulative sum (1e8 + 1e-3
    rounds to 1e8), so the literal rule would stop after the large one; summed in float64 they count."""
    energy = torch.tensor([[1e8] + [1e-3] * 1000])  # tiny ones hold 1e-8 of the total
    assert keep_mask(energy, 1 - 1e-12).all()
    assert keep_mask(energy, 1 - 1e-6).sum() == 1
    shuffled = energy[:, torch.randperm(1001, generator=torch.Generator().manual_seed(0))]
    assert keep_mask(shuffled, 1 - 1e-12).all()  # the order of the tokens does not matter


def test_fixed_keep_mask_export_form_breaks_ties_as_the_stable_sort():
    from passes.lhep import fixed_keep_mask, fixed_keep_mask_traceable

    energy = torch.zeros(2, 64)
    energy[:, :16] = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))  # 48 tied zeros: a flat region
    for fraction in (0.1, 0.5, 0.9):
        assert torch.equal(fixed_keep_mask_traceable(energy, fraction), fixed_keep_mask(energy, fraction))


def test_keep_mask_rows_are_independent():
    torch.manual_seed(0)
    energy = torch.rand(3, 50)
    together = keep_mask(energy, 0.5)
    assert all(torch.equal(together[i], keep_mask(energy[i:i + 1], 0.5)[0]) for i in range(3))
    for row, kept in zip(energy, together):  # smallest: dropping the weakest kept token falls below rho
        assert row[kept].sum() >= 0.5 * row.sum()
        assert row[kept].sum() - row[kept].min() < 0.5 * row.sum()


def test_energy_map_prefers_the_textured_region():
    residual = torch.zeros(1, 4, 16, 16)
    residual[:, :, :, 8:] = torch.randn(1, 4, 16, 8)  # detail on the right half only
    energy = energy_map(residual, (20, 20))
    assert energy.shape == (1, 20, 20) and energy[:, :, 12:].mean() > 10 * energy[:, :, :7].mean()
    mask = LHEP(LHEP.Config(rho=0.5)).mask(residual, (20, 20)).reshape(20, 20)
    assert mask[:, 12:].float().mean() > 0.3 and mask[:, :6].sum() == 0


def test_branch_discrepancy_is_rms_per_sample():
    cond = torch.zeros(2, 10, 4)
    uncond = torch.ones(2, 10, 4)
    uncond[1] *= 3
    assert branch_discrepancy(cond, uncond).tolist() == [1.0, 3.0]
    big = torch.ones(1, 1000, 4)
    assert branch_discrepancy(torch.zeros_like(big), big).item() == 1.0  # independent of the token count


def test_branch_discrepancy_covers_only_valid_positions():
    cond, uncond = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    uncond[0, 2:] = 5.0  # padding positions of sample 0: must not count
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert branch_discrepancy(cond, uncond, valid).tolist() == [1.0, 1.0]
    assert branch_discrepancy(cond, uncond).tolist()[0] > 3.0  # without the mask the padding dominates
    assert branch_discrepancy(cond[:0], uncond[:0], valid[:0]).shape == (0,)  # no running row: nothing to compute


def test_guard_stops_each_sample_on_its_own():
    guard = GuardState(batch=2)
    all_running = torch.tensor([True, True])
    guard.observe(9, torch.tensor([1.0, 1.0]), all_running, threshold=0.15, eps=1e-8)
    assert not guard.stopped.any()  # no previous Delta: no stop at the first SATS scale
    guard.observe(10, torch.tensor([1.1, 2.0]), all_running, threshold=0.15, eps=1e-8)  # gamma 0.1 and 1.0
    assert guard.stopped.tolist() == [True, False] and guard.stop_scale == [10, None]
    guard.observe(11, torch.tensor([9.0, 2.2]), torch.tensor([False, True]), threshold=0.15, eps=1e-8)
    assert guard.stopped.tolist() == [True, True] and guard.stop_scale == [10, 11]
    assert math.isclose(guard.history[-1]["gamma"][1], 0.1, rel_tol=1e-5) and math.isnan(guard.history[-1]["delta"][0])


def test_a_pass_that_breaks_the_node_contract_is_named_at_once():
    """An input added without metadata (what made export fail with KeyError 'val') is caught right after the pass."""
    from graphsurgeon import OptimizedModel, get_adapter
    from graphsurgeon.passes import GraphPass, PassConfig
    from graphsurgeon.rewrite import PassContractError
    from model_adapters.infinity import build_infinity, get_scale_schedule

    from .helpers import random_text

    class BareInput(GraphPass):
        name, Config = "bare_input", PassConfig

        def rewrite(self, captured):
            scale = captured.scales[-1]
            last = [n for n in scale.module.graph.nodes if n.op == "placeholder"][-1]
            with scale.module.graph.inserting_after(last):
                scale.module.graph.placeholder("extra")  # no meta["val"], no examples
            scale.input_names = scale.input_names + ["extra"]
            return []

    model = build_infinity("infinity-tiny", seed=0)
    fast = OptimizedModel(model, get_adapter("infinity"), [BareInput(PassConfig())])
    with pytest.raises(PassContractError, match=r"pass 'bare_input' left scale graph 6 with input extra that has no"):
        fast.capture(text=random_text([3], 256), scale_schedule=get_scale_schedule(1.0, "0.06M"), cfg=3.0)
    assert fast.cache_info().size == 0  # nothing cached
