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
    key: Optional[str] = None
    """When the module keeps its state in a container (a dict attribute), the entry: the state is
    ``getattr(module, attribute)[key]``. The container itself stays the module's; only the entry is swapped."""


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
    logits_output: Optional[str] = None
    """Role "logits" of a scale step: the output holding per-token logits (rows, tokens, V). Passes that
    compare the CFG branches or put pruned tokens back read it."""
    sampled_input: Optional[str] = None
    """Role "sampled" of a residual step: the input holding the values drawn at this scale (binary codes, code
    indices or their embeddings), batch first. A pass that replaces drawn values (LHEP's Eq. 14) rewrites it."""
    sampled_axes: Optional[tuple[int, int]] = None
    """The (height, width) dimensions of ``sampled_input`` (its grid may be a multiple of the token grid)."""
    residual_output: Optional[str] = None
    """Role "residual" of a residual step: the output holding this scale's residual R_k as a (B, C, h, w) map.
    A pass that weights a scale's contribution (DepthVAR's code blending) scales R_k where it is computed, so
    every other output should be computed from the drawn values through R_k (checked by such a pass)."""
    accumulated: Optional[str] = None
    """Role "accumulated" of a residual step: the name of both the input and the output holding the running sum of
    the scales' contributions (the latent the decoder reads). A pass that skips a scale passes it through."""

    @property
    def tokens(self) -> int:
        n = 1
        for extent in self.grid:
            n *= extent
        return n


RESIDUAL = "residual"
"""The region name under which a plan's ``residual`` steps are captured (``captured.regions[RESIDUAL]``)."""


@dataclass
class CapturePlan:
    """Everything the capture needs from an adapter for one specialisation (see docs/adapters.md)."""

    model: torch.nn.Module
    scales: list[ScaleSpec]
    state: list[StateSlot] = field(default_factory=list)
    leaf_types: tuple[type, ...] = ()
    leaf_functions: tuple[Callable, ...] = ()
    prepare: Callable[[], ContextManager] = contextlib.nullcontext
    """Context entered around capture (e.g. switching the model's caching flags on)."""
    notes: list[str] = field(default_factory=list)
    """Adapter facts for the capture report (replaced kernels, specialisations)."""
    residual: list[ScaleSpec] = field(default_factory=list)
    """The residual step of each scale that runs (drawn values -> R_k -> the next scale's input), captured
    without state as the region :data:`RESIDUAL`. Declare its roles (``sampled_input``, ``residual_output``)."""
    regions: dict[str, list[ScaleSpec]] = field(default_factory=dict)
    """Further per-scale regions, by name, captured without state (exported and reported like the residual)."""
    cfg_batch: Optional[int] = None
    """The CFG layout. With classifier-free guidance on a doubled batch: B, where rows [0:B] are the conditional
    samples and rows [B:2B] their unconditional twins (row b + B guides sample b); None without CFG."""
    blocks: tuple[str, ...] = ()
    """Module paths (relative to ``model``) of the blocks a scale step runs on its token stream, in order: the
    layers of a pass that works per layer (e.g. DepthVAR's per-token depth). Each must be called once per scale
    step, take the stream (rows, tokens, C) and return it updated; see :mod:`graphsurgeon.capture.blocks`."""
    export_decompositions: dict[Any, Callable] = field(default_factory=dict)
    """Opaque op -> an equivalent in plain torch ops, substituted when exporting (e.g. to ONNX)."""
