"""Bad input is a clear error before any work: schedules, text, forced bits, checkpoints."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from graphsurgeon import CheckpointError, ConfigError, InputError, get_adapter
from model_adapters.infinity import build_infinity, get_scale_schedule, identify_schedule, load_infinity
from model_adapters.infinity.checkpoint import check_state_dict

from .helpers import random_text

SCHEDULE = get_scale_schedule(1.0, "0.06M")


@pytest.fixture(scope="module")
def tiny():
    return build_infinity("infinity-tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    return path


def generate(model, **overrides):
    kwargs = dict(text=random_text([4, 6], 256), scale_schedule=SCHEDULE, cfg=3.0, tau=0.5, seed=0)
    kwargs.update(overrides)
    return get_adapter("infinity").generate(model, **kwargs)


def test_schedule_lookup():
    assert identify_schedule(get_scale_schedule(0.5, "0.60M")) == (0.5, "0.60M")
    assert get_scale_schedule(1.02, "1M")[-1] == (1, 64, 64)  # snapped to the nearest template
    with pytest.raises(InputError, match="pn='2M'"):
        get_scale_schedule(1.0, "2M")


@pytest.mark.parametrize("schedule,needle", [
    ([(1, 1, 1), (1, 3, 3)], "not an official Infinity schedule"),
    ([(2, 1, 1), (1, 2, 2)], "t=1"),
    ("1M", "list of"),
])
def test_wrong_schedule(tiny, schedule, needle):
    with pytest.raises(InputError, match=needle):
        generate(tiny, scale_schedule=schedule)


@pytest.mark.parametrize("mutate,needle", [
    (lambda kv, lens, cu, m: (kv, lens, torch.tensor([0, 5, 10], dtype=torch.int32), m), "disagree with lens"),
    (lambda kv, lens, cu, m: (kv, [4, 7], torch.tensor([0, 4, 11], dtype=torch.int32), 7), "kv_compact has 10 rows"),
    (lambda kv, lens, cu, m: (kv, lens, cu, 9), "max_len is 9"),
    (lambda kv, lens, cu, m: (kv[:, :128], lens, cu, m), "text_channels is 256"),
    (lambda kv, lens, cu, m: (kv, [4, 0], torch.tensor([0, 4, 4], dtype=torch.int32), 4), "positive"),
    (lambda kv, lens, cu, m: (kv, lens), "tuple"),
])
def test_inconsistent_text(tiny, mutate, needle):
    with pytest.raises(InputError, match=needle):
        generate(tiny, text=mutate(*random_text([4, 6], 256)))


def test_prompt_longer_than_uncond_table(tiny):
    with pytest.raises(InputError, match="text_maxlen is 512"):
        generate(tiny, text=random_text([513], 256))


@pytest.mark.parametrize("overrides,needle", [
    (dict(force_bits=[torch.zeros(2, 1, 2, 2, 32, dtype=torch.uint8)]), r"force_bits\[0\] has shape"),
    (dict(force_bits=[torch.full((2, 1, 1, 1, 32), 2, dtype=torch.uint8)]), "0/1"),
    (dict(tau=0.0), "tau must be positive"),
    (dict(cfg=[3.0, 3.0]), "cfg has 2 values for 7 scales"),
    (dict(top_p=1.5), "top_p"),
    (dict(num_scales=9), "num_scales"),
])
def test_bad_sampling_arguments(tiny, overrides, needle):
    with pytest.raises(InputError, match=needle):
        generate(tiny, **overrides)


def test_unknown_adapter():
    with pytest.raises(ConfigError, match="unknown adapter 'not-a-model'"):
        get_adapter("not-a-model")


def test_pth_round_trip(tiny, tiny_checkpoint):
    loaded = load_infinity(tiny_checkpoint, "infinity-tiny")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))
    a = generate(tiny, num_scales=3)
    b = generate(loaded, num_scales=3)
    assert torch.equal(a.summed_codes, b.summed_codes)


def test_safetensors_and_sharded_folder(tmp_path, tiny):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    save_file(state, tmp_path / "tiny.safetensors")
    assert load_infinity(tmp_path / "tiny.safetensors", "infinity-tiny").pos_start.equal(tiny.pos_start)

    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = list(state)
    halves = {"model-00001-of-00002.bin": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    torch.save({k: state[k] for k in halves["model-00001-of-00002.bin"]}, folder / "model-00001-of-00002.bin")
    save_file({k: state[k] for k in halves["model-00002-of-00002.safetensors"]}, folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: shard for shard, ks in halves.items() for k in ks}}
    (folder / "model.bin.index.json").write_text(json.dumps(index))
    loaded = load_infinity(folder, "infinity-tiny")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))


def test_checkpoint_for_another_size_names_the_fitting_config(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"shape mismatch.*matches the named config 'infinity-tiny'"):
        load_infinity(tiny_checkpoint, dict(depth=4, embed_dim=512, num_heads=4, block_chunks=2, text_channels=256))
    big, small = build_infinity("infinity-8b", device="meta"), build_infinity("infinity-2b", device="meta")
    with pytest.raises(CheckpointError, match="matches the named config 'infinity-2b'"):
        check_state_dict(big, small.state_dict(), "infinity_2b_reg.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state.pop("head.bias")
    state["head.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\), e\.g\. \['head\.bias'\].*unexpected key\(s\), e\.g\. \['head\.extra'\]"):
        load_infinity(tmp_path / "bad.pth", "infinity-tiny")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_infinity(tmp_path / "corrupt.pth", "infinity-tiny")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_infinity(tmp_path / "corrupt.safetensors", "infinity-tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_infinity(tmp_path / "absent.pth", "infinity-tiny")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="index.json"):
        load_infinity(tmp_path / "empty_folder", "infinity-tiny")


class Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_never_unpickles_code(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"pos_start": Payload()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_infinity(tmp_path / "evil.pth", "infinity-tiny")
    assert "unpickled!" not in capsys.readouterr().out
