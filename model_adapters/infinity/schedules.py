"""Infinity's scale schedules as data.

Each aspect ratio (height / width) has 13 grids (h, w); the pixel-count presets use the first 7, 10, 12
or 13 of them ('0.06M', '0.25M', '0.60M', '1M'; pixels = last grid x 16). Inference uses t = 1, so a
schedule is a list of ``(1, h, w)``. Ratios below 1 are the transposes of the ratios above 1.
"""
from __future__ import annotations

from graphsurgeon.errors import InputError

Schedule = list[tuple[int, int, int]]

_GRIDS_BY_RATIO: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}
for _ratio, _grids in list(_GRIDS_BY_RATIO.items()):
    if _ratio != 1.0:  # the transposed ratio, keyed the way the official tables key it (truncated to 3 decimals)
        _GRIDS_BY_RATIO[int(1 / _ratio * 1000) / 1000] = [(w, h) for h, w in _grids]

PIXEL_PRESETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
VAE_STRIDE = 16

SCALE_SCHEDULES: dict[float, dict[str, Schedule]] = {
    ratio: {pn: [(1, h, w) for h, w in grids[:n]] for pn, n in PIXEL_PRESETS.items()}
    for ratio, grids in _GRIDS_BY_RATIO.items()
}
H_DIV_W_TEMPLATES: tuple[float, ...] = tuple(SCALE_SCHEDULES)
_KNOWN = {tuple(s): (ratio, pn) for ratio, by_pn in SCALE_SCHEDULES.items() for pn, s in by_pn.items()}


def nearest_h_div_w(h_div_w: float) -> float:
    """The template aspect ratio closest to ``h_div_w`` (first one on ties, as the official lookup)."""
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def get_scale_schedule(h_div_w: float = 1.0, pn: str = "1M") -> Schedule:
    """The inference schedule for an aspect ratio (snapped to the nearest template) and a pixel preset."""
    if pn not in PIXEL_PRESETS:
        raise InputError(f"unknown pixel preset pn={pn!r}; expected one of {list(PIXEL_PRESETS)}")
    if not h_div_w > 0:
        raise InputError(f"h_div_w must be positive, got {h_div_w}")
    return list(SCALE_SCHEDULES[nearest_h_div_w(h_div_w)][pn])


def identify_schedule(scale_schedule) -> tuple[float, str]:
    """Return ``(h_div_w, pn)`` of an official schedule, or raise :class:`InputError` naming the problem."""
    try:
        if isinstance(scale_schedule, (str, bytes)):
            raise TypeError("a string is not a schedule")
        key = tuple((int(t), int(h), int(w)) for t, h, w in scale_schedule)
    except (TypeError, ValueError) as err:
        raise InputError(f"scale_schedule must be a list of (1, h, w) tuples, got {scale_schedule!r}") from err
    if key in _KNOWN:
        return _KNOWN[key]
    if any(t != 1 for t, _, _ in key):
        raise InputError(f"scale_schedule: inference uses t=1 for every scale, got {list(key)}")
    raise InputError(
        f"scale_schedule {list(key)} is not an official Infinity schedule (RoPE positions exist only for those); "
        "use model_adapters.infinity.get_scale_schedule(h_div_w, pn)"
    )


def final_grid_1m(h_div_w: float) -> tuple[int, int]:
    """The last (h, w) of the 1M schedule of a template ratio: the frame RoPE positions are normalized to."""
    _, h, w = SCALE_SCHEDULES[h_div_w]["1M"][-1]
    return h, w
