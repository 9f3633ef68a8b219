"""Model-neutral checkpoint reading and checking, without unpickling code.

Accepted: a plain ``state_dict`` file (``.pth``/``.pt``/``.bin``, read with ``weights_only=True``), a
``.safetensors`` file, or a folder of shards with a Hugging Face style ``*.index.json`` (``weight_map``:
key -> shard file, a relative path inside the folder). A file holding anything but a dict of tensors (after
unwrapping the usual ``state_dict`` / ``model`` / ``module`` wrappers) is refused, and so are NaN/Inf weights
(``check_finite``; -inf is allowed in the keys of additive attention masks), naming tensor and file. A model family's loader builds its model on the meta device, checks
keys and shapes with :func:`check_keys_and_shapes`, casts with :func:`match_dtypes` and loads with
``assign=True``.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Collection, Mapping, Optional, Union

import torch

from .errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model", "module")
"""Keys under which training scripts commonly nest the state_dict."""


def check_finite_tensors(state: Mapping[str, torch.Tensor], path: Path, mask_keys: Collection[str] = (),
                         remedy: str = "check_finite=False loads it anyway") -> None:
    """Refuse NaN/Inf weights, naming tensors and file. ``mask_keys`` name additive attention masks, whose
    normal content is 0 and -inf: only NaN and +inf are refused there. ``remedy`` ends the message."""
    bad = []
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        ok = torch.isfinite(value) | torch.isneginf(value) if key in mask_keys else torch.isfinite(value)
        if not bool(ok.all()):
            bad.append(f"{key} ({value.numel() - int(ok.sum())} of {value.numel()} values)")
    if bad:
        raise CheckpointError(f"checkpoint file {path} has NaN/Inf values in {len(bad)} tensor(s): {', '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}; the file is damaged or the training diverged "
                              f"({remedy})")


_LEGACY_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
"""How a legacy (pre-zip) ``torch.save`` file starts: its magic number, pickled first (read as bytes, never
unpickled)."""


def check_weights_file(path: Path, what: str = "checkpoint file") -> None:
    """Refuse, before reading, what no reader here can read, each with its own message: a folder, a missing path,
    a device or pipe (``/dev/zero``), an empty file, and a non-safetensors file that is not a ``torch.save`` zip
    file, told apart into the legacy pickle format (loading it needs unpickling) and anything else."""
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty")
    if path.suffix == ".safetensors" or zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        legacy = handle.read(len(_LEGACY_HEAD)) == _LEGACY_HEAD
    if legacy:
        raise CheckpointError(f"{what} {path} is in torch's legacy (non-zip) pickle format, refused because loading "
                              "it needs unpickling; re-save it once with torch.save's zip format (the default since "
                              "torch 1.6) or as .safetensors")
    raise CheckpointError(f"{what} {path} is neither a .safetensors file nor a torch.save zip file (damaged, "
                          "truncated or another format)")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """One file's state_dict, unwrapped, memory-mapped where the format allows; never unpickles objects."""
    check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # every reader raises its own type on a damaged or unsafe file
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None
    for wrapper in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"checkpoint file {path} does not hold a state_dict of tensors")
    return state


def read_checkpoint_file(path: Path, check_finite: bool, mask_keys: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """One file's state_dict (CPU tensors, memory-mapped where the format allows); never unpickles objects."""
    state = _load_file(path)
    if check_finite:
        check_finite_tensors(state, path, mask_keys)
    return state


def read_shapes(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Key -> a meta tensor of the stored shape, for a checkpoint file or sharded folder (the keys its
    index assigns to each shard, as :func:`read_checkpoint` loads them), reading no weights: a safetensors header,
    a zip file memory-mapped. Lets a command line refuse a file that does not fit before any model is built."""
    path = Path(path)
    if not path.is_dir():
        return _file_shapes(path)
    weight_map = shard_map(_index_of(path))
    shapes: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        stored = _file_shapes(path / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = expected - stored.keys()
        if missing:
            raise CheckpointError(f"shard {path / shard} lacks keys its index assigns to it: {sorted(missing)[:5]}")
        shapes.update({k: stored[k] for k in expected})
    return shapes


def _file_shapes(path: Path) -> dict[str, torch.Tensor]:
    """One file's keys and shapes as meta tensors (see :func:`read_shapes`)."""
    if path.suffix != ".safetensors":
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _load_file(path).items()}
    from safetensors import SafetensorError, safe_open

    check_weights_file(path)
    shapes = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = torch.empty(handle.get_slice(key).get_shape(), device="meta")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(err).__name__}: {err}") from None
    return shapes


