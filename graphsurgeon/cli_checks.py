"""Checks run before any work: output paths (a path that cannot be written fails in a second with one line
naming it, instead of after a long run whose results are then lost), the device, batch sizes and seeds."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .adapters import ModelAdapter

MAX_BATCH = 256
"""The largest batch (``--batch-size``) a command accepts: far above what fits one GPU at 1M for the released
models, so a typo (100000) is refused in a second instead of running until an allocation fails."""

SEED_RANGE = (-2 ** 63, 2 ** 64)
"""Seeds torch's generator takes (a negative seed s draws as s + 2**64)."""


def check_device(text: str, option: str = "--device") -> torch.device:
    """The torch device ``text`` names, refused unless this machine can run a model on it (cpu, or cuda with a
    GPU of that index): a bad name, ``meta`` (no values to sample from) or an absent GPU fail here, before any
    model is built."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option} {text!r} is not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {text}: CUDA is not available on this machine (torch {torch.__version__}"
                              f"{'' if torch.version.cuda else ', a build without CUDA'}); give cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"{option} {text}: graphsurgeon runs models on cpu or cuda, not {device.type}"
                          + (" (a meta tensor holds no values to sample from)" if device.type == "meta" else ""))
    return device


_DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}


def check_dtype(adapter: "ModelAdapter", name: str, device: torch.device, option: str = "--dtype") -> torch.dtype:
    """The torch dtype ``name``, refused unless ``adapter`` runs it on ``device`` (its ``supported_dtypes``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{option} {name!r} is not a torch dtype (float32, bfloat16)")
    if dtype in adapter.supported_dtypes(device.type):
        return dtype
    elsewhere = [_DEVICE_NAMES[t] for t in _DEVICE_NAMES if t != device.type and dtype in adapter.supported_dtypes(t)]
    supported = ", ".join(str(d).removeprefix("torch.") for d in adapter.supported_dtypes(device.type))
    raise ConfigError(f"{option} {name} on {_DEVICE_NAMES[device.type]}: adapter {adapter.name!r} runs {supported} "
                      f"there" + (f" ({name} on {' or '.join(elsewhere)} only)" if elsewhere else ""))


def check_seeds(seed: int, count: int, option: str = "--seed") -> None:
    """Refuse a run whose per-image seeds ``seed .. seed + count - 1`` leave torch's range, before the first image
    (not at the image whose seed overflows)."""
    low, high = SEED_RANGE
    if not low <= seed or not seed + count - 1 < high:
        raise ConfigError(f"{option} {seed}: the seeds of {count} image(s) ({seed} .. {seed + count - 1}) must lie "
                          f"in [-2**63, 2**64), the range of torch's generator")


def _make_writable_dir(path: Path) -> Optional[str]:
    """Create ``path`` (and its parents) and create a file in it; None when that works, else why not.

    Creating is the only reliable test: permission flags say nothing for root or on a read-only file system.
    """
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return f"cannot create or write to the folder {path} ({err.strerror or err})"
    return None


def check_dir_target(path: Union[str, Path], option: str = "--out") -> Path:
    """Create the output folder ``path`` and check a file can be written in it, or raise naming the path."""
    path = Path(path)
    problem = _make_writable_dir(path)
    if problem:
        raise ConfigError(f"{option} {path}: {problem}")
    return path


def check_file_target(path: Union[str, Path], option: str = "--out", suffixes: Sequence[str] = ()) -> Path:
    """Check that the file ``path`` can be written: its suffix (when ``suffixes`` is given), that it is not a
    folder, and that its folder exists or can be created and is writable (the folder is created; the file is not)."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise ConfigError(f"{option} {path}: the file name must end in {', '.join(suffixes)}")
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, expected a file name")
    problem = _make_writable_dir(path.parent)
    if problem:
        raise ConfigError(f"{option} {path}: {problem}")
    if path.exists():
        try:
            with open(path, "ab"):  # appends nothing: only asks whether the file may be written
                pass
        except OSError as err:
            raise ConfigError(f"{option} {path}: cannot write this file ({err.strerror or err})") from None
    return path
