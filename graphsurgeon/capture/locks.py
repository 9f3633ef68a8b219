"""The two locks of capture: one per model (its module state) and one per process (fx's replacements)."""
from __future__ import annotations

import threading
import weakref

import torch

CAPTURE_LOCK = threading.RLock()
"""Held for the whole of a capture (by ``capture`` and by ``ShapeTracer.trace``), so that captures run one at a time.

While tracing, ``nn.Module.__call__``/``__getattr__``, ``torch.autocast.__enter__``/``__exit__`` and wrapped
functions hold replacements that intercept only the capturing thread (:mod:`.interception`): other threads' module
calls, graph runs and eager generations go on undisturbed. The replacements are still installed on process-wide
objects, and each trace puts back what it found; two traces at once would save and restore each other's, so they
take turns. Re-entrant: code that changes shared state for a capture (e.g. an adapter's capture-time substitution)
holds it around its change and its ``capture`` call.
"""

_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock serialising every use of state a model keeps in its modules (its KV caches): one per model,
    re-entrant, dropped with the model. An eager runner holds it while entered and a capture while tracing (the
    capture swaps the declared state in and out of the modules), so two runs of one model never share (and
    reset) each other's caches; runs of different models, and graph runs (their state is graph values), proceed
    in parallel, a capture of the same model included."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock
