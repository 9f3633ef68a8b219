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
import torch.nn.functional as F
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
    x, y = (t.double().permute(2, 0, 1)[:, None] for t in (a, b))  # (3, 1, H, W)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords.pow(2) / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two uint8 images (H, W, 3) next to each other with a white gap (baseline left, optimized right)."""
    height = max(left.shape[0], right.shape[0])
    canvas = torch.full((height, left.shape[1] + gap + right.shape[1], 3), 255, dtype=torch.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + gap:] = right
    return canvas


def write_png(image: torch.Tensor, path: Path) -> None:
    """Save a uint8 (H, W, 3) RGB image as PNG."""
    from PIL import Image

    Image.fromarray(image.contiguous().cpu().numpy(), mode="RGB").save(path, format="PNG")
