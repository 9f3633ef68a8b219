"""Pictures in the diff report: LHEP keep masks (alone and over decoded images), the SATS strip and FLOP bars,
checked as the PNGs' pixels against what the passes recorded, and on screen in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from graphsurgeon import optimize
from graphsurgeon.flops import measure_flops
from graphsurgeon.report import (FLOP_COLOURS, GRID_RGB, KEPT_RGB, PICTURE_SIDE, SATS_COLOURS, SKIPPED_RGB,
                                 DiffReport, build_report)
from graphsurgeon.runner import PassRuntime
from model_adapters.infinity import build_infinity, get_scale_schedule

from .helpers import random_text
from .test_report import CHROMIUM, chromium

KWARGS = dict(text=random_text([7, 12], 256), scale_schedule=get_scale_schedule(1.0, "0.06M"), cfg=3.0, tau=0.5,
              top_k=900, top_p=0.97, seed=1234)
LHEP_SCALES, SAMPLES = [4, 5, 6], 2  # the default last 3 scales of the 7-scale schedule; 2 prompts


class KeepRecorder(PassRuntime):
    """Keeps the masks the scale graphs return (``lhep_keep``), a record independent of LHEP's own stats."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: dict[int, torch.Tensor] = {}

    def observe(self, graph, region: str, outputs: dict) -> None:
        if region == "scale" and "lhep_keep" in outputs:
            self.keep[graph.index] = outputs["lhep_keep"].clone()


