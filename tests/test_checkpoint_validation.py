"""Checkpoints that would fail only at sampling are refused or fixed at load, naming tensor and file (issue 9,
item 8): NaN/Inf weights, other precisions, non-float tensors, shard indexes pointing outside their folder."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from graphsurgeon import CheckpointError, get_adapter
from model_adapters.infinity import build_infinity, get_scale_schedule, load_infinity, read_state_dict

from .helpers import outputs_equal, random_text

KEY = "head.weight"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in build_infinity("infinity-tiny", seed=0).state_dict().items()}


def save(state: dict[str, torch.Tensor], path):
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def generate(model):
    return get_adapter("infinity").generate(model, text=random_text([4, 6], 256),
                                            scale_schedule=get_scale_schedule(1.0, "0.06M"), cfg=3.0, tau=0.5, seed=0,
                                            num_scales=3, return_logits=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_tensor_and_file(tmp_path, state, suffix, bad):
    corrupt = dict(state, **{KEY: state[KEY].clone()})
    corrupt[KEY][0, :3] = bad
    path = save(corrupt, tmp_path / f"tiny{suffix}")
    needle = rf"{re.escape(str(path))}.*NaN/Inf values in 1 tensor\(s\): {KEY} \(3 of "
    with pytest.raises(CheckpointError, match=needle):
        load_infinity(path, "infinity-tiny")
    loaded = load_infinity(path, "infinity-tiny", check_finite=False)  # skipped on request
    assert not torch.isfinite(loaded.state_dict()[KEY]).all()
    assert not torch.isfinite(read_state_dict(path, check_finite=False)[KEY]).all()


def test_non_finite_weights_name_the_shard(tmp_path, state):
    keys = list(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.pth": keys[len(keys) // 2:]}
    bad_key = shards["b.pth"][0]
    for shard, shard_keys in shards.items():
        part = {k: state[k].clone() for k in shard_keys}
        if bad_key in part:
            part[bad_key].view(-1)[0] = float("nan")
        save(part, tmp_path / shard)
    weight_map = {k: shard for shard, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "model.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'b.pth'))}.*{re.escape(bad_key)}"):
        load_infinity(tmp_path, "infinity-tiny")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_float16_checkpoint_is_cast_and_generates(tmp_path, state, suffix):
    path = save({k: v.half() for k, v in state.items()}, tmp_path / f"tiny_fp16{suffix}")
    loaded = load_infinity(path, "infinity-tiny")
    assert {v.dtype for v in loaded.state_dict().values()} == {torch.float32}
    rounded = build_infinity("infinity-tiny", device="meta")  # the same weights, rounded through float16 by hand
    rounded.load_state_dict({k: v.half().float() for k, v in state.items()}, assign=True)
    assert outputs_equal(generate(loaded), generate(rounded.eval()))


def test_bfloat16_checkpoint_goes_straight_to_the_requested_dtype(tmp_path, state):
    path = save({k: v.bfloat16() for k, v in state.items()}, tmp_path / "tiny_bf16.safetensors")
    loaded = load_infinity(path, "infinity-tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.state_dict()[KEY], state[KEY].bfloat16())


def test_integer_tensor_is_refused_naming_tensor_and_file(tmp_path, state):
    path = save(dict(state, **{KEY: state[KEY].long()}), tmp_path / "tiny_int.safetensors")
    needle = rf"{re.escape(str(path))}: {KEY} has dtype torch.int64, the model's is torch.float32"
    with pytest.raises(CheckpointError, match=needle):
        load_infinity(path, "infinity-tiny")


def write_index(folder, state, shard: str, weight_map=None):
    folder.mkdir(exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard for k in state} if weight_map is None else weight_map}))
    return index


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE", "C:\\x.bin",
                                   "..\\outside.safetensors", ""])
def test_index_pointing_outside_its_folder_is_refused(tmp_path, state, shard):
    outside = save(state, tmp_path / "outside.safetensors")  # a valid file: refused for where it is, not what it is
    shard = str(outside) if shard == "ABSOLUTE" else shard
    index = write_index(tmp_path / "ckpt", state, shard)
    needle = rf"index {re.escape(str(index))}: entry .* -> .* points outside the checkpoint folder"
    with pytest.raises(CheckpointError, match=needle):
        load_infinity(tmp_path / "ckpt", "infinity-tiny")


@pytest.mark.parametrize("weight_map", [["tiny.safetensors"], {KEY: 3}, "tiny.safetensors"])
def test_index_whose_weight_map_is_not_a_mapping(tmp_path, state, weight_map):
    index = write_index(tmp_path / "ckpt", state, "", weight_map=weight_map)
    with pytest.raises(CheckpointError, match=rf"index {re.escape(str(index))}: 'weight_map' must be a JSON object"):
        load_infinity(tmp_path / "ckpt", "infinity-tiny")


def test_index_inside_its_folder_still_loads(tmp_path, state):
    folder = tmp_path / "ckpt"
    (folder / "shards").mkdir(parents=True)
    save(state, folder / "shards" / "all.safetensors")
    write_index(folder, state, "shards/all.safetensors")
    loaded = load_infinity(folder, "infinity-tiny")
    assert torch.equal(loaded.state_dict()[KEY], state[KEY])


# -- issue 18, item 8: each damaged input gets its own message --------------------------------------------------------
def test_a_legacy_pickle_file_is_told_apart_from_an_empty_one(tmp_path, state):
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy \\(non-zip\\) pickle format, refused because loading it needs "
                                              "unpickling; re-save it"):
        load_infinity(legacy, "infinity-tiny")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(empty))} is empty"):
        load_infinity(empty, "infinity-tiny")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="neither a .safetensors file nor a torch.save zip file"):
        load_infinity(junk, "infinity-tiny")


def test_integer_weight_map_values_say_what_they_are(tmp_path, state):
    index = write_index(tmp_path / "ckpt", state, "", weight_map={KEY: 3})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(index))}: .* e\.g\. '{KEY}' -> 3 \(int\)"):
        load_infinity(tmp_path / "ckpt", "infinity-tiny")


def test_a_shard_that_is_a_folder_and_a_device_are_named_as_such(tmp_path, state):
    write_index(tmp_path / "ckpt", state, "shard.safetensors")
    (tmp_path / "ckpt" / "shard.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="shard.safetensors is a folder, not a file"):
        load_infinity(tmp_path / "ckpt", "infinity-tiny")
    with pytest.raises(CheckpointError, match="/dev/zero is not a regular file"):
        load_infinity("/dev/zero", "infinity-tiny")


def test_a_vae_shape_error_names_the_tensor(tmp_path):
    from model_adapters.infinity import build_infinity_vae
    from model_adapters.infinity.vae import vae_config_from_checkpoint

    vae_state = {k: v.contiguous() for k, v in build_infinity_vae("infinity-vae-tiny", seed=0).state_dict().items()
                 if k.startswith(("encoder.", "decoder."))}
    vae_state["decoder.conv_in.conv.weight"] = vae_state["decoder.conv_in.conv.weight"].flatten().contiguous()
    path = tmp_path / "vae.safetensors"
    save_file(vae_state, path)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.conv\.weight has shape \(\d+,\); a convolution"):
        vae_config_from_checkpoint(path)


def test_a_nan_vae_is_refused_before_the_transformer_is_built(tmp_path, monkeypatch):
    import model_adapters.infinity.pipeline as pipeline
    from graphsurgeon.images import ImageSources
    from model_adapters.infinity import build_infinity_vae

    def refuse(*_, **__):
        raise AssertionError("the transformer was built before the VAE was checked")

    vae_state = {k: v.contiguous() for k, v in build_infinity_vae("infinity-vae-tiny", seed=0).state_dict().items()
                 if k.startswith(("encoder.", "decoder."))}
    vae_state["decoder.conv_out.conv.weight"].view(-1)[0] = float("nan")
    path = tmp_path / "vae.safetensors"
    save_file(vae_state, path)
    monkeypatch.setattr(pipeline, "build_infinity", refuse)
    with pytest.raises(CheckpointError, match="decoder.conv_out.conv.weight"):
        pipeline.image_pipeline(ImageSources(config="infinity-tiny", vae=path))


def test_nan_text_features_name_the_prompt():
    from graphsurgeon import InputError
    from model_adapters.infinity.sampler import check_text

    kv, lens, cu, max_len = random_text([3, 4, 2], 256)
    kv[5, 7] = float("nan")  # a row of the second prompt
    with pytest.raises(InputError, match=r"NaN/Inf features for prompt\(s\) \[1\]"):
        check_text((kv, lens, cu, max_len), 256, 512, torch.device("cpu"), torch.float32)


# -- issue 18, items 3-5: the T5 folder is checked whole before anything loads ----------------------------------------
@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from model_adapters.infinity.text_encoder import random_text_encoder

    encoder = random_text_encoder(64, seed=0)
    path = tmp_path_factory.mktemp("t5")
    encoder.model.save_pretrained(path)
    encoder.tokenizer.save_pretrained(path)
    return path


def _copy_folder(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def _t5_error(path) -> str:
    from graphsurgeon import ConfigError
    from model_adapters.infinity.text_encoder import check_text_encoder_folder

    with pytest.raises(ConfigError) as caught:
        check_text_encoder_folder(path)
    return str(caught.value)


def test_t5_with_half_its_weights_is_refused(tmp_path, t5_folder):
    from safetensors.torch import load_file

    folder = _copy_folder(t5_folder, tmp_path / "t5")
    weights = load_file(folder / "model.safetensors")
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[: len(keys) // 2]}, folder / "model.safetensors")
    assert "the weights lack" in _t5_error(folder) and "tensors, e.g." in _t5_error(folder)


def test_t5_truncated_and_index_problems_are_refused(tmp_path, t5_folder):
    folder = _copy_folder(t5_folder, tmp_path / "t5")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors is not a readable safetensors file" in _t5_error(folder)
    (folder / "model.safetensors").write_bytes(data)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"shared.weight": "../outside.safetensors"}}))
    assert "points outside the checkpoint folder" in _t5_error(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02 pickled")
    index.write_text(json.dumps({"weight_map": {"shared.weight": "pytorch_model.bin"}}))
    assert "not .safetensors files (pytorch_model.bin); pickled weights are never unpickled" in _t5_error(folder)


def test_t5_with_nan_weights_is_refused_at_load(tmp_path, t5_folder):
    from safetensors.torch import load_file

    from model_adapters.infinity.text_encoder import load_text_encoder

    folder = _copy_folder(t5_folder, tmp_path / "t5")
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(weights) if k.startswith("encoder.block.0"))
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"NaN/Inf values in 1 tensor\(s\): {re.escape(key)}"):
        load_text_encoder(folder)
