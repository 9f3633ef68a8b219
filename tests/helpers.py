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


def outputs_equal(a, b) -> bool:
    """Bits, summed codes and logits of two generations are bit-identical."""
    return (all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.summed_codes, b.summed_codes)
            and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits)))


def generate_kwargs(schedule, lens=(5, 9, 3), **extra) -> dict:
    """The sampling arguments the pass tests share (CFG 3, tau 0.5, top-k 900, top-p 0.97, seed 5, logits on)."""
    return dict(dict(text=random_text(list(lens), 256), scale_schedule=schedule, cfg=3.0, tau=0.5, top_k=900,
                     top_p=0.97, seed=5, return_logits=True), **extra)
