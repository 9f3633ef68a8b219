"""Infinity's BSQ-VAE: structure against the official listings, decoding, checkpoints, and the fit check.

The last tests compare with the official ``AutoEncoder`` when ``GRAPHSURGEON_OFFICIAL_INFINITY`` points at a
FoundationVision/Infinity checkout; without it they skip.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from graphsurgeon.errors import CheckpointError, ConfigError, InputError
from model_adapters.infinity.config import resolve_config
from model_adapters.infinity.vae import (
    _config_from_shapes,
    build_infinity_vae,
    check_vae_fits,
    decode_to_images,
    load_infinity_vae,
    vae_codebook_dim,
    vae_config_from_checkpoint,
)
from model_adapters.infinity.vae_config import InfinityVaeConfig, resolve_vae_config

from .conftest import reference_file

SMALL_D56 = dict(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4), base_ch=24, num_res_blocks=1)
"""The 8B VAE's bits, strides and depth of levels, at the narrowest widths."""


def read_tsv(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in reference_file(name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype))
    return rows


def summed_codes(codebook_dim: int, h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Codes shaped like the sampler's: per scale +-1/sqrt(d) sign codes, trilinearly summed onto (h, w)."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(batch, codebook_dim, 1, h, w)
    for scale in (1, 2, 4):
        bits = torch.randint(0, 2, (batch, codebook_dim, 1, max(1, h // scale), max(1, w // scale)), generator=generator)
        codes = (bits.float() * 2 - 1) / codebook_dim ** 0.5
        total += F.interpolate(codes, size=(1, h, w), mode="trilinear")
    return total


def bare_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict as saved from unwrapped layers (``x.weight`` for ``x.conv.weight`` / ``x.norm.weight``)."""
    return {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny():
    return build_infinity_vae("infinity-vae-tiny", seed=0)


# ------------------------------------------------------------------------------------------------ structure

@pytest.mark.parametrize("name,tsv,n_params", [
    ("infinity-vae-d32", "infinity_vae_d32.state_dict.tsv", 110_118_051),
    ("infinity-vae-d56", "infinity_vae_d56_f8_14_patchify.state_dict.tsv", 81_624_209),
])
def test_state_dict_matches_official_listing(name, tsv, n_params):
    vae = build_infinity_vae(name, device="meta")
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in vae.state_dict().items()]
    assert [k for k, _, _ in ours] == [k for k, _, _ in read_tsv(tsv)]  # same keys in the same order
    assert ours == read_tsv(tsv)  # and the same shapes and dtypes
    assert all(t.device.type == "meta" for t in vae.state_dict().values())
    assert sum(p.numel() for p in vae.parameters()) == n_params
    assert vae.quantize is vae.quantizer  # the official alias: one buffer listed under both names


@pytest.mark.parametrize("name,tsv", [
    ("infinity-vae-d32", "infinity_vae_d32.state_dict.tsv"),
    ("infinity-vae-d56", "infinity_vae_d56_f8_14_patchify.state_dict.tsv"),
])
def test_config_is_read_from_released_layouts(name, tsv):
    """The shapes of the released layouts, in the module's and the bare naming, give back their config."""
    shapes = {key: shape for key, shape, _ in read_tsv(tsv)}
    bare = {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in shapes.items()}
    assert _config_from_shapes(shapes, Path(tsv)) == _config_from_shapes(bare, Path(tsv)) == resolve_vae_config(name)


def test_seed_draws_every_parameter():
    vae = build_infinity_vae("infinity-vae-tiny", seed=3)
    again = build_infinity_vae("infinity-vae-tiny", seed=3)
    for name, param in vae.named_parameters():
        assert not bool((param == 0).any() or (param == 1).any()), name
        assert torch.equal(param, again.state_dict()[name])
    assert vae.quantizer.lfq.mask.tolist() == [2 ** i for i in range(31, -1, -1)]
    with pytest.raises(ConfigError, match="meta"):
        build_infinity_vae("infinity-vae-tiny", device="meta", seed=0)


@pytest.mark.parametrize("config,match", [
    ("infinity-vae-d99", "unknown Infinity VAE config"),
    (dict(codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4), heads=2), "heads"),
    (dict(codebook_dim=32, patch_size=32, ch_mult=(1, 2, 4, 4, 4)), "patch_size 32"),
    (dict(codebook_dim=32, patch_size=12, ch_mult=(1, 2, 4, 4, 4)), "power of two"),
    (dict(codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4), base_ch=20), "group-norm"),
    (dict(codebook_dim=0, patch_size=16, ch_mult=(1, 2, 4, 4, 4)), "codebook_dim"),
])
def test_invalid_configs_are_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        resolve_vae_config(config)


# ------------------------------------------------------------------------------------------------ decoding

def test_tiny_decodes_a_64_grid_to_1024_pixels(tiny):
    images = decode_to_images(tiny, summed_codes(32, 64, 64, batch=1))
    assert images.shape == (1, 1024, 1024, 3) and images.dtype == torch.uint8
    assert int(images.min()) == 0 and int(images.max()) == 255  # the clamp is exercised at both ends
    assert 0.2 < images.float().std().item() / 255 < 0.45  # a spread image, not a saturated one


def test_decode_is_the_official_mapping(tiny):
    codes = summed_codes(32, 4, 6)
    images = decode_to_images(tiny, codes)
    assert images.shape == (2, 64, 96, 3)
    with torch.no_grad():
        x = tiny.decoder(codes.squeeze(2)).clamp(-1, 1)
    assert torch.equal(images, ((x + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1))  # truncation, RGB order
    # batch rows are independent (up to float noise of the batch-size-dependent convolution, which can cross a
    # truncation boundary)
    assert (images[1:].int() - decode_to_images(tiny, codes[1:]).int()).abs().max() <= 1


def test_patchify_vae_takes_vae_grid_or_token_grid_codes():
    vae = build_infinity_vae(SMALL_D56, seed=1)
    codes = summed_codes(14, 8, 8)
    images = decode_to_images(vae, codes)
    assert images.shape == (2, 64, 64, 3)
    token_grid = F.pixel_unshuffle(codes.squeeze(2), 2).unsqueeze(2)  # (B, 56, 1, 4, 4), what the transformer sees
    assert torch.equal(decode_to_images(vae, token_grid), images)


@pytest.mark.parametrize("codes,match", [
    (torch.zeros(1, 32, 4, 4), r"\(B, 32, 1, H, W\)"),
    (torch.zeros(1, 16, 1, 4, 4), "codebook_dim 32"),
    (torch.zeros(1, 128, 1, 4, 4), "got"),  # token-grid codes only for a VAE that pairs with patchify
    (torch.zeros(1, 32, 2, 4, 4), "got"),
    (torch.zeros(1, 32, 1, 4, 4, dtype=torch.int64), "floating point"),
    (torch.full((1, 32, 1, 4, 4), float("nan")), "NaN"),
])
def test_decode_refuses_bad_codes(tiny, codes, match):
    with pytest.raises(InputError, match=match):
        decode_to_images(tiny, codes)


def test_png_written_by_pillow_keeps_the_pixels(tiny, tmp_path):
    image = decode_to_images(tiny, summed_codes(32, 2, 3, batch=1))[0]
    Image.fromarray(image.numpy(), mode="RGB").save(tmp_path / "out.png")
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))), image)


