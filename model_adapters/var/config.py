"""VAR model configuration. Field names follow the official ``VAR`` constructor arguments.

Only what changes the inference model is a field. The official constructor's dropout and drop-path rates,
``flash_if_available`` and ``fused_if_available`` are not: dropout is off at inference and this package always
runs plain torch (``scaled_dot_product_attention``), so a config carrying them is rejected rather than silently
ignored. ``cond_drop_rate`` is accepted for parity with the official arguments but only matters to training
(the class embedding has ``num_classes + 1`` rows either way; the last row is the unconditional class).
"""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from graphsurgeon.errors import ConfigError

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
"""The 256 px schedule (680 tokens): VQVAE latent 16x16."""
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
"""The 512 px schedule (2240 tokens): VQVAE latent 32x32."""


class VARConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int
    embed_dim: int
    """Width C (= condition width D). The released models use ``64 * depth``, the default when omitted."""
    num_heads: int
    """The released models use ``depth``, the default when omitted."""
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    norm_eps: float = 1e-6
    shared_aln: bool = False
    """One AdaLN projection shared by all blocks (``ada_gss`` per block); only the released d36 uses it."""
    attn_l2_norm: bool = True
    """Cosine attention (q, k L2-normalised, learned per-head scale); False is scaled dot product x 0.25."""
    cond_drop_rate: float = 0.1
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    Cvae: int = 32
    vocab_size: int = 4096

    @model_validator(mode="before")
    @classmethod
    def _released_defaults(cls, data: Any) -> Any:
        """Width and heads follow the depth as in the official ``build_vae_var`` unless given."""
        if isinstance(data, dict) and isinstance(data.get("depth"), int):
            data = dict(data)
            data.setdefault("embed_dim", 64 * data["depth"])
            data.setdefault("num_heads", data["depth"])
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> "VARConfig":
        for name in ("depth", "embed_dim", "num_heads", "num_classes", "Cvae", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.mlp_ratio <= 0 or round(self.embed_dim * self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        # at least two scales: the CFG ramp and the choice of Phi divide by (number of scales - 1)
        if len(self.patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least two scales, got {self.patch_nums}")
        if self.patch_nums[0] <= 0 or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums must be positive and strictly increasing, got {self.patch_nums}")
        return self

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_tokens(self) -> int:
        """L: tokens of all scales together."""
        return sum(pn * pn for pn in self.patch_nums)


NAMED_CONFIGS: dict[str, dict] = {
    "var-d16": dict(depth=16),
    "var-d20": dict(depth=20),
    "var-d24": dict(depth=24),
    "var-d30": dict(depth=30),
    # the released 512 px model: shared AdaLN (the README's "d36-s") and the 512 px schedule
    "var-d36": dict(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
    # for tests and CPU runs: the released schedule, codebook and head, a tiny transformer and label set
    "var-tiny": dict(depth=2, embed_dim=128, num_heads=2, num_classes=10),
}


def resolve_var_config(name_or_config: Union[str, dict, VARConfig]) -> VARConfig:
    """Accept a named config, a dict of constructor arguments, or a :class:`VARConfig`."""
    if isinstance(name_or_config, VARConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in NAMED_CONFIGS:
            raise ConfigError(f"unknown VAR config {name_or_config!r}; named configs: {sorted(NAMED_CONFIGS)}")
        return VARConfig(**NAMED_CONFIGS[name_or_config])
    if isinstance(name_or_config, dict):
        try:
            return VARConfig(**name_or_config)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"invalid VARConfig: {problems}") from None
    raise ConfigError(f"expected a config name, dict or VARConfig, got {type(name_or_config).__name__}")
