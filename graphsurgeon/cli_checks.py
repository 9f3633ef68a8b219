"""Checks of output paths, run before any work: a path that cannot be written fails in a second with one line
naming it, instead of after a long run whose results are then lost."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import ConfigError


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
