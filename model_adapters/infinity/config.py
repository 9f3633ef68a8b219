"""Infinity model configuration. Field names follow the official ``Infinity`` constructor arguments.

Options the official inference scripts always set the same way (shared AdaLN, cosine attention, RoPE-2D
normalized to the final grid, level embedding on the first block only, bit labels) are fixed here as
literals, so a config that asks for something else fails validation instead of silently differing.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from graphsurgeon.errors import ConfigError


class InfinityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    block_chunks: int = 8
    text_channels: int = 2048
    text_maxlen: int = 512
    norm_eps: float = 1e-6
    apply_spatial_patchify: Literal[0, 1] = 0
    codebook_dim: int = 32
    """Bits per VAE latent position (the VAE's ``codebook_dim``); with patchify the model predicts 4x this."""
    pad_to_multiplier: int = 128
    shared_aln: Literal[True] = True
    cos_attn: Literal[True] = True
    rms_norm: Literal[False] = False
    swiglu: Literal[False] = False
    head_depth: Literal[1] = 1
    nm0: Literal[False] = False
    cross_attn_layer_scale: float = -1.0
    add_lvl_embeding_only_first_block: Literal[1] = 1
    use_bit_label: Literal[1] = 1
    rope2d_each_sa_layer: Literal[1] = 1
    rope2d_normalized_by_hw: Literal[2] = 2

    @model_validator(mode="after")
    def _check_shapes(self) -> "InfinityConfig":
        for name in ("depth", "embed_dim", "num_heads", "block_chunks", "text_channels", "text_maxlen", "codebook_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"head_dim {self.embed_dim // self.num_heads} must be a multiple of 4 for RoPE-2D")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        pool_heads = self.text_channels // self.text_pool_head_dim
        if pool_heads == 0 or self.embed_dim % pool_heads:
            raise ValueError(
                f"text pooling uses {pool_heads} heads (text_channels {self.text_channels} / {self.text_pool_head_dim}); "
                f"embed_dim {self.embed_dim} must be divisible by it"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def d_vae(self) -> int:
        """Channels of one model token: the VAE codebook_dim, times 4 with 2x2 spatial patchify."""
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)

    @property
    def vocab_size(self) -> int:
        """Head outputs: two logits per bit."""
        return 2 * self.d_vae

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def text_pool_head_dim(self) -> int:
        return 64 if self.embed_dim > 4096 else 128


NAMED_CONFIGS: dict[str, dict] = {
    "infinity-2b": dict(depth=32, embed_dim=2048, num_heads=16, block_chunks=8, text_channels=2048, codebook_dim=32),
    "infinity-8b": dict(
        depth=40, embed_dim=3584, num_heads=28, block_chunks=8, text_channels=2048, codebook_dim=14,
        apply_spatial_patchify=1,
    ),
    "infinity-tiny": dict(depth=4, embed_dim=256, num_heads=2, block_chunks=2, text_channels=256, codebook_dim=32),
    # between tiny and 2B, for CPU benchmarks: 2B's head dimension (128) and codebook, a quarter of its width
    "infinity-mid": dict(depth=8, embed_dim=512, num_heads=4, block_chunks=2, text_channels=512, codebook_dim=32),
}


def resolve_config(name_or_config: Union[str, dict, InfinityConfig]) -> InfinityConfig:
    """Accept a named config, a dict of constructor arguments, or an :class:`InfinityConfig`."""
    if isinstance(name_or_config, InfinityConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in NAMED_CONFIGS:
            raise ConfigError(f"unknown Infinity config {name_or_config!r}; named configs: {sorted(NAMED_CONFIGS)}")
        return InfinityConfig(**NAMED_CONFIGS[name_or_config])
    if isinstance(name_or_config, dict):
        try:
            return InfinityConfig(**name_or_config)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"invalid InfinityConfig: {problems}") from None
    raise ConfigError(f"expected a config name, dict or InfinityConfig, got {type(name_or_config).__name__}")
