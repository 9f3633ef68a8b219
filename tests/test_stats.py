"""``fast.stats`` reports what is computed: in a ragged batch LHEP pads every row to the widest sample's kept
count, and that padding is work too."""
from __future__ import annotations

import torch

from graphsurgeon import optimize
from model_adapters.infinity import get_scale_schedule

from .helpers import generate_kwargs

SCHEDULE = get_scale_schedule(1.0, "0.06M")  # 7 scales: LHEP on 4-6
TOKENS = [h * w for _, h, w in SCHEDULE]


def forced_bits() -> list[torch.Tensor]:
    """Scales 0-3 teacher-forced: sample 0 flat at scale 3 (no high-frequency energy: LHEP keeps all of scale 4),
    sample 1 random (LHEP keeps part of it)."""
    generator = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (2, 1, h, w, 32), generator=generator, dtype=torch.uint8) for _, h, w in SCHEDULE[:4]]
    bits[3][0] = 0
    return bits


def test_padding_is_counted_in_a_ragged_batch(tiny_float32):
    fast = optimize(tiny_float32, passes=["lhep", "sats"], config={"sats": {"stop_scale": 4}})
    out = fast.generate(**generate_kwargs(SCHEDULE, (5, 9), force_bits=forced_bits()))
    assert out.stats is fast.stats  # the call's own stats; also the last completed call's
    summary = out.stats["summary"]
    kept = {s["scale"]: s["kept"] for s in out.stats["lhep"]}
    rows = [4] * 5 + [2] * 2  # 2 prompts with CFG; SATS stops both after scale 4: conditional rows only from 5
    for entry in summary:
        scale = entry["scale"]
        counts = kept.get(scale) or [TOKENS[scale]] * 2
        width = max(counts)
        per_row = rows[scale] // 2
        assert entry["rows"] == rows[scale] and entry["width"] == width
        assert entry["token_rows_kept"] == per_row * sum(counts)
        assert entry["token_rows_padding"] == per_row * sum(width - k for k in counts)
        assert entry["token_rows"] == entry["token_rows_kept"] + entry["token_rows_padding"] == width * rows[scale]
        assert entry["token_rows_baseline"] == TOKENS[scale] * 4
        assert entry["work_vs_baseline"] == entry["token_rows"] / entry["token_rows_baseline"]
        assert entry["work_vs_baseline_unpadded"] == entry["token_rows_kept"] / entry["token_rows_baseline"]
        assert [s["tokens_computed"] for s in entry["samples"]] == counts
        assert [s["padding_per_row"] for s in entry["samples"]] == [width - k for k in counts]
    first = summary[4]  # sample 0 keeps the whole scale, so every row computes all of it
    assert kept[4][0] == TOKENS[4] > kept[4][1]
    assert first["token_rows_padding"] == 2 * (TOKENS[4] - kept[4][1]) > 0
    assert first["work_vs_baseline"] == 1.0 > first["work_vs_baseline_unpadded"]
