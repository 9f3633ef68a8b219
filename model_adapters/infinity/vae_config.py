"""Configuration of Infinity's BSQ-VAE (the image tokenizer the transformer's bits are decoded with).

The official loader (``load_visual_tokenizer``) builds every released VAE from three numbers: the
``codebook_dim`` (bits per latent position), the ``patch_size`` (pixels per latent position along each axis)
and the channel multipliers ``ch_mult``; the base width (128) and the two residual blocks per level are fixed
there. The decoder upsamples at levels ``1 .. log2(patch_size)`` and the encoder downsamples at levels
``0 .. log2(patch_size) - 1``, so the patch size must be a power of two no larger than ``2 ** (len(ch_mult) - 1)``.
Every width ``base_ch * m`` must split into the official group-norm groups (32, or else 24).
"""
from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from graphsurgeon.errors import ConfigError


def group_norm_groups(channels: int) -> int:
    """Groups of the official VAE's GroupNorm for ``channels``: 32 when they divide, else 24, else none."""
    for groups in (32, 24):
        if channels % groups == 0:
            return groups
    raise ValueError(f"{channels} channels fit neither 32 nor 24 group-norm groups")


class InfinityVaeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    codebook_dim: int
    """Bits per latent position (the decoder's input channels)."""
    patch_size: int
    """Pixels per latent position along each axis (16 for the 2B VAE, 8 for the 8B one)."""
    ch_mult: tuple[int, ...]
    """Width multipliers of the resolution levels, finest first (shared by encoder and decoder)."""
    base_ch: int = 128
    num_res_blocks: int = 2
    """Residual blocks per encoder level; the decoder has one more per level."""

    @model_validator(mode="after")
    def _check(self) -> "InfinityVaeConfig":
        for name in ("codebook_dim", "patch_size", "base_ch", "num_res_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if self.patch_size & (self.patch_size - 1) or not 2 <= self.patch_size <= 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"patch_size {self.patch_size} must be a power of two between 2 and "
                             f"2**(len(ch_mult) - 1) = {2 ** (len(self.ch_mult) - 1)} (one resampling per level)")
        for m in {1, *self.ch_mult}:
            group_norm_groups(self.base_ch * m)
        return self

    @property
    def num_resamplings(self) -> int:
        """Stride-2 steps of the encoder (and nearest 2x upsamplings of the decoder): log2(patch_size)."""
        return self.patch_size.bit_length() - 1


NAMED_VAE_CONFIGS: dict[str, dict] = {
    # infinity_vae_d32reg.pth (Infinity-2B): load_visual_tokenizer's branch without spatial patchify
    "infinity-vae-d32": dict(codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4)),
    # infinity_vae_d56_f8_14_patchify.pth (Infinity-8B): 14 bits per 8x8 pixels, 2x2 positions per token
    "infinity-vae-d56": dict(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4)),
    # for tests and the built-in infinity-tiny transformer: d32's bits and strides (a 64x64 grid decodes to
    # 1024x1024), the narrowest widths the group norms allow and one block per level, so a CPU decodes fast
    "infinity-vae-tiny": dict(codebook_dim=32, patch_size=16, ch_mult=(1, 1, 1, 1, 1), base_ch=24, num_res_blocks=1),
}


def resolve_vae_config(name_or_config: Union[str, dict, InfinityVaeConfig]) -> InfinityVaeConfig:
    """Accept a named VAE config, a dict of fields, or an :class:`InfinityVaeConfig`."""
    if isinstance(name_or_config, InfinityVaeConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in NAMED_VAE_CONFIGS:
            raise ConfigError(f"unknown Infinity VAE config {name_or_config!r}; named configs: "
                              f"{sorted(NAMED_VAE_CONFIGS)}")
        return InfinityVaeConfig(**NAMED_VAE_CONFIGS[name_or_config])
    if isinstance(name_or_config, dict):
        try:
            return InfinityVaeConfig(**name_or_config)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"invalid InfinityVaeConfig: {problems}") from None
    raise ConfigError(f"expected a VAE config name, dict or InfinityVaeConfig, got {type(name_or_config).__name__}")
