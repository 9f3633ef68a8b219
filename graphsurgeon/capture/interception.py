"""Interception that only the capturing thread sees.

To record a graph, torch.fx replaces ``nn.Module.__call__`` and ``__getattr__`` (and wrapped or autowrapped
functions in module globals) on the class and in the globals themselves: objects every thread in the process
uses. fx's own tracer makes those replacements intercept every caller, so while one thread traces, a module
called in any other thread is recorded into that thread's graph (or fails). Here each replacement first asks
whether it is called by the thread that traces, while it traces; every other caller goes straight to what was
there before. fx also sets a process-wide "tracing" flag that makes ``torch.compile``d code in other threads run
eagerly; the tracer built on this patcher never sets it.
"""
from __future__ import annotations

import builtins
import functools
import threading
from typing import Any, Callable

import torch.fx._symbolic_trace as fx_trace


class ThreadLocalPatcher(fx_trace._Patcher):
    """fx's patcher whose replacements intercept only the owner thread, only while it is active.

    On exit it undoes only what still holds its own replacement: if something else replaced one of them since
    (another library tracing in another thread), that one is left alone, and the replacement it wraps, now
    inactive, passes every call through to what was there before.
    """

    def __init__(self, condition: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.owner = threading.get_ident()
        self.active = True
        self._condition = condition

    def intercepts(self) -> bool:
        """Whether a call arriving now is the trace's: the owner thread, active, and the tracer's condition."""
        return self.active and threading.get_ident() == self.owner and self._condition()

    def patch(self, frame_dict: dict[str, Any], name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
        original = frame_dict[name] if name in frame_dict else getattr(builtins, name, None)
        super().patch(frame_dict, name, self._guard(new_fn, original), deduplicate)

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
        super().patch_method(cls, name, self._guard(new_fn, getattr(cls, name)), deduplicate)

    def _guard(self, new_fn: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
        intercepts = self.intercepts

        @functools.wraps(new_fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if intercepts():
                return new_fn(*args, **kwargs)
            return original(*args, **kwargs)

        return guarded

    def __exit__(self, *exc: Any) -> None:
        self.active = False
        while self.patches_made:
            patch = self.patches_made.pop()
            if isinstance(patch, fx_trace._PatchedFnSetAttr):
                current = getattr(patch.frame_dict, patch.fn_name, None)
            else:
                current = patch.frame_dict.get(patch.fn_name)
            if current is patch.new_fn:
                patch.revert()
        self.visited.clear()
