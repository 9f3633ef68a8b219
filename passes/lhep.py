"""LHEP (latent high-frequency energy pruning), LD-Pruning's "where to refine".

At an LHEP scale k the tokens worth computing are chosen from the previous scale's residual map R_{k-1}
(its codes, (B, C, h, w)):

1. energy: the 2x2 Haar high-frequency bands (LH, HL, HH), stride 2, per channel, squared and summed over the
   bands and channels -> (B, h/2, w/2);
2. local aggregation: 3x3 average pooling (stride 1, zero padding counted, torch's default), then a resize to
   the scale's token grid;
3. keep the smallest set of tokens holding a fraction ``rho`` of the total energy: sort descending, find the
   first k with cumsum >= rho * total, keep every token whose energy is >= the k-th value (ties are kept).

Choices where the paper is silent (also in docs/passes.md):
- odd grids (h or w odd, e.g. 27 in the 1.333 schedule) are padded by repeating the last row/column before the
  stride-2 transform;
- the resize to the token grid is bilinear (align_corners=False): E is smooth after pooling;
- a residual with no high-frequency energy at all keeps every token (nothing to rank, so nothing is skipped).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from graphsurgeon.passes import GraphPass, PassConfig, register_pass

_HAAR_HIGH = 0.5 * torch.tensor([
    [[-1.0, 1.0], [-1.0, 1.0]],  # LH
    [[-1.0, -1.0], [1.0, 1.0]],  # HL
    [[-1.0, 1.0], [1.0, -1.0]],  # HH
])


def haar_high_frequency_energy(residual: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, ceil(h/2), ceil(w/2)): sum over channels and LH/HL/HH of squared Haar coefficients."""
    batch, channels, h, w = residual.shape
    x = residual.float()
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    kernels = _HAAR_HIGH.to(x.device)[:, None]  # (3, 1, 2, 2)
    bands = F.conv2d(x.reshape(batch * channels, 1, x.shape[-2], x.shape[-1]), kernels, stride=2)
    return bands.pow(2).reshape(batch, channels * 3, *bands.shape[-2:]).sum(dim=1)


def energy_map(residual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LHEP's token energy on the target grid (h_k, w_k): Haar energy, 3x3 average, bilinear resize."""
    energy = haar_high_frequency_energy(residual)[:, None]
    energy = F.avg_pool2d(energy, kernel_size=3, stride=1, padding=1)
    return F.interpolate(energy, size=grid, mode="bilinear", align_corners=False)[:, 0]


def keep_mask(energy: torch.Tensor, rho: float) -> torch.Tensor:
    """(B, n) energies -> (B, n) bool: per row, the smallest set holding >= rho of the energy (ties kept)."""
    values, _ = energy.sort(dim=-1, descending=True)
    cumulative = values.cumsum(dim=-1)
    total = cumulative[:, -1:]
    reached = cumulative >= rho * total
    first = reached.float().argmax(dim=-1, keepdim=True)  # the first position reaching rho (always exists)
    threshold = values.gather(-1, first)
    return energy >= threshold


class LHEPConfig(PassConfig):
    rho: float = Field(0.5, gt=0.0, le=1.0, description="fraction of high-frequency energy the kept tokens hold")
    scales: Optional[tuple[int, ...]] = Field(None, description="scale indices (negative from the end)")
    last: int = Field(3, ge=0, description="without `scales`: the last this many scales")


@register_pass
class LHEP(GraphPass):
    name: ClassVar[str] = "lhep"
    Config: ClassVar[type[PassConfig]] = LHEPConfig

    def mask(self, previous_residual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Kept tokens (B, h*w) of a scale with token grid ``grid`` given R_{k-1} (B, C, h', w')."""
        return keep_mask(energy_map(previous_residual, grid).flatten(1), self.config.rho)
