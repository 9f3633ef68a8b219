"""Load Infinity checkpoints without unpickling code.

Accepted: a plain ``state_dict`` file (``.pth``/``.pt``/``.bin``, read with ``weights_only=True``), a
``.safetensors`` file, or a folder of shards with a Hugging Face style ``*.index.json`` (``weight_map``:
key -> shard file, a relative path inside the folder; symlinks are followed, as in the Hugging Face cache).
The key set and every shape must equal the model's; a mismatch is an error naming the keys, and when the
checkpoint belongs to another size the error says which named config fits it. NaN/Inf weights are refused
at load naming the tensor and the file (``check_finite``), and floating tensors stored in another precision
are cast to the model's, so that neither surfaces later as a sampling error that names neither.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional, Union

import torch

from graphsurgeon.errors import CheckpointError

from .builder import build_infinity
from .config import NAMED_CONFIGS, InfinityConfig, resolve_config
from .model import Infinity


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN/Inf weights, naming tensors and file: one read of the weights, which loading does anyway."""
    bad = []
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(f"{key} ({value.numel() - int(torch.isfinite(value).sum())} of {value.numel()} values)")
    if bad:
        raise CheckpointError(f"checkpoint file {path} has NaN/Inf values in {len(bad)} tensor(s): {', '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}; the file is damaged or the training diverged "
                              "(check_finite=False loads it anyway)")


def _read_file(path: Path, check_finite: bool) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # every reader raises its own type on a damaged file
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint file {path} does not hold a state_dict of tensors")
    if check_finite:
        _check_finite(state, path)
    return state


def _shard_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``, refused unless it maps names to shard files inside the index's folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"index {index} is not a valid shard index (needs 'weight_map'): {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"index {index}: 'weight_map' must be a JSON object mapping tensor names to shard "
                              f"file names, got {type(weight_map).__name__}")
    for key, shard in weight_map.items():
        parts = PurePosixPath(shard.replace("\\", "/"))
        if not shard or parts.is_absolute() or PureWindowsPath(shard).drive or ".." in parts.parts:
            raise CheckpointError(f"index {index}: entry {key!r} -> {shard!r} points outside the checkpoint folder "
                                  f"{index.parent}; shard files must be relative paths inside it")
    return weight_map


def _read_with_sources(path: Path, check_finite: bool) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The state_dict and, per key, the file it came from (for errors that name the file)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        state = _read_file(path, check_finite)
        return state, dict.fromkeys(state, path)
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) != 1:
        raise CheckpointError(f"checkpoint folder {path} must hold exactly one *.index.json, found {len(indexes)}")
    weight_map = _shard_map(indexes[0])
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        shard_state = _read_file(path / shard, check_finite)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = expected - shard_state.keys()
        if missing:
            raise CheckpointError(f"shard {path / shard} lacks keys its index assigns to it: {sorted(missing)[:5]}")
        state.update({k: shard_state[k] for k in expected})
        sources.update(dict.fromkeys(expected, path / shard))
    return state, sources


def read_state_dict(path: Union[str, Path], check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or sharded folder into one state_dict (tensors on CPU, memory-mapped if possible).

    ``check_finite`` refuses NaN/Inf values naming tensor and file; False skips that pass over the weights.
    """
    return _read_with_sources(Path(path), check_finite)[0]


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


def _match_dtypes(model: Infinity, state: dict[str, torch.Tensor], sources: dict[str, Path],
                  dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Cast floating tensors stored in another precision to the model's (or straight to ``dtype``, saving a
    float32 copy); a dtype mismatch involving a non-floating tensor is refused naming tensor and file."""
    expected = model.state_dict()
    matched = {}
    for key, value in state.items():
        want = expected[key].dtype
        if value.dtype != want and not (value.is_floating_point() and want.is_floating_point):
            raise CheckpointError(f"checkpoint file {sources[key]}: {key} has dtype {value.dtype}, the model's is "
                                  f"{want}; only floating point tensors are cast")
        target = dtype if dtype is not None and dtype.is_floating_point and want.is_floating_point else want
        matched[key] = value if value.dtype == want else value.to(target)
    return matched


def load_infinity(path: Union[str, Path], config: Union[str, dict, InfinityConfig], device: Union[str, torch.device] = "cpu",
                  dtype: Optional[torch.dtype] = None, check_finite: bool = True) -> Infinity:
    """Build the model for ``config`` and load the checkpoint at ``path`` into it (strict keys and shapes).

    Floating tensors stored in another precision (float16, bfloat16, float64) are cast to the model's float32,
    or to ``dtype`` when given: the sampler's inputs (text features, RoPE tables) are float32, and a float16
    model would fail only later, at a matmul, naming no tensor. ``check_finite`` refuses NaN/Inf weights at
    load, naming tensor and file (one extra read of the weights); pass False to skip it for a checkpoint known
    to be sound.
    """
    config = resolve_config(config)
    state, sources = _read_with_sources(Path(path), check_finite)
    model = build_infinity(config, device="meta")
    check_state_dict(model, state, str(path))
    model.load_state_dict(_match_dtypes(model, state, sources, dtype), strict=True, assign=True)
    return model.to(device=torch.device(device), dtype=dtype).eval()
