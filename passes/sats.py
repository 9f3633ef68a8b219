"""SATS (semantic-adaptive termination), LD-Pruning's "when to stop" for the unconditional CFG branch.

At every SATS scale where a sample's two branches both ran, its discrepancy is
``Delta_k = RMS(cond_logits - uncond_logits)`` over the scale's tokens and logits. The RMS (not the paper's
plain L2 norm) keeps Delta independent of the token count, which grows from scale to scale and shrinks
under LHEP. Then ``gamma_k = |Delta_k - Delta_prev| / (Delta_prev + eps)`` with Delta_prev from the previous
scale where both branches ran; at the first such scale there is no Delta_prev and no stop (the paper's
Delta_0 = 0 convention gives the same). Once ``gamma_k < delta`` the sample's unconditional branch is not
computed for any later scale; its guidance uses the conditional logits. Each sample of a batch decides alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from pydantic import Field

from graphsurgeon.passes import GraphPass, PassConfig, register_pass


def branch_discrepancy(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """(B, n, V) logits of both branches -> (B,) RMS of their difference."""
    return (cond.float() - uncond.float()).pow(2).flatten(1).mean(dim=1).sqrt()


@dataclass
class GuardState:
    """Per-sample record of the CFG-branch guard across scales."""

    batch: int
    previous: Optional[torch.Tensor] = None
    stopped: torch.Tensor = field(default=None)  # type: ignore[assignment]
    stop_scale: list[Optional[int]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopped = torch.zeros(self.batch, dtype=torch.bool)
        self.stop_scale = [None] * self.batch

    def observe(self, scale: int, delta: torch.Tensor, running: torch.Tensor, threshold: float, eps: float) -> None:
        """Record Delta of the samples whose branches both ran (``running``), and stop those that converged."""
        delta = delta.detach().float().cpu()
        gamma = torch.full_like(delta, float("nan"))
        if self.previous is not None:
            has_previous = running & ~torch.isnan(self.previous)
            gamma[has_previous] = (delta[has_previous] - self.previous[has_previous]).abs() / (
                self.previous[has_previous] + eps)
            stop = has_previous & (gamma < threshold)
            for b in stop.nonzero().flatten().tolist():
                self.stop_scale[b] = scale
            self.stopped |= stop
        previous = self.previous if self.previous is not None else torch.full_like(delta, float("nan"))
        self.previous = torch.where(running, delta, previous)
        self.history.append({"scale": scale, "delta": delta.where(running, torch.tensor(float("nan"))).tolist(),
                             "gamma": gamma.tolist(), "stopped": self.stopped.tolist()})


class SATSConfig(PassConfig):
    delta: float = Field(0.15, ge=0.0, description="stop once the relative change of Delta falls below this")
    eps: float = Field(1e-8, gt=0.0, description="added to Delta_prev in gamma's denominator")
    scales: Optional[tuple[int, ...]] = Field(None, description="scale indices (negative from the end)")
    last: int = Field(4, ge=0, description="without `scales`: the last this many scales")


@register_pass
class SATS(GraphPass):
    name: ClassVar[str] = "sats"
    Config: ClassVar[type[PassConfig]] = SATSConfig
