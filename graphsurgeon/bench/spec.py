"""What a benchmark runs: one validated spec (pydantic), so a bad value fails before any model is built."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

DEFAULT_PASS_SETS = ("none", "lhep", "sats", "lhep+sats")


class BenchSpec(BaseModel):
    """One benchmark: a model config and schedule, the variants to compare, and how to time them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str = "infinity"
    config: str = Field("infinity-tiny", description="the adapter's named model config (random weights)")
    h_div_w: float = Field(1.0, gt=0)
    pn: str = Field("1M", description="pixel preset of the schedule")
    batch: int = Field(1, ge=1, description="prompts per generation")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    pass_sets: tuple[str, ...] = Field(DEFAULT_PASS_SETS, description="'none' or pass names joined by '+'")
    pass_config: dict[str, dict] = Field(default_factory=dict, description="settings by pass name (adaptive mode)")
    operating_point: Optional[str] = Field(None, description="a fixed operating point the adapter names (e.g. paper)")
    keep_fraction: Optional[dict[int, float]] = Field(None, description="fixed: kept fraction per LHEP scale")
    stop_scale: Optional[int] = Field(None, description="fixed: the scale where every sample's SATS stop happens")
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    seed: int = 0
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
        return value

    @property
    def mode(self) -> str:
        """'fixed' when the kept fractions / stop scale are fixed, else 'adaptive' (the passes' own rules)."""
        fixed = self.operating_point is not None or self.keep_fraction is not None or self.stop_scale is not None
        return "fixed" if fixed else "adaptive"


def passes_of(pass_set: str) -> list[str]:
    return [] if pass_set == "none" else pass_set.split("+")


def make_spec(**values) -> BenchSpec:
    """A BenchSpec, or a ConfigError naming every bad key."""
    try:
        return BenchSpec(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid benchmark settings: {problems}") from None
