"""The VAR re-implementation's structure equals the official classes: state_dict keys, shapes, dtypes and order;
configs, presets and the 512 px schedule; the Phi choice per scale; seeded weights."""
from __future__ import annotations

import math

import pytest
import torch

from graphsurgeon import ConfigError
from model_adapters.var import (NAMED_CONFIGS, PATCH_NUMS_512, VARConfig, build_var, build_var_vqvae,
                                resolve_var_config)
from model_adapters.var.vqvae import phi_ticks

from .conftest import reference_file


def read_tsv(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in reference_file(name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype))
    return rows


def listing(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("name,tsv,n_params", [
    ("var-d16", "var_d16.state_dict.tsv", 310_283_520),
    ("var-d30", "var_d30.state_dict.tsv", 2_010_020_356),
])
def test_state_dict_matches_official_listing(name, tsv, n_params):
    model = build_var(name, device="meta")
    ours, official = listing(model), read_tsv(tsv)
    assert [k for k, _, _ in ours] == [k for k, _, _ in official]  # same keys in the same order
    assert ours == official  # and the same shapes and dtypes (buffers included)
    assert all(t.device.type == "meta" for t in model.state_dict().values())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_vqvae_state_dict_matches_official_listing():
    vae = build_var_vqvae(device="meta")
    assert listing(vae) == read_tsv("var_vqvae_ch160v4096z32.state_dict.tsv")


def test_named_configs_and_released_defaults():
    assert sorted(NAMED_CONFIGS) == ["var-d16", "var-d20", "var-d24", "var-d30", "var-d36", "var-tiny"]
    for depth in (16, 20, 24, 30):
        cfg = resolve_var_config(f"var-d{depth}")
        assert (cfg.embed_dim, cfg.num_heads, cfg.shared_aln, cfg.attn_l2_norm) == (64 * depth, depth, False, True)
        assert (cfg.num_classes, cfg.vocab_size, cfg.Cvae, cfg.num_tokens) == (1000, 4096, 32, 680)
    d36 = resolve_var_config("var-d36")
    assert d36.shared_aln and d36.patch_nums == PATCH_NUMS_512 and d36.embed_dim == 2304
    assert resolve_var_config({"depth": 12}) == VARConfig(depth=12, embed_dim=768, num_heads=12)
    cfg = resolve_var_config("var-tiny")
    assert resolve_var_config(cfg) is cfg


@pytest.mark.parametrize("bad,needle", [
    ("var-d99", "unknown VAR config 'var-d99'"),
    (dict(depth=2, embed_dim=100, num_heads=3), "divisible by num_heads"),
    (dict(depth=2, colour="red"), "colour"),
    (dict(depth=2, flash_if_available=True), "flash_if_available"),
    (dict(depth=0), "depth must be positive"),
    (dict(depth=2, patch_nums=(16,)), "at least two scales"),
    (dict(depth=2, patch_nums=(1, 3, 2)), "strictly increasing"),
    (dict(depth=2, cond_drop_rate=1.5), "cond_drop_rate"),
    (3.5, "expected a config name"),
])
def test_bad_configs_name_the_problem(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_var_config(bad)


def test_512_schedule_and_shared_adaln_build():
    model = build_var("var-d36", device="meta")
    assert model.L == 2240 and model.first_l == 1 and model.num_stages_minus_1 == 9
    assert model.pos_1LC.shape == (1, 2240, 2304) and model.attn_bias_for_masking.shape == (1, 1, 2240, 2240)
    keys = model.state_dict()
    assert keys["shared_ada_lin.1.weight"].shape == (6 * 2304, 2304) and keys["blocks.0.ada_gss"].shape == (1, 1, 6, 2304)
    assert not any(".ada_lin." in k for k in keys if k.startswith("blocks."))
    small = build_var(dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=PATCH_NUMS_512), seed=0)
    vae = build_var_vqvae(device="meta", patch_nums=PATCH_NUMS_512)
    assert small.begin_ends[-1] == (2240 - 32 * 32, 2240) and vae.quantize.ema_vocab_hit_SV.shape == (10, 4096)


def test_level_ids_and_training_mask():
    model = build_var(dict(depth=1, embed_dim=64, num_heads=1, patch_nums=(1, 2, 3)), seed=0)
    assert model.lvl_1L.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]]
    mask = model.attn_bias_for_masking[0, 0]
    level = model.lvl_1L[0]
    assert torch.equal(mask == 0, level[:, None] >= level[None, :])  # a token sees its own and earlier scales
    assert bool(torch.isneginf(mask[mask != 0]).all())


def test_phi_ticks_and_choice_per_scale():
    assert phi_ticks(4) == pytest.approx([1 / 12, 13 / 36, 23 / 36, 11 / 12])
    vae = build_var_vqvae(device="meta")
    chosen = [vae.quantize.quant_resi.index_for(si / 9) for si in range(10)]
    # 2/9 and 7/9 lie exactly halfway between two ticks; float64 rounding (numpy's) gives both to the later one
    assert chosen == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    numpy = pytest.importorskip("numpy")
    for K in range(2, 9):
        reference = numpy.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else numpy.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
        assert phi_ticks(K) == reference.tolist()


def test_seeded_weights_are_reproducible_and_nowhere_zero():
    a, b = build_var("var-tiny", seed=3), build_var("var-tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for name, param in a.named_parameters():  # no gate, AdaLN projection or bias left at zero
        assert bool((param != 0).all()) and (param.numel() == 1 or param.std() > 0), name
    ada = a.blocks[0].ada_lin[1].weight[: 2 * a.C]  # the gamma rows the official init shrinks to 1e-5
    assert ada.std() > 0.5 / math.sqrt(a.C) / 2
    vae = build_var_vqvae(seed=4, ch=32)
    assert all(p.std() > 0 for p in vae.parameters()) and not any(p.requires_grad for p in vae.parameters())


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ch=48), "multiple of 32"),
    (dict(share_quant_resi=1), "share_quant_resi"),
    (dict(quant_resi=0.0), "quant_resi"),
    (dict(patch_nums=(4, 2)), "strictly increasing"),
])
def test_bad_vqvae_arguments(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        build_var_vqvae(device="meta", **kwargs)


def test_seed_needs_real_storage():
    with pytest.raises(ConfigError, match="meta"):
        build_var("var-tiny", device="meta", seed=0)
