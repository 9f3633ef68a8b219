"""RoPE-2D as Infinity uses it (``rope2d_normalized_by_hw=2``).

A token (i, j) of a scale with grid (h, w) gets the position ``(round(i * H / h), round(j * W / w))``,
where (H, W) is the last grid of the 1M schedule of the same aspect ratio: every scale lives in one
coordinate frame. The first half of the rotation pairs turns with the row position, the second half with
the column; pairs are adjacent channels (2k, 2k+1). Tables are keyed by ``str(tuple(schedule))`` and shaped
``(2, 1, 1, 1, L_pad, head_dim // 2)`` (cos, sin), L padded to ``pad_to_multiplier``, so a scale's slice is
``[..., start:start + h*w, :]`` with start the token count of the earlier scales.
"""
from __future__ import annotations

import torch

from .schedules import SCALE_SCHEDULES, final_grid_1m


def _scale_angles(h: int, w: int, frame_h: int, frame_w: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotation angles (h*w, 2 * len(inv_freq)) of one scale's tokens in row-major order."""
    rows = (torch.arange(h) * (frame_h / h)).round()
    cols = (torch.arange(w) * (frame_w / w)).round()
    row_angles = (rows[:, None] * inv_freq[None, :])[:, None, :].expand(h, w, -1)
    col_angles = (cols[:, None] * inv_freq[None, :])[None, :, :].expand(h, w, -1)
    return torch.cat([row_angles, col_angles], dim=-1).reshape(h * w, -1)


def build_rope_table(h_div_w: float, head_dim: int, pad_to_multiplier: int, base: float = 10000.0) -> torch.Tensor:
    """The (cos, sin) table of every token of the 1M schedule of one aspect ratio, padded."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    frame_h, frame_w = final_grid_1m(h_div_w)
    angles = torch.cat([_scale_angles(h, w, frame_h, frame_w, inv_freq) for _, h, w in SCALE_SCHEDULES[h_div_w]["1M"]])
    table = torch.stack([angles.cos(), angles.sin()])  # (2, L, half)
    pad = -table.shape[1] % pad_to_multiplier
    if pad:
        table = torch.cat([table, table.new_zeros(2, pad, half)], dim=1)
    return table[:, None, None, None]


class RopeTable(dict):
    """``str(tuple(schedule)) -> table``, computed on first use (all official schedules are valid keys)."""

    def __init__(self, head_dim: int, pad_to_multiplier: int):
        super().__init__()
        self.head_dim, self.pad_to_multiplier = head_dim, pad_to_multiplier
        self._ratio_of_key = {
            str(tuple(schedule)): ratio for ratio, by_pn in SCALE_SCHEDULES.items() for schedule in by_pn.values()
        }

    def __missing__(self, key: str) -> torch.Tensor:
        if key not in self._ratio_of_key:
            raise KeyError(f"no RoPE table for schedule {key}: only official Infinity schedules have positions")
        ratio = self._ratio_of_key[key]
        table = build_rope_table(ratio, self.head_dim, self.pad_to_multiplier)
        for other, other_ratio in self._ratio_of_key.items():  # every preset of a ratio shares one table
            if other_ratio == ratio:
                self[other] = table
        return table


def apply_rope2d(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, H, L, c) by the positions ``start:start+L`` of ``table``; float32, autocast off."""
    device_type = q.device.type if q.device.type != "mps" else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        seq_len = q.shape[2]
        if start + seq_len > table.shape[4]:
            raise IndexError(f"RoPE positions {start}:{start + seq_len} exceed the table ({table.shape[4]})")
        cos, sin = table[0, 0, :, :, start:start + seq_len], table[1, 0, :, :, start:start + seq_len]  # (1, 1, L, c/2)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            pairs = x.reshape(*x.shape[:-1], -1, 2)
            even, odd = pairs[..., 0], pairs[..., 1]
            return torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1).reshape(x.shape)

        return rotate(q), rotate(k)
