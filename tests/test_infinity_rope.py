"""RoPE-2D semantics, checked against the rule stated by the official code (rope2d_normalized_by_hw=2)."""
from __future__ import annotations

import math

import pytest
import torch

import model_adapters.infinity.model as infinity_model
from model_adapters.infinity import build_infinity, get_scale_schedule
from model_adapters.infinity.rope import RopeTable, apply_rope2d

HEAD_DIM = 128


def expected_table(h_div_w: float) -> torch.Tensor:
    """cos/sin per token, from the rule: token (i, j) of grid (h, w) sits at (round(i*H/h), round(j*W/w))."""
    schedule = get_scale_schedule(h_div_w, "1M")
    _, H, W = schedule[-1]
    freqs = [1.0 / 10000 ** (2 * k / (HEAD_DIM // 2)) for k in range(HEAD_DIM // 4)]
    rows = []
    for _, h, w in schedule:
        for i in range(h):
            for j in range(w):
                r, c = round(i * H / h), round(j * W / w)
                rows.append([r * f for f in freqs] + [c * f for f in freqs])
    angles = torch.tensor(rows, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()])


@pytest.mark.parametrize("h_div_w", [1.0, 0.5, 1.333])
def test_positions_are_normalized_to_the_final_grid(h_div_w):
    schedule = get_scale_schedule(h_div_w, "1M")
    table = RopeTable(HEAD_DIM, 128)[str(tuple(schedule))]
    n = sum(h * w for _, h, w in schedule)
    assert table.shape == (2, 1, 1, 1, math.ceil(n / 128) * 128, HEAD_DIM // 2)
    assert torch.allclose(table[:, 0, 0, 0, :n].double(), expected_table(h_div_w), atol=2e-4)


def test_presets_of_one_ratio_share_one_table():
    table = RopeTable(HEAD_DIM, 128)
    small, full = get_scale_schedule(1.0, "0.25M"), get_scale_schedule(1.0, "1M")
    assert table[str(tuple(small))] is table[str(tuple(full))]


def test_pairs_are_interleaved_rows_first():
    """Channel pair (2k, 2k+1) turns by row*theta_k for the first half of pairs, by column*theta_k after."""
    schedule = get_scale_schedule(1.0, "1M")
    table = RopeTable(HEAD_DIM, 128)[str(tuple(schedule))]
    start = sum(h * w for _, h, w in schedule[:2])  # the 4x4 scale: token 5 is (1, 1) -> position (16, 16)
    q = torch.zeros(1, 1, 16, HEAD_DIM)
    q[..., 0] = 1.0  # pair 0 (row, theta 1)
    q[..., HEAD_DIM // 2] = 1.0  # pair 32 (column, theta 1)
    rotated, _ = apply_rope2d(q, q.clone(), table, start)
    token = rotated[0, 0, 5]
    assert torch.allclose(token[:2], torch.tensor([math.cos(16), math.sin(16)]), atol=1e-5)
    assert torch.allclose(token[HEAD_DIM // 2:HEAD_DIM // 2 + 2], torch.tensor([math.cos(16), math.sin(16)]), atol=1e-5)
    assert torch.count_nonzero(token[2:HEAD_DIM // 2]) == 0


def test_attention_uses_the_slice_of_its_scale(monkeypatch):
    model = build_infinity("infinity-tiny", seed=0)
    schedule = get_scale_schedule(1.0, "0.06M")
    starts = []
    real = infinity_model.apply_rope2d
    monkeypatch.setattr(infinity_model, "apply_rope2d", lambda q, k, t, start: starts.append(start) or real(q, k, t, start))
    sa = model.unregistered_blocks[0].sa
    x = torch.randn(2, 16, model.C)
    sa(x, None, None, schedule, model.rope2d_freqs_grid, scale_ind=2)
    assert starts == [1 + 4]


def test_unknown_schedule_has_no_table():
    with pytest.raises(KeyError, match="official Infinity schedules"):
        RopeTable(HEAD_DIM, 128)[str(((1, 1, 1), (1, 3, 3)))]