# ------------------------------------------------------------------------------------------------ checkpoints

def _round_trip_files(vae, tmp_path: Path) -> dict[str, Path]:
    state = vae.state_dict()
    files = {"safetensors": tmp_path / "vae.safetensors", "torch": tmp_path / "vae.pth",
             "official": tmp_path / "official.pth", "no_bit_weights": tmp_path / "nomask.safetensors"}
    save_file({k: v.clone() for k, v in state.items()}, files["safetensors"])  # clone: the alias shares memory
    torch.save(state, files["torch"])
    torch.save({"vae": bare_names(state)}, files["official"])  # the training checkpoint's layout
    save_file({k: v for k, v in bare_names(state).items() if not k.endswith("lfq.mask")}, files["no_bit_weights"])
    return files


@pytest.mark.parametrize("config", ["infinity-vae-tiny", SMALL_D56], ids=["tiny", "d56-like"])
def test_save_load_round_trip(tmp_path, config):
    vae = build_infinity_vae(config, seed=2)
    codes = summed_codes(vae.config.codebook_dim, 2, 2)
    expected = decode_to_images(vae, codes)
    for kind, path in _round_trip_files(vae, tmp_path).items():
        assert vae_config_from_checkpoint(path) == vae.config, kind
        assert vae_codebook_dim(path) == vae.config.codebook_dim, kind
        loaded = load_infinity_vae(path)
        assert list(loaded.state_dict()) == list(vae.state_dict())
        assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.state_dict().items()), kind
        assert torch.equal(decode_to_images(loaded, codes), expected), kind
    assert load_infinity_vae(tmp_path / "vae.pth", config=vae.config).config == vae.config


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_refuses_pickled_objects_and_non_tensor_content(tmp_path, tiny):
    torch.save({"vae": {"decoder.conv_in.conv.weight": Payload()}}, tmp_path / "evil.pth")
    for read in (load_infinity_vae, vae_codebook_dim, vae_config_from_checkpoint):
        with pytest.raises(CheckpointError, match="cannot read VAE checkpoint file .*evil.pth"):
            read(tmp_path / "evil.pth")
    torch.save({"vae": {"step": 3}}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="ints.pth does not hold a VAE state_dict"):
        load_infinity_vae(tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_infinity_vae(tmp_path / "absent.pth")


def test_mismatches_name_key_and_file(tmp_path, tiny):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "decoder.up.0.block.1.conv2.conv.bias"},
                    r"missing key.*decoder\.up\.0\.block\.1\.conv2\.conv\.bias"),
        "unexpected": (dict(state, **{"decoder.extra.weight": torch.zeros(1)}), r"unexpected key.*decoder\.extra"),
        "shape": (dict(state, **{"decoder.norm_out.norm.bias": torch.zeros(48)}), r"decoder\.norm_out\.norm\.bias"),
        "nan": (dict(state, **{"decoder.conv_out.conv.bias": torch.tensor([0.0, float("nan"), 0.0])}),
                r"NaN/Inf .*decoder\.conv_out\.conv\.bias"),
        "bit weights": (dict(state, **{"quantize.lfq.mask": torch.arange(32)}), r"quantize\.lfq\.mask is not the bit"),
        "twice": (dict(state, **{"decoder.conv_out.weight": state["decoder.conv_out.conv.weight"].clone()}),
                  r"'decoder\.conv_out\.weight' both load into"),
    }
    for name, (bad, match) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(bad, path)
        with pytest.raises(CheckpointError, match=match) as err:
            load_infinity_vae(path, config="infinity-vae-tiny")
        assert str(path) in str(err.value), name
    save_file(state, tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError, match="its shapes describe the named config 'infinity-vae-tiny'"):
        load_infinity_vae(tmp_path / "ok.safetensors", config=SMALL_D56)
    assert load_infinity_vae(tmp_path / "nan.safetensors", check_finite=False).config == tiny.config


