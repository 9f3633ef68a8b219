"""Files the project writes: strict JSON, and writes that never leave a half-written file under the final name.

Strict JSON: Python's ``json`` writes the non-standard literals ``NaN`` and ``±inf`` (spelt out) for
non-finite floats, which strict parsers (a browser's
``JSON.parse``, ``jq``) reject; here every non-finite float is written as ``null``. Atomic writes: the text goes to
a temporary name in the same folder and is then renamed over the final name (``os.replace``), so a reader sees the
old file or the new one, never a truncated one. :func:`terminate_as_interrupt` lets a SIGTERM run the cleanup of
such temporary files, as a SIGINT (KeyboardInterrupt) does.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def to_strict_json(value: Any, indent: int = 2) -> str:
    """``value`` as JSON that strict parsers accept: NaN and +-inf become null; objects json cannot write are
    written as their ``str``."""
    return json.dumps(strict(value), indent=indent, allow_nan=False, default=str)


def temporary_name(path: Path, token: str = "") -> Path:
    """A hidden name beside ``path`` for writing it (``token``: a caller's run id; default: unique to this call).
    Not ``tempfile.mkstemp``: its files are private (0600), and the renamed file should get the usual mode."""
    return path.with_name(f".{path.name}.{token or uuid.uuid4().hex[:12]}.part")


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block completes, removed when it
    fails (or is interrupted)."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary name in the same folder. A failing write names
    ``path``, the file the user asked for, not the temporary name."""
    try:
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    return Path(path)


def write_json_atomic(path: Union[str, Path], value: Any) -> Path:
    """Write ``value`` as strict JSON (:func:`to_strict_json`) to ``path`` through a temporary name."""
    return write_text_atomic(path, to_strict_json(value) + "\n")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` (the status a SIGTERM gives) instead of ending the
    process at once, so ``finally`` and ``except`` blocks remove their temporary files. Only in the main thread
    and only over the default action: a handler the program set, or an ignored SIGTERM, is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
