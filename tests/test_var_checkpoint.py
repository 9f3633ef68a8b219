"""Loading VAR and VQVAE checkpoints: round trips through safetensors and torch.save, refusal of pickled objects,
mismatched keys and shapes, non-finite weights; codebook statistics of another schedule."""
from __future__ import annotations

import collections
import json

import pytest
import torch
from safetensors.torch import save_file

from graphsurgeon import CheckpointError
from model_adapters.var import build_var, build_var_vqvae, generate, load_var, load_var_vqvae

FAST = dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=(1, 2, 3, 4, 6), vocab_size=512, Cvae=8)
VAE = dict(V=512, Cvae=8, ch=32, patch_nums=FAST["patch_nums"])


@pytest.fixture(scope="module")
def pair():
    return build_var(FAST, seed=0), build_var_vqvae(seed=1, **VAE)


def save(state: dict[str, torch.Tensor], path):
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_loads_and_generates_identically(tmp_path, pair, suffix):
    model, vae = pair
    loaded = load_var(save(model.state_dict(), tmp_path / f"var{suffix}"), FAST)
    loaded_vae = load_var_vqvae(save(vae.state_dict(), tmp_path / f"vae{suffix}"), **VAE)
    assert same_weights(loaded, model) and same_weights(loaded_vae, vae)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.uniform_prob.device == loaded.lvl_1L.device  # follows the weights off the meta device
    a = generate(model, vae, labels=[1, 2], seed=0, return_logits=True)
    b = generate(loaded, loaded_vae, labels=[1, 2], seed=0, return_logits=True)
    assert all(torch.equal(x, y) for x, y in zip(a.indices + a.logits, b.indices + b.logits))
    assert torch.equal(a.f_hat, b.f_hat)


def test_wrapped_and_sharded_checkpoints(tmp_path, pair):
    model, _ = pair
    state = model.state_dict()
    torch.save({"model": {k: v.contiguous() for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert same_weights(load_var(tmp_path / "wrapped.pth", FAST), model)
    keys = list(state)
    shards = {"a.safetensors": keys[:10], "b.pth": keys[10:]}
    for shard, shard_keys in shards.items():
        save({k: state[k] for k in shard_keys}, tmp_path / shard)
    (tmp_path / "model.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, shard_keys in shards.items() for k in shard_keys}}))
    assert same_weights(load_var(tmp_path, FAST), model)


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path, pair):
    model, _ = pair
    path = tmp_path / "pickled.pth"
    torch.save(dict(model.state_dict(), extra=NotATensor()), path)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint file {path}.*Unpickl"):
        load_var(path, FAST)
    torch.save({"head.weight": model.head.weight, "note": "text"}, tmp_path / "mixed.pth")  # allowed by
    with pytest.raises(CheckpointError, match="does not hold a state_dict of tensors"):  # weights_only, still refused
        load_var(tmp_path / "mixed.pth", FAST)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_var(tmp_path / "absent.pth", FAST)


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, pair):
    model, vae = pair
    state = dict(model.state_dict())
    del state["head.bias"]
    state["head.extra"] = torch.zeros(1)
    state["class_emb.weight"] = torch.zeros(21, 64)
    path = save(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_var(path, FAST)
    message = str(err.value)
    assert str(path) in message and "1 missing key(s), e.g. ['head.bias']" in message
    assert "1 unexpected key(s), e.g. ['head.extra']" in message
    assert "class_emb.weight: checkpoint (21, 64) vs model (11, 64)" in message
    tiny = save(build_var("var-tiny", seed=0).state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="matches the named config 'var-tiny'"):
        load_var(tiny, FAST)
    with pytest.raises(CheckpointError, match="does not fit the VQVAE arguments"):
        load_var_vqvae(save(vae.state_dict(), tmp_path / "vae.pth"), **dict(VAE, ch=64))


def test_non_finite_weights_are_refused_unless_asked(tmp_path, pair):
    model, _ = pair
    state = dict(model.state_dict(), **{"head.weight": model.head.weight.clone()})
    state["head.weight"][0, :2] = float("nan")
    path = save(state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 1 tensor\(s\): head.weight \(2 of "):
        load_var(path, FAST)
    assert torch.isnan(load_var(path, FAST, check_finite=False).head.weight).sum() == 2
    mask = model.attn_bias_for_masking.clone()  # -inf is the training mask's normal content, NaN is not
    mask[0, 0, 0, 1] = float("nan")
    with pytest.raises(CheckpointError, match=r"attn_bias_for_masking \(1 of "):
        load_var(save(dict(model.state_dict(), attn_bias_for_masking=mask), tmp_path / "mask.pth"), FAST)


def test_other_precisions_are_cast_and_integer_buffers_checked(tmp_path, pair):
    model, _ = pair
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    loaded = load_var(save(half, tmp_path / "half.safetensors"), FAST)
    assert loaded.head.weight.dtype == torch.float32 and loaded.lvl_1L.dtype == torch.int64
    assert torch.equal(loaded.head.weight, model.head.weight.half().float())
    bad = dict(model.state_dict(), lvl_1L=model.lvl_1L.float())
    with pytest.raises(CheckpointError, match="lvl_1L has dtype torch.float32"):
        load_var(save(bad, tmp_path / "bad_dtype.pth"), FAST)


def test_vqvae_statistics_of_another_schedule_are_replaced(tmp_path, pair):
    _, vae = pair
    state = collections.OrderedDict(vae.state_dict())
    state["quantize.ema_vocab_hit_SV"] = torch.ones(10, 512)  # trained with a ten-scale schedule
    loaded = load_var_vqvae(save(state, tmp_path / "vae.safetensors"), **VAE)
    assert loaded.quantize.ema_vocab_hit_SV.shape == (5, 512) and not loaded.quantize.ema_vocab_hit_SV.any()
    assert torch.equal(loaded.quantize.embedding.weight, vae.quantize.embedding.weight)
