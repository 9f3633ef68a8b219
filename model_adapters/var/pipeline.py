"""Class label to pixels for VAR: the transformer and the VQVAE decoder, for `graphsurgeon generate`.
Without files, seeded random weights (said in ``notes``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from graphsurgeon.errors import CheckpointError, ConfigError
from graphsurgeon.images import ImagePipeline, ImageSources, SamplingSettings

from .builder import build_var
from .checkpoint import check_var_fits, check_vqvae_fits, load_var, load_var_vqvae
from .config import resolve_var_config
from .sampler import decode
from .vqvae import build_var_vqvae

SAMPLING_DEFAULTS = dict(cfg=4.0, top_k=900, top_p=0.95)
"""The official demo's settings (demo_sample.ipynb)."""


def check_sources(sources: ImageSources, conditions: list[str]) -> None:
    """Files exist and fit the config (their format, keys and shapes, from the headers only), no text encoder (VAR
    is class-conditional), every condition a class label of the config."""
    if sources.checkpoint is not None and sources.config is None:
        raise ConfigError("--checkpoint needs --config naming its layout (var-d16, ..., var-d30)")
    config = resolve_var_config(sources.config or "var-tiny")
    for option, path in (("--checkpoint", sources.checkpoint), ("--vae", sources.vae)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{option} {path}: no such file")
    checks = (("--checkpoint", sources.checkpoint, lambda path: check_var_fits(path, config)),
              ("--vae", sources.vae, lambda path: check_vqvae_fits(path, V=config.vocab_size, Cvae=config.Cvae,
                                                                   patch_nums=config.patch_nums)))
    for option, path, check in checks:
        if path is not None:
            try:
                check(path)
            except (ConfigError, CheckpointError) as err:
                raise ConfigError(f"{option}: {err}") from None
    if sources.text_encoder is not None:
        raise ConfigError("--text-encoder does not apply: VAR is class-conditional (give class labels as --prompt)")
    bad = [c for c in conditions if not (c.strip().isdigit() and int(c) < config.num_classes)]
    if bad:
        raise ConfigError(f"VAR conditions are class labels in [0, {config.num_classes}); got {bad}")


class VARPipeline(ImagePipeline):
    def __init__(self, model: torch.nn.Module, vae: torch.nn.Module, notes: list[str]):
        self.model, self.vae, self.notes = model, vae, notes

    def sampler_args(self, condition: str, seed: int, settings: SamplingSettings) -> dict[str, Any]:
        """One image of class ``condition``; VAR has one schedule per model (``h_div_w``, ``pn`` and ``tau`` do not
        apply)."""
        cfg = SAMPLING_DEFAULTS["cfg"] if settings.cfg is None else settings.cfg
        return dict(vae=self.vae, labels=[int(condition)], cfg=cfg, top_k=SAMPLING_DEFAULTS["top_k"],
                    top_p=SAMPLING_DEFAULTS["top_p"], seed=seed)

    def images(self, output: Any) -> torch.Tensor:
        """As the official demo saves them: [0, 1] images times 255, truncated to uint8, channels last."""
        return decode(self.vae, output.f_hat).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def preview_decoder(self):
        """f_hat -> pictures in [0, 1] (the adapter's preview decoder, from this pipeline's VQVAE)."""
        return lambda f_hat: decode(self.vae, f_hat)


def image_pipeline(sources: ImageSources) -> VARPipeline:
    name = sources.config or "var-tiny"
    notes: list[str] = []
    if sources.checkpoint is not None:
        model = load_var(sources.checkpoint, name, device=sources.device)
    else:
        model = build_var(name, device=sources.device, seed=sources.seed)
        notes.append(f"{name}: random weights (seed {sources.seed}): the images are noise")
    if sources.vae is not None:
        vae = load_var_vqvae(sources.vae, device=sources.device, V=model.V, Cvae=model.Cvae,
                             patch_nums=model.patch_nums)
    else:
        vae = build_var_vqvae(device=sources.device, seed=sources.seed, V=model.V, Cvae=model.Cvae, ch=32,
                              patch_nums=model.patch_nums)
        notes.append("no --vae: a seeded random VQVAE (narrow decoder) stands in")
    return VARPipeline(model, vae, notes)
