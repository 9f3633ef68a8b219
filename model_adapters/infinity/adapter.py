"""The Infinity adapter: what graphsurgeon needs to know about the Infinity family."""
from __future__ import annotations

from typing import Any

from .sampler import GenerationOutput, generate


class InfinityAdapter:
    """Adapter for Infinity-2B/8B: the reference class here and the official ``Infinity`` class alike."""

    name = "infinity"

    def generate(self, model: Any, **kwargs: Any) -> GenerationOutput:
        """The baseline sampler (see :func:`model_adapters.infinity.sampler.generate`)."""
        return generate(model, **kwargs)
