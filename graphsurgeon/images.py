"""From a condition to pixels: what `graphsurgeon generate` asks of a model family, and image metrics.

An adapter that produces images implements :meth:`graphsurgeon.ModelAdapter.check_sources` (the user's files,
checked before anything is loaded) and :meth:`graphsurgeon.ModelAdapter.image_pipeline` (the loaded transformer,
its condition encoder and its decoder, as an :class:`ImagePipeline`). The core never sees a prompt encoder or a
decoder: it asks the pipeline for one image's sampler arguments and for the pixels of an output.
"""
from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field


class ImageSources(BaseModel):
    """Where the model and its companions come from (every path is checked before anything is loaded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: Optional[str] = Field(None, description="named model config (random weights without a checkpoint)")
    checkpoint: Optional[Path] = Field(None, description="the transformer's weights")
    vae: Optional[Path] = Field(None, description="the decoder's weights")
    text_encoder: Optional[Path] = Field(None, description="a local folder of the text encoder (prompt models)")
    device: str = "cpu"
    seed: int = Field(0, description="seed of random stand-ins (weights, encoders, decoders) when files are absent")


class SamplingSettings(BaseModel):
    """What the user may set per run; None: the family's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    h_div_w: float = Field(1.0, gt=0)
    pn: str = "1M"
    cfg: Optional[float] = None
    tau: Optional[float] = Field(None, gt=0)


class ImagePipeline(abc.ABC):
    """A loaded family: the transformer graphsurgeon optimizes, and the two ends around it."""

    model: torch.nn.Module
    notes: list[str]
    """What the user must know about this pipeline (e.g. "random text encoder: the images are noise")."""

    @abc.abstractmethod
    def sampler_args(self, condition: str, seed: int, settings: SamplingSettings) -> dict[str, Any]:
        """The sampler's keyword arguments for one image of ``condition`` (a prompt, or a class label as text)."""

    @abc.abstractmethod
    def images(self, output: Any) -> torch.Tensor:
        """The sampler's output decoded: uint8 (B, H, W, 3), RGB."""

    def preview_decoder(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The decoder as a pass that looks at pictures mid-generation needs it (SkipVAR): accumulated latent ->
        the decoder's own pictures (B, 3, H, W). Default: None."""
        return None


def image_seeds(seed: int, count: int) -> list[int]:
    """One seed per image, derived from the run's seed: image i gets ``seed + i`` (so a prompt list run in any
    sharding, or a prefix of it, gives the same image for the same position)."""
    return [seed + i for i in range(count)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images (H, W, 3); inf when equal."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two uint8 images (H, W, 3): the mean over channels of Wang et al.'s index with an 11x11 Gaussian
    window (sigma 1.5), K1 0.01, K2 0.03, dynamic range 255, valid region only (the common reference choice)."""
    x, y = (t.double().permute(2, 0, 1) for t in (a, b))  # (3, H, W)
    return gaussian_ssim(x, y, 11, 255.0)


_SSIM_STRIP_ROWS = 64
"""Rows of the SSIM map computed at once: the working set is a few (5, maps, 64 + 10, W) float64 arrays (tens of
MiB at 1024 px wide) whatever the height, where one dense pass over a 1024 px image needed ~3 GiB."""


def gaussian_ssim(x: torch.Tensor, y: torch.Tensor, size: int, peak: float) -> float:
    """Mean SSIM index of (maps, H, W) float64 ``x`` (the reference) and ``y``: a ``size`` x ``size`` Gaussian
    window (sigma 1.5) over the valid region, K1 0.01, K2 0.03 of ``peak``. The window is separable, so it is
    applied as two 1-D passes of shifted, weighted sums (no unfolded copy per window tap), one strip of rows at
    a time; the result equals the dense 2-D convolution's to rounding."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * 1.5 ** 2))
    taps = (g / g.sum()).tolist()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    rows, columns = x.shape[-2] - size + 1, x.shape[-1] - size + 1
    total = 0.0
    for start in range(0, rows, _SSIM_STRIP_ROWS):
        stop = min(rows, start + _SSIM_STRIP_ROWS) + size - 1
        xs, ys = x[..., start:stop, :], y[..., start:stop, :]
        mu_x, mu_y, xx, yy, xy = _blur(torch.stack([xs, ys, xs * xs, ys * ys, xs * ys]), taps)
        var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
        index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        total += index.sum().item()
    return total / (x.shape[0] * rows * columns)


def _blur(t: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """(..., h, w) -> (..., h - k + 1, w - k + 1): the separable filter ``taps`` along the width, then the height."""
    size = len(taps)
    width, height = t.shape[-1] - size + 1, t.shape[-2] - size + 1
    across = t[..., :, :width] * taps[0]
    for k in range(1, size):
        across += t[..., :, k:k + width] * taps[k]
    out = across[..., :height, :] * taps[0]
    for k in range(1, size):
        out += across[..., k:k + height, :] * taps[k]
    return out


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8,
                 captions: Optional[tuple[str, str]] = None) -> torch.Tensor:
    """Two uint8 images (H, W, 3) next to each other with a white gap (baseline left, optimized right); with
    ``captions``, each written above its image on a white strip (PIL's default font, sized to the images)."""
    height = max(left.shape[0], right.shape[0])
    size = max(11, min(left.shape[1], right.shape[1]) // 20)
    strip = 0 if captions is None else size * 3 // 2 + 4
    canvas = torch.full((strip + height, left.shape[1] + gap + right.shape[1], 3), 255, dtype=torch.uint8)
    canvas[strip:strip + left.shape[0], :left.shape[1]] = left
    canvas[strip:strip + right.shape[0], left.shape[1] + gap:] = right
    if captions is None:
        return canvas
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(canvas.numpy(), mode="RGB")
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=size)
    for x, text in zip((0, left.shape[1] + gap), captions):
        draw.text((x + 4, 2), text, fill=(0, 0, 0), font=font)
    return torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).reshape(canvas.shape)


def write_png(image: torch.Tensor, path: Path) -> None:
    """Save a uint8 (H, W, 3) RGB image as PNG."""
    from PIL import Image

    Image.fromarray(image.contiguous().cpu().numpy(), mode="RGB").save(path, format="PNG")