def test_metadata_of_a_non_vae_checkpoint_is_refused(tmp_path):
    save_file({"blocks.0.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other.safetensors has no 'decoder\.conv_in\.conv\.weight'"):
        vae_codebook_dim(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------------------------ fit check

@pytest.mark.parametrize("vae,transformer", [
    ("infinity-vae-d32", "infinity-2b"), ("infinity-vae-d56", "infinity-8b"), ("infinity-vae-tiny", "infinity-tiny"),
])
def test_named_vaes_fit_their_transformers(vae, transformer):
    config = resolve_config(transformer)
    check_vae_fits(vae, config.codebook_dim, bool(config.apply_spatial_patchify))


def test_misfits_name_both_values(tiny):
    with pytest.raises(ConfigError, match="codebook_dim 32 bits per position, the transformer samples codebook_dim 14"):
        check_vae_fits(tiny, 14, False)
    with pytest.raises(ConfigError, match="patch_size 8 without .* 8 px per token, the scale schedules assume 16"):
        check_vae_fits("infinity-vae-d56", 14, False)
    with pytest.raises(ConfigError, match="patch_size 16 with .* 32 px per token") as err:
        check_vae_fits(InfinityVaeConfig(**tiny.config.model_dump()), 14, True)
    assert "codebook_dim 32" in str(err.value)  # both problems at once


# ------------------------------------------------------------------------------------------------ official code

CHECKOUT = os.environ.get("GRAPHSURGEON_OFFICIAL_INFINITY")


def _never(*args, **kwargs):
    raise NotImplementedError("stand-in for a package the official 2-D image path does not call")


_STAND_INS = {"einops": dict(rearrange=_never, reduce=_never, pack=_never, unpack=_never), "imageio": {},
              "torchvision": {}, "torchvision.transforms": {}}


@pytest.fixture(scope="module")
def official_vae_module():
    """``infinity.models.bsq_vae.vae`` imported unchanged from the checkout, without ``infinity/models/__init__``
    (it needs timm and flash-attn) and with empty stand-ins for einops, imageio and torchvision where missing:
    the 2-D image path never calls them. Everything added to ``sys.modules`` is removed again."""
    before = set(sys.modules)
    missing = {name for name in _STAND_INS if "." not in name and importlib.util.find_spec(name) is None}
    for name, attributes in _STAND_INS.items():
        if name.split(".")[0] in missing:
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attributes)
            if "." in name:
                parent, leaf = name.rsplit(".", 1)
                setattr(sys.modules[parent], leaf, sys.modules[name])
    for package in ("infinity", "infinity.models"):
        if package not in sys.modules:
            sys.modules[package] = types.ModuleType(package)
            sys.modules[package].__path__ = [str(Path(CHECKOUT, *package.split(".")))]
    try:
        yield importlib.import_module("infinity.models.bsq_vae.vae")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


@pytest.mark.skipif(not CHECKOUT, reason="set GRAPHSURGEON_OFFICIAL_INFINITY to a FoundationVision/Infinity checkout")
@pytest.mark.parametrize("config", [
    dict(codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4), base_ch=32, num_res_blocks=2),
    dict(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4), base_ch=32, num_res_blocks=2),
], ids=["d32-like", "d56-like"])
def test_bit_identical_to_the_official_vae(official_vae_module, monkeypatch, tmp_path, config):
    """The official ``vae_model`` (its loader and key mapping included; only the base width and block count
    made small) loads the same weights, saved with unwrapped-layer names, and decodes the same pixels."""
    config = resolve_vae_config(config)
    ours = build_infinity_vae(config, seed=1)
    path = tmp_path / "vae.pth"
    torch.save({"vae": bare_names(ours.state_dict())}, path)
    autoencoder = official_vae_module.AutoEncoder

    def small(args):
        args.base_ch, args.num_res_blocks = config.base_ch, config.num_res_blocks
        return autoencoder(args)

    monkeypatch.setattr(official_vae_module, "AutoEncoder", small)
    official = official_vae_module.vae_model(str(path), "dynamic", config.codebook_dim, 2 ** config.codebook_dim,
                                             patch_size=config.patch_size, encoder_ch_mult=list(config.ch_mult),
                                             decoder_ch_mult=list(config.ch_mult))
    assert [(k, v.shape) for k, v in official.state_dict().items()] == [(k, v.shape) for k, v in ours.state_dict().items()]
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in official.state_dict().items())  # all loaded
    loaded = load_infinity_vae(path)
    codes = summed_codes(config.codebook_dim, 8, 8)
    with torch.no_grad():
        # the official inference's steps after sampling; its final flip to BGR is for cv2.imwrite
        x = official.decode(codes.squeeze(-3))
        reference = ((x + 1) / 2).permute(0, 2, 3, 1).mul_(255).to(torch.uint8).flip(dims=(3,))
        image = torch.rand(1, 3, 4 * config.patch_size, 4 * config.patch_size) * 2 - 1
        assert torch.equal(loaded.encoder(image), official.encoder(image))
    assert torch.equal(loaded.decode(codes.squeeze(-3)), x)
    assert torch.equal(decode_to_images(loaded, codes), reference.flip(dims=(3,)))
