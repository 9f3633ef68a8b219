"""Load Infinity checkpoints without unpickling code.

Accepted: a plain ``state_dict`` file (``.pth``/``.pt``/``.bin``, read with ``weights_only=True``), a
``.safetensors`` file, or a folder of shards with a Hugging Face style ``*.index.json`` (``weight_map``:
key -> shard file). The key set and every shape must equal the model's; a mismatch is an error naming
the keys, and when the checkpoint belongs to another size the error says which named config fits it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from graphsurgeon.errors import CheckpointError

from .builder import build_infinity
from .config import NAMED_CONFIGS, InfinityConfig, resolve_config
from .model import Infinity


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # every reader raises its own type on a damaged file
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint file {path} does not hold a state_dict of tensors")
    return state


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or sharded folder into one state_dict (tensors on CPU, memory-mapped if possible)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        return _read_file(path)
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) != 1:
        raise CheckpointError(f"checkpoint folder {path} must hold exactly one *.index.json, found {len(indexes)}")
    try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"index {indexes[0]} is not a valid shard index (needs 'weight_map'): {err}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_state = _read_file(path / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = expected - shard_state.keys()
        if missing:
            raise CheckpointError(f"shard {path / shard} lacks keys its index assigns to it: {sorted(missing)[:5]}")
        state.update({k: shard_state[k] for k in expected})
    return state


def _guess_named_config(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The named config whose structure matches a checkpoint, if any (for error messages)."""
    for name, kwargs in NAMED_CONFIGS.items():
        reference = build_infinity(kwargs, device="meta").state_dict()
        if reference.keys() == state.keys() and all(reference[k].shape == state[k].shape for k in state):
            return name
    return None


def check_state_dict(model: Infinity, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    hint = _guess_named_config(state)
    hint_text = f"; this checkpoint matches the named config {hint!r}" if hint else ""
    raise CheckpointError(f"checkpoint {source} does not fit the model config: {'; '.join(problems)}{hint_text}")


def load_infinity(path: Union[str, Path], config: Union[str, dict, InfinityConfig], device: Union[str, torch.device] = "cpu",
                  dtype: Optional[torch.dtype] = None) -> Infinity:
    """Build the model for ``config`` and load the checkpoint at ``path`` into it (strict keys and shapes)."""
    config = resolve_config(config)
    state = read_state_dict(path)
    model = build_infinity(config, device="meta")
    check_state_dict(model, state, str(path))
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"checkpoint {path}: {key} has dtype {value.dtype}, expected a floating point tensor")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=torch.device(device), dtype=dtype).eval()