class Tags(HTMLParser):
    """Every start tag's attributes, by tag name."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.found: dict[str, list[dict]] = {}
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.found.setdefault(tag, []).append(dict(attrs))

    def having(self, tag: str, css_class: str) -> list[dict]:
        return [a for a in self.found.get(tag, []) if css_class in a.get("class", "").split()]


def png(attributes: dict) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert attributes["src"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(attributes["src"][len(prefix):]))).convert("RGB")


def centres(picture: Image.Image, grid: list[int]):
    """(row, column, pixel at the token's centre) for every token of the grid stretched over the picture."""
    height, width = grid
    for y in range(height):
        for x in range(width):
            px, py = int((x + 0.5) * picture.width / width), int((y + 0.5) * picture.height / height)
            yield y, x, (px, py)


@pytest.fixture(scope="module")
def run():
    """One generation (2 samples, 7 scales; both samples stop at scale 4), its report, then the same after
    ``measure_flops`` (same arguments, so the same masks and decisions)."""
    fast = optimize(build_infinity("infinity-tiny", seed=0), passes=["lhep", "sats"])
    recorder = KeepRecorder()
    fast.extra_runtimes = [recorder]
    out = fast.generate(**KWARGS)
    fast.extra_runtimes = []
    before = fast.report
    measure_flops(fast, **KWARGS)
    return SimpleNamespace(fast=fast, stats=out.stats, keep=recorder.keep, before=before, after=fast.report)


def test_lhep_stats_record_each_keep_mask_as_strings(run):
    scales = run.fast._current().scales
    for entry in run.stats["lhep"]:
        height, width = scales[entry["scale"]].grid[-2:]
        assert entry["grid"] == [height, width]
        if entry["scale"] not in LHEP_SCALES:
            assert entry["kept"] is None and entry["mask"] is None
            continue
        recorded = torch.tensor([[[c == "1" for c in row] for row in sample] for sample in entry["mask"]])
        assert torch.equal(recorded, run.keep[entry["scale"]].reshape(SAMPLES, height, width))
        assert [sum(row.count("1") for row in sample) for sample in entry["mask"]] == entry["kept"]
    assert json.loads(json.dumps(run.stats["lhep"])) == run.stats["lhep"]


def test_one_keep_mask_picture_per_lhep_scale_and_sample_drawn_as_recorded(run):
    page = run.after.html()
    pictures = Tags(page).having("img", "keep-mask")
    assert sorted((int(a["data-scale"]), int(a["data-sample"])) for a in pictures) == [
        (s, b) for s in LHEP_SCALES for b in range(SAMPLES)]
    assert page.count("data:image/png") == len(pictures)  # no decoded images given
    masks = {m["scale"]: m for m in run.after.data["lhep_masks"]}
    transposed = False
    for attributes in pictures:
        entry, sample = masks[int(attributes["data-scale"])], int(attributes["data-sample"])
        rows, (height, width) = entry["masks"][sample], entry["grid"]
        transposed |= rows != ["".join(column) for column in zip(*rows)]
        picture, cell = png(attributes), PICTURE_SIDE // max(height, width)
        assert picture.size == (width * cell, height * cell) and cell >= 16  # an 8x8 to 16x16 grid, scaled up
        assert (int(attributes["width"]), int(attributes["height"])) == picture.size
        for y, x, centre in centres(picture, entry["grid"]):
            assert picture.getpixel(centre) == (KEPT_RGB if rows[y][x] == "1" else SKIPPED_RGB), (entry["scale"], y, x)
    assert transposed  # some mask differs from its transpose, so a transposed drawing fails above


def test_sats_strip_has_a_cell_per_sample_and_scale_with_the_decision(run):
    cells = Tags(run.after.html()).having("td", "sats-cell")
    decisions = {d["scale"]: d for d in run.stats["sats"]}
    assert sorted((int(c["data-sample"]), int(c["data-scale"])) for c in cells) == [
        (b, s) for b in range(SAMPLES) for s in range(7)]
    states = set()
    for cell in cells:
        d, sample = decisions[int(cell["data-scale"])], int(cell["data-sample"])
        ran, stops = d["uncond_ran"][sample], d["stopped_after"][sample]
        assert (cell["data-uncond"], cell["data-stopped-after"]) == (str(int(ran)), str(int(stops)))
        state = "stops" if ran and stops else "ran" if ran else "skipped"
        assert state in cell["class"].split()
        states.add(state)
        if d["delta"] is not None and ran:
            assert f"Delta {d['delta'][sample]:.4g}" in cell["title"]
    assert states == {"ran", "stops", "skipped"}


def test_sats_strip_shows_gamma_the_stop_is_decided_on_and_says_so(run):
    page = run.after.html()
    rule = re.search(r'<p id="sats-rule">(.*?)</p>', page).group(1)
    assert rule.startswith("<b>&gamma; decides</b>") and "below the threshold delta = 0.15" in rule
    decisions = {d["scale"]: d for d in run.stats["sats"]}
    shown = 0
    for sample, scale, text in re.findall(r'<td class="sats-cell[^"]*" data-sample="(\d+)" data-scale="(\d+)"[^>]*>'
                                          r'(.*?)</td>', page):
        d = decisions[int(scale)]
        gamma = d["gamma"][int(sample)] if d["gamma"] is not None else None
        if gamma is not None and math.isfinite(gamma):
            assert f"&gamma; {gamma:.4g}</small><br><small>&Delta; " in text  # gamma first, Delta under it
            shown += 1
        else:
            assert "&gamma;" not in text
    assert shown >= SAMPLES


def test_samples_are_named_by_the_callers_labels(run):
    labels = ['image 4: "a red apple"', 'image 5: "a blue bird"']
    page = DiffReport(build_report(run.fast, run.fast.last_flops, labels=labels)).html()
    escaped = [label.replace('"', "&quot;") for label in labels]
    assert [page.count(f"<th>{label}</th>") for label in escaped] == [2, 2]  # keep masks and SATS strip
    assert "sample 0" not in page and "sample 1" not in page
    with pytest.raises(ValueError, match="1 labels for a generation of 2 samples"):
        build_report(run.fast, labels=labels[:1])


def test_flop_bars_appear_after_measure_flops(run):
    assert 'id="flop-bars"' not in run.before.html() and not Tags(run.before.html()).having("rect", "flop-bar")
    bars = Tags(run.after.html()).having("rect", "flop-bar")
    flops = run.fast.last_flops
    assert len(bars) == 3 * len(flops["baseline"])
    for bar in bars:
        kind = next(k for k in FLOP_COLOURS if k in bar["class"].split())
        assert int(bar["data-value"]) == flops[kind][int(bar["data-scale"])]
    largest, longest = max(int(b["data-value"]) for b in bars), max(float(b["width"]) for b in bars)
    for bar in bars:  # one linear axis (widths are written to 0.1 px)
        assert float(bar["width"]) == pytest.approx(int(bar["data-value"]) / largest * longest, abs=0.06)


def test_html_is_self_contained(run):
    images = torch.zeros(SAMPLES, 8, 8, 3, dtype=torch.uint8)
    for report in (run.before, run.after, DiffReport(build_report(run.fast, run.fast.last_flops, images=images))):
        page = report.html()
        assert not re.search(r"https?:|<script|<link|@import|url\(", page, re.IGNORECASE)
        sources = re.findall(r"(?:src|href)\s*=\s*\"([^\"]*)\"", page)
        assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_masks_are_drawn_over_given_images(run):
    height, width = 60, 100  # not square, not a multiple of any grid: the token grid is stretched over the image
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images = torch.stack([torch.stack([x * 2, y * 4, torch.full_like(x, 90 + 100 * b)], -1) for b in range(SAMPLES)])
    images = images.to(torch.uint8)
    report = DiffReport(build_report(run.fast, run.fast.last_flops, images=images))
    tags = Tags(report.html())
    assert len(tags.having("img", "decoded")) == SAMPLES
    masks = {m["scale"]: m for m in report.data["lhep_masks"]}
    pictures = tags.having("img", "keep-mask")
    assert len(pictures) == len(LHEP_SCALES) * SAMPLES
    for attributes in pictures:
        entry, sample = masks[int(attributes["data-scale"])], int(attributes["data-sample"])
        picture = png(attributes)
        assert picture.width / picture.height == pytest.approx(width / height)
        for row, column, (px, py) in centres(picture, entry["grid"]):
            source = tuple(images[sample, py * height // picture.height, px * width // picture.width].tolist())
            kept = entry["masks"][sample][row][column] == "1"
            assert picture.getpixel((px, py)) == (source if kept else tuple(v * 3 // 10 for v in source))
    data = json.loads(report.json())
    assert "images" not in data and "data:image" not in report.json() and "decoded images" in report.markdown()
    with pytest.raises(ValueError, match="3 images for a generation of 2 samples"):
        build_report(run.fast, images=torch.zeros(3, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        build_report(run.fast, images=torch.zeros(SAMPLES, 8, 8, 3))


def test_json_keeps_the_masks_and_markdown_points_to_the_html(run):
    data = json.loads(run.after.json())
    assert [m["scale"] for m in data["lhep_masks"]] == LHEP_SCALES
    assert [m["masks"] for m in data["lhep_masks"]] == [s["mask"] for s in run.stats["lhep"] if s["mask"]]
    assert len(data["sats_decisions"]) == 7 and "data:image" not in run.after.json()
    assert "Pictures (LHEP keep masks, SATS decisions, FLOP bars) are in the HTML report" in run.after.markdown()


def colour_counts(path) -> dict[tuple, int]:
    return {colour: count for count, colour in Image.open(path).convert("RGB").getcolors(1 << 24)}


def rgb(hex_colour: str) -> tuple:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
def test_screenshot_shows_the_pictures(run, tmp_path):
    """Chromium renders the page; every pixel of every mask picture must be on screen, unscaled (the screenshot
    has exactly as many kept, skipped and grid-line pixels as the PNGs), and the strip's and bars' colours must
    show. Control: the same page without the pictures has none of these colours, so a page that lost its
    pictures fails."""
    page = run.after.html()
    start, end = page.index("<h2>Pictures</h2>"), page.index("<h2>Summary</h2>")
    shots = {}
    for name, text in (("with", page), ("without", page[:start] + page[end:])):
        path = tmp_path / f"{name}.html"
        path.write_text(text)
        shot = tmp_path / f"{name}.png"
        result = chromium(path, tmp_path, f"--screenshot={shot}", "--window-size=1400,1800", "--hide-scrollbars",
                          "--force-device-scale-factor=1", "--force-color-profile=srgb")
        assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
        shots[name] = colour_counts(shot)
    expected: dict[tuple, int] = {}
    for attributes in Tags(page).having("img", "keep-mask"):
        for count, colour in png(attributes).getcolors():
            expected[colour] = expected.get(colour, 0) + count
    for colour in (KEPT_RGB, SKIPPED_RGB, GRID_RGB):
        assert shots["with"].get(colour, 0) == expected[colour] > 0, colour
    for colour in [rgb(c) for c in SATS_COLOURS.values()] + [rgb(c) for c in FLOP_COLOURS.values()]:
        assert shots["with"].get(colour, 0) > 100, colour
    for colour in (KEPT_RGB, SKIPPED_RGB, GRID_RGB, *(rgb(c) for c in (*SATS_COLOURS.values(), *FLOP_COLOURS.values()))):
        assert colour not in shots["without"], colour
