"""Small builders shared by tests: random packed text for a model."""
from __future__ import annotations

import torch


def random_text(lens: list[int], channels: int, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(sum(lens), channels, generator=generator)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return kv, list(lens), cu, max(lens)


def slice_text(text: tuple, row: int) -> tuple:
    """The packed text of one prompt of a batch."""
    kv, lens, cu, _ = text
    start = int(cu[row])
    return kv[start:start + lens[row]], [lens[row]], torch.tensor([0, lens[row]], dtype=torch.int32), lens[row]