def _index_of(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) != 1:
        raise CheckpointError(f"checkpoint folder {folder} must hold exactly one *.index.json, found {len(indexes)}")
    return indexes[0]


def shard_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``, refused unless it maps names to shard files inside the index's folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"index {index} is not a valid shard index (needs 'weight_map'): {err}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"index {index}: 'weight_map' must be a JSON object mapping tensor names to shard "
                              f"file names, got {type(weight_map).__name__}")
    bad = {key: shard for key, shard in weight_map.items() if not isinstance(shard, str)}
    if bad:
        key, shard = next(iter(bad.items()))
        raise CheckpointError(f"index {index}: 'weight_map' must be a JSON object mapping tensor names to shard "
                              f"file names; {len(bad)} value(s) are not strings, e.g. {key!r} -> {shard!r} "
                              f"({type(shard).__name__})")
    for key, shard in weight_map.items():
        parts = PurePosixPath(shard.replace("\\", "/"))
        if not shard or parts.is_absolute() or PureWindowsPath(shard).drive or ".." in parts.parts:
            raise CheckpointError(f"index {index}: entry {key!r} -> {shard!r} points outside the checkpoint folder "
                                  f"{index.parent}; shard files must be relative paths inside it")
    return weight_map


def read_checkpoint(path: Union[str, Path], check_finite: bool = True, mask_keys: Collection[str] = ()
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The state_dict of a checkpoint file or sharded folder and, per key, the file it came from.

    ``check_finite`` refuses NaN/Inf values (see :func:`check_finite_tensors` for ``mask_keys``)."""
    path = Path(path)
    if not path.is_dir():
        state = read_checkpoint_file(path, check_finite, mask_keys)
        return state, dict.fromkeys(state, path)
    weight_map = shard_map(_index_of(path))
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        shard_state = read_checkpoint_file(path / shard, check_finite, mask_keys)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = expected - shard_state.keys()
        if missing:
            raise CheckpointError(f"shard {path / shard} lacks keys its index assigns to it: {sorted(missing)[:5]}")
        state.update({k: shard_state[k] for k in expected})
        sources.update(dict.fromkeys(expected, path / shard))
    return state, sources


def check_keys_and_shapes(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str,
                          what: str = "the model config", hint: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the keys and shapes of ``expected`` (a
    model's ``state_dict()``, meta tensors are fine). ``hint`` is called only on a mismatch and may return a
    sentence to append (e.g. which named config the checkpoint fits)."""
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
    extra = hint() if hint is not None else None
    raise CheckpointError(f"checkpoint {source} does not fit {what}: {'; '.join(problems)}"
                          f"{'; ' + extra if extra else ''}")


def match_dtypes(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                 sources: Mapping[str, Path], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Cast floating tensors stored in another precision to the model's (or straight to ``dtype``, saving a
    float32 copy); a dtype mismatch involving a non-floating tensor is refused naming tensor and file."""
    matched = {}
    for key, value in state.items():
        want = expected[key].dtype
        if value.dtype != want and not (value.is_floating_point() and want.is_floating_point):
            raise CheckpointError(f"checkpoint file {sources[key]}: {key} has dtype {value.dtype}, the model's is "
                                  f"{want}; only floating point tensors are cast")
        target = dtype if dtype is not None and dtype.is_floating_point and want.is_floating_point else want
        matched[key] = value if value.dtype == target else value.to(target)
    return matched
