"""What an adapter declares so that graphsurgeon can capture a model's scale steps."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch


@dataclass(frozen=True)
class StateSlot:
    """State a module keeps in an attribute across scales (e.g. an attention's KV cache).

    During capture the attribute is set from a graph input (``name``) before the step and read back as a
    graph output after it; at the first scale it holds ``None``.
    """

    name: str
    module: str
    attribute: str
    row_axis: Optional[int] = 0
    """Dimension of the state that runs over the batch rows (None: not row-wise)."""


@dataclass
class ScaleSpec:
    """One scale step: its example inputs and the function that runs the model's own code on them."""

    index: int
    grid: tuple[int, ...]
    inputs: dict[str, Any]
    """Graph inputs in order, name -> example tensor (any device; only shapes and dtypes are used)."""
    token_input: Optional[str]
    token_axis: Optional[int]
    step: Callable[[torch.nn.Module, dict[str, Any]], dict[str, Any]]
    """``step(model, inputs) -> outputs``; outputs are named and become the graph's outputs, in order."""
    row_inputs: tuple[str, ...] = ()
    """Inputs whose first dimension runs over the batch rows (passes that drop rows select these)."""
    packed_inputs: Optional[tuple[str, str]] = None
    """(values, offsets) of a packed per-row input such as text: row r owns values[offsets[r]:offsets[r+1]]."""

    @property
    def tokens(self) -> int:
        n = 1
        for extent in self.grid:
            n *= extent
        return n


@dataclass
class CapturePlan:
    model: torch.nn.Module
    scales: list[ScaleSpec]
    state: list[StateSlot] = field(default_factory=list)
    leaf_types: tuple[type, ...] = ()
    leaf_functions: tuple[Callable, ...] = ()
    prepare: Callable[[], ContextManager] = contextlib.nullcontext
    """Context entered around capture (e.g. switching the model's caching flags on)."""
    notes: list[str] = field(default_factory=list)
    """Adapter facts for the capture report (replaced kernels, specialisations)."""
    regions: dict[str, list[ScaleSpec]] = field(default_factory=dict)
    """Further per-scale regions (e.g. "residual": sampled bits -> codes -> next input), captured without state."""
    cfg_batch: Optional[int] = None
    """With classifier-free guidance on a doubled batch: B (rows [0:B] conditional, [B:2B] unconditional)."""
    export_decompositions: dict[Any, Callable] = field(default_factory=dict)
    """Opaque op -> an equivalent in plain torch ops, substituted when exporting (e.g. to ONNX)."""
