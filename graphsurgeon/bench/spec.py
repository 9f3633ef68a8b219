"""What a benchmark runs: one validated spec (pydantic), so a bad value fails before any model is built."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..cli_checks import MAX_BATCH, SEED_RANGE
from ..errors import ConfigError

DEFAULT_PASS_SETS = ("none", "lhep", "sats", "lhep+sats")


class BenchSpec(BaseModel):
    """One benchmark: a model config and schedule, the variants to compare, and how to time them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = "infinity"
    config: Optional[str] = Field("infinity-tiny", description="the adapter's named model config (random weights "
                                                               "without a checkpoint; its layout with one)")
    checkpoint: Optional[Path] = Field(None, description="the transformer's weights (never unpickled)")
    vae: Optional[Path] = Field(None, description="the decoder's weights")
    text_encoder: Optional[Path] = Field(None, description="a local folder of the text encoder")
    h_div_w: float = Field(1.0, gt=0, allow_inf_nan=False)
    pn: str = Field("1M", description="pixel preset of the schedule")
    batch: int = Field(1, ge=1, le=MAX_BATCH, description="prompts per generation")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    pass_sets: tuple[str, ...] = Field(DEFAULT_PASS_SETS, description="'none' or pass names joined by '+'")
    pass_config: dict[str, dict] = Field(default_factory=dict, description="settings by pass name (adaptive mode)")
    operating_point: Optional[str] = Field(None, description="a fixed operating point the adapter names (e.g. paper)")
    keep_fraction: Optional[dict[int, float]] = Field(None, description="fixed: kept fraction per LHEP scale")
    stop_scale: Optional[int] = Field(None, description="fixed: the scale where every sample's SATS stop happens")
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    seed: int = Field(0, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    flops: bool = Field(True, description="count FLOPs with torch's counter (one extra run per variant)")
    inserted_timing: bool = Field(True, description="time the inserted nodes in separate instrumented runs")

    @field_validator("pass_sets")
    @classmethod
    def _pass_sets_well_formed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one pass set is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"a pass set is listed twice in {list(value)}")
        if any(not s or "" in s.split("+") for s in value):
            raise ValueError(f"pass sets are 'none' or names joined by '+', got {list(value)}")
        repeated = [s for s in value if len(set(passes_of(s))) != len(passes_of(s))]
        if repeated:
            raise ValueError(f"pass set(s) {repeated} list a pass twice; list each pass once per set")
        return value

    @field_validator("pass_config")
    @classmethod
    def _settings_for_enabled_passes(cls, value: dict[str, dict], info: ValidationInfo) -> dict[str, dict]:
        """Settings for a pass that no pass set runs would be dropped without a word; optimize() refuses them too."""
        enabled = _enabled_passes(info)
        extra = sorted(set(value) - enabled) if enabled is not None else []
        if extra:
            raise ValueError(f"config has settings for passes that are not enabled: {extra} "
                             f"(enabled in pass_sets: {sorted(enabled)})")
        return value

    @field_validator("keep_fraction", "stop_scale")
    @classmethod
    def _fixed_pass_enabled(cls, value: object, info: ValidationInfo) -> object:
        """A fixed LHEP fraction or SATS stop with no pass set running that pass would be ignored."""
        needed = {"keep_fraction": "lhep", "stop_scale": "sats"}[info.field_name]
        enabled = _enabled_passes(info)
        if value is not None and enabled is not None and needed not in enabled:
            raise ValueError(f"fixes {needed} but no pass set enables it (pass_sets: {list(info.data['pass_sets'])})")
        return value

    @property
    def sources_given(self) -> bool:
        """Whether the user named files (then the model is loaded through the adapter's image pipeline)."""
        return any(p is not None for p in (self.checkpoint, self.vae, self.text_encoder))

    @property
    def mode(self) -> str:
        """'fixed' when the kept fractions / stop scale are fixed, else 'adaptive' (the passes' own rules)."""
        fixed = self.operating_point is not None or self.keep_fraction is not None or self.stop_scale is not None
        return "fixed" if fixed else "adaptive"


def passes_of(pass_set: str) -> list[str]:
    return [] if pass_set == "none" else pass_set.split("+")


def _enabled_passes(info: ValidationInfo) -> Optional[set[str]]:
    """The passes some pass set runs, or None when pass_sets itself failed validation (reported on its own)."""
    if "pass_sets" not in info.data:
        return None
    return {name for pass_set in info.data["pass_sets"] for name in passes_of(pass_set)}


def make_spec(**values) -> BenchSpec:
    """A BenchSpec, or a ConfigError naming every bad key."""
    try:
        return BenchSpec(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid benchmark settings: {problems}") from None
