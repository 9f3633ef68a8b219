"""Distance of an accelerated run to the unaccelerated one, for `graphsurgeon compare`.

Two views, both against the baseline sampler with the same arguments and seed:
- teacher-forced: every scale is forced to the baseline's drawn values, so each scale's guided logits are
  compared on the same history (per scale: relative L2 error, and agreement of the most likely choice);
- free-running: the method samples on its own; its final latent is compared with the baseline's (PSNR, SSIM).
An adapter exposes its outputs through :class:`OutputView` and its teacher forcing through
``ModelAdapter.forced_args``; the core never knows what the drawn values are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class OutputView:
    """What fidelity needs of a sampler's output."""

    drawn: list[torch.Tensor]
    """Per scale, the drawn values as the sampler takes them for teacher forcing."""
    latent: torch.Tensor
    """The final latent the decoder reads, (B, C, H, W)."""
    choices: Optional[list[torch.Tensor]] = None
    """Per scale, guided logits with the categorical choice last, (B, N, V) (present when logits were returned)."""


def logit_errors(reference: list[torch.Tensor], other: list[torch.Tensor]) -> list[float]:
    """Per scale, ||other - reference|| / ||reference|| over every logit."""
    return [((o.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()
            for r, o in zip(reference, other)]


def choice_agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> list[float]:
    """Per scale, the fraction of positions whose most likely choice is the same."""
    return [(r.argmax(-1) == o.argmax(-1)).double().mean().item() for r, o in zip(reference, other)]


def latent_psnr(reference: torch.Tensor, other: torch.Tensor) -> Optional[float]:
    """PSNR in dB with the reference latent's value range as the peak; None when equal."""
    mse = (other.double() - reference.double()).pow(2).mean().item()
    if mse == 0:
        return None
    peak = (reference.max() - reference.min()).double().item()
    return 10 * math.log10(peak ** 2 / mse)


def latent_ssim(reference: torch.Tensor, other: torch.Tensor) -> float:
    """SSIM over the latent's channels (Gaussian 11x11, sigma 1.5 where the map is that large, else the whole map
    as one window), the constants scaled to the reference's value range; computed in strips of rows as the image
    SSIM is (:func:`graphsurgeon.images.gaussian_ssim`), so memory stays bounded on large latents."""
    from .images import gaussian_ssim

    x, y = reference.double().flatten(0, 1), other.double().flatten(0, 1)
    peak = (reference.max() - reference.min()).double().item() or 1.0
    return gaussian_ssim(x, y, min(11, x.shape[-1], x.shape[-2]), peak)


@dataclass
class Fidelity:
    """What :func:`fidelity` measured (``figures``, JSON-ready) and, when a decoder was given, the decoded images
    of both free runs (uint8 (B, H, W, 3)), for pictures side by side."""

    figures: dict[str, Any]
    baseline_images: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None


def fidelity(adapter: Any, model: Any, fast: Any, kwargs: dict[str, Any],
             decode: Optional[Callable[[Any], torch.Tensor]] = None) -> Fidelity:
    """Teacher-forced logit error and choice agreement per scale, and free-running latent PSNR/SSIM, of ``fast``
    against ``adapter``'s baseline sampler on ``kwargs``; with ``decode`` (output -> uint8 (B, H, W, 3)) also the
    mean PSNR/SSIM of the decoded images."""
    baseline_output = adapter.generate(model, **kwargs)
    baseline = adapter.output_view(baseline_output)
    free_output = fast.generate(**kwargs)
    free = adapter.output_view(free_output)
    forced = adapter.forced_args(kwargs, baseline)
    reference = adapter.output_view(adapter.generate(model, **forced)).choices
    teacher = adapter.output_view(fast.generate(**forced)).choices
    pictures = (decode(baseline_output), decode(free_output)) if decode is not None else (None, None)
    stats = free_output.stats or {}
    figures = {"teacher_forced": {"logit_rel_l2": logit_errors(reference, teacher),
                                  "choice_agreement": choice_agreement(reference, teacher)},
               "free_running": {"latent_psnr_db": latent_psnr(baseline.latent, free.latent),
                                "latent_ssim": latent_ssim(baseline.latent, free.latent)},
               "attention_entries_vs_dense": per_scale_figure(stats, "entries_vs_dense"),
               "token_layers_vs_dense": per_scale_figure(stats, "token_layers_vs_dense"),
               "images": None if decode is None else image_distance(*pictures)}
    return Fidelity(figures, *pictures)


def image_distance(reference: torch.Tensor, images: torch.Tensor) -> dict[str, Any]:
    """Mean PSNR (dB; None when every image is equal) and SSIM over the batch of decoded images."""
    from .images import psnr, ssim

    values = [psnr(r, i) for r, i in zip(reference, images)]
    finite = [v for v in values if v != math.inf]
    return {"psnr_db": sum(finite) / len(finite) if finite else None, "identical": not finite,
            "ssim": sum(ssim(r, i) for r, i in zip(reference, images)) / len(values)}


def per_scale_figure(stats: dict[str, Any], key: str) -> Optional[list[Optional[float]]]:
    """Per scale, ``key`` from the pass whose stats report it (None where it does not act), or None when no pass
    does: "entries_vs_dense" (attention (query, key) pairs over the dense count, a sparse-attention pass),
    "token_layers_vs_dense" (block work over every token through every block, a per-token-depth pass)."""
    for entries in stats.values():
        if isinstance(entries, list) and entries and isinstance(entries[0], dict) and key in entries[0]:
            return [entry[key] for entry in entries]
    return None
