"""The reference model's structure equals the official class: state_dict keys, shapes and order."""
from __future__ import annotations

import pytest
import torch

from graphsurgeon import ConfigError
from model_adapters.infinity import InfinityConfig, build_infinity, resolve_config

from .conftest import reference_file


def read_tsv(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in reference_file(name).read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())))
    return rows


@pytest.mark.parametrize("name,tsv,n_params", [
    ("infinity-2b", "infinity_2b.state_dict.tsv", 2.205e9),
    ("infinity-8b", "infinity_8b.state_dict.tsv", 8.376e9),
])
def test_state_dict_matches_official_listing(name, tsv, n_params):
    model = build_infinity(name, device="meta")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    official = read_tsv(tsv)
    assert [k for k, _ in ours] == [k for k, _ in official]  # same keys in the same order
    assert ours == official  # and the same shapes
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert abs(sum(p.numel() for p in model.parameters()) - n_params) / n_params < 1e-3


def test_golden_weights_load_strictly(golden, golden_model):
    assert list(golden["state_dict"]) == list(golden_model.state_dict())


def test_block_registration_and_shared_objects():
    model = build_infinity("infinity-tiny", device="meta")
    registered = [m for chunk in model.block_chunks for m in chunk.module]
    assert len(registered) == 4 and all(a is b for a, b in zip(registered, model.unregistered_blocks))
    single_chunk = build_infinity(dict(depth=2, embed_dim=256, num_heads=2, block_chunks=1, text_channels=256), device="meta")
    assert any(k.startswith("blocks.1.") for k in single_chunk.state_dict())


def test_8b_config_uses_patchify_and_wide_pool():
    config = resolve_config("infinity-8b")
    assert (config.d_vae, config.vocab_size, config.ffn_hidden) == (56, 112, 14336)
    model = build_infinity(config, device="meta")
    assert model.text_proj_for_sos.ca.mat_q.shape == (1, 16, 224)


@pytest.mark.parametrize("bad,needle", [
    (dict(depth=4, embed_dim=250, num_heads=3), "divisible by num_heads"),
    (dict(depth=5, embed_dim=256, num_heads=2, block_chunks=2), "block_chunks"),
    (dict(depth=4, embed_dim=256, num_heads=2, colour="red"), "colour"),
    (dict(depth=4, embed_dim=256, num_heads=2, cos_attn=False), "cos_attn"),
    (dict(depth=0, embed_dim=256, num_heads=2), "depth"),
])
def test_bad_config_is_a_clear_error(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_config(bad)


def test_unknown_named_config():
    with pytest.raises(ConfigError, match="infinity-3b"):
        build_infinity("infinity-3b")


def test_seeded_weights_are_reproducible_and_fill_every_parameter():
    a = build_infinity("infinity-tiny", seed=7)
    b = build_infinity("infinity-tiny", seed=7)
    c = build_infinity("infinity-tiny", seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
        assert pa.abs().sum() > 0, name
    assert all(torch.all(buf == 0) for name, buf in a.named_buffers() if name.endswith("zero_k_bias"))


def test_config_object_round_trips():
    config = InfinityConfig(depth=2, embed_dim=256, num_heads=2, block_chunks=1, text_channels=256)
    assert resolve_config(config.model_dump()) == config
