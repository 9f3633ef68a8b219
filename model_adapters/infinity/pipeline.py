"""Prompt to pixels for Infinity: the text encoder, the transformer and the BSQ-VAE decoder, for
`graphsurgeon generate`. Without files, seeded random stand-ins of the right sizes (said in ``notes``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from graphsurgeon.errors import CheckpointError, ConfigError
from graphsurgeon.images import ImagePipeline, ImageSources, SamplingSettings

from .builder import build_infinity
from .checkpoint import check_checkpoint_fits, load_infinity
from .config import InfinityConfig, resolve_config
from .schedules import get_scale_schedule
from .text_encoder import (TextEncoder, check_text_encoder_folder, encode_prompts, load_text_encoder,
                           random_text_encoder)
from .vae import build_infinity_vae, check_vae_fits, decode_to_images, load_infinity_vae, vae_config_from_checkpoint

SAMPLING_DEFAULTS = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97)
"""The official inference's settings (tools/run_infinity.py)."""

RANDOM_VAE = {"infinity-tiny": "infinity-vae-tiny", "infinity-mid": "infinity-vae-tiny"}
"""The random decoder stand-in per built-in config (default: the released VAE layout of the codebook)."""


def model_config(sources: ImageSources) -> InfinityConfig:
    """The transformer's layout: ``--config`` (a name), required with a checkpoint; default infinity-tiny."""
    if sources.checkpoint is not None and sources.config is None:
        raise ConfigError("--checkpoint needs --config naming its layout (infinity-2b, infinity-8b, ...)")
    return resolve_config(sources.config or "infinity-tiny")


def check_sources(sources: ImageSources) -> None:
    """The files exist and fit, read from their headers and key shapes only: the checkpoint has the config's keys
    and shapes, the VAE's codebook_dim and patch size suit the transformer, the text folder holds a complete
    encoder."""
    config = model_config(sources)
    if sources.checkpoint is not None:
        if not Path(sources.checkpoint).exists():
            raise ConfigError(f"--checkpoint {sources.checkpoint}: no such file or folder")
        try:
            check_checkpoint_fits(sources.checkpoint, config)
        except (ConfigError, CheckpointError) as err:
            raise ConfigError(f"--checkpoint {sources.checkpoint}: {err}") from None
    if sources.vae is not None:
        if not Path(sources.vae).exists():
            raise ConfigError(f"--vae {sources.vae}: no such file")
        try:
            check_vae_fits(vae_config_from_checkpoint(sources.vae), config.codebook_dim,
                           bool(config.apply_spatial_patchify))
        except ConfigError as err:
            raise ConfigError(f"--vae {sources.vae} ({sources.config or 'infinity-tiny'}): {err}") from None
    if sources.text_encoder is not None:
        check_text_encoder_folder(sources.text_encoder)


class InfinityPipeline(ImagePipeline):
    def __init__(self, model: torch.nn.Module, text: TextEncoder, vae: torch.nn.Module, notes: list[str]):
        self.model, self.text, self.vae, self.notes = model, text, vae, notes

    def sampler_args(self, condition: str, seed: int, settings: SamplingSettings) -> dict[str, Any]:
        kv, lens, cu, max_len = encode_prompts(self.text, [condition])
        device = self.model.pos_start.device
        text = (kv.to(device), lens, cu.to(device), max_len)
        return dict(text=text, scale_schedule=get_scale_schedule(settings.h_div_w, settings.pn),
                    cfg=SAMPLING_DEFAULTS["cfg"] if settings.cfg is None else settings.cfg,
                    tau=SAMPLING_DEFAULTS["tau"] if settings.tau is None else settings.tau,
                    top_k=SAMPLING_DEFAULTS["top_k"], top_p=SAMPLING_DEFAULTS["top_p"], seed=seed)

    def images(self, output: Any) -> torch.Tensor:
        return decode_to_images(self.vae, output.summed_codes)

    def preview_decoder(self):
        """Summed codes (B, d, 1, h, w) -> the VAE's pictures in [-1, 1], as the official SkipVAR decodes them."""
        weight = self.vae.decoder.conv_in.conv.weight

        def decode(summed_codes: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                z = summed_codes.squeeze(-3).to(device=weight.device, dtype=weight.dtype)
                return self.vae.decode(z).float().to(summed_codes.device)
        return decode


def image_pipeline(sources: ImageSources) -> InfinityPipeline:
    """Load (or make) the three parts, the small ones first, so that a damaged VAE or text encoder (NaN weights,
    refused at load) costs no transformer load; random stand-ins are named in ``notes``."""
    config = model_config(sources)
    name = sources.config or "infinity-tiny"
    notes: list[str] = []
    vae = _vae(sources, config, name, notes)
    if sources.text_encoder is not None:
        text = load_text_encoder(sources.text_encoder, device=sources.device)
        if text.width != config.text_channels:
            raise ConfigError(f"--text-encoder {sources.text_encoder} gives {text.width} channels; the transformer "
                              f"takes {config.text_channels}")
    else:
        text = random_text_encoder(config.text_channels, seed=sources.seed, device=sources.device)
        notes.append(f"no --text-encoder: a seeded random text encoder of width {config.text_channels} stands in "
                     "for Flan-T5 (prompts change the features, not the meaning)")
    if sources.checkpoint is not None:
        model = load_infinity(sources.checkpoint, config, device=sources.device)
    else:
        model = build_infinity(config, device=sources.device, seed=sources.seed)
        notes.insert(0, f"{name}: random weights (seed {sources.seed}): the images are noise, only their cost and "
                        "the distance to the unaccelerated model mean something")
    return InfinityPipeline(model, text, vae, notes)


def _vae(sources: ImageSources, config: InfinityConfig, name: str, notes: list[str]) -> torch.nn.Module:
    if sources.vae is not None:
        return load_infinity_vae(sources.vae, device=sources.device)
    layout = RANDOM_VAE.get(name) or ("infinity-vae-d56" if config.apply_spatial_patchify else "infinity-vae-d32")
    notes.append(f"no --vae: a seeded random decoder ({layout}) stands in")
    return build_infinity_vae(layout, device=sources.device, seed=sources.seed)
