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
