"""The rollout spec users send (`POST /v1/rollouts`), validated with pydantic.

What can be checked without the model's state is checked here (types, ranges, which fields
each strategy takes); checks against the model (unknown version, `to` equal to `from`) are
the engine's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from controlplane.health.verdict import AnalysisSpec

STRATEGIES = ("immediate", "gradual", "canary", "ab", "blue_green", "mirror")
# Fields each strategy accepts beyond the common ones; anything else is a 422.
STRATEGY_FIELDS = {
    "immediate": set(),
    "gradual": {"duration_seconds", "step_percent"},
    "canary": {"steps"},
    "ab": {"weight", "sticky"},
    "blue_green": set(),
    "mirror": {"percent"},
}
REQUIRED_FIELDS = {
    "gradual": ("duration_seconds", "step_percent"),
    "canary": ("steps",),
    "ab": ("weight", "sticky"),
    "mirror": ("percent",),
}


class Strict(BaseModel):
    # Strict: `false` or "10" is not a number of seconds; NaN and Infinity are not thresholds.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False
    )


class PauseSpec(Strict):
    seconds: float | None = Field(None, ge=0, description="absent: wait for resume or promote")


class Step(Strict):
    """One canary step: exactly one of `set_weight` and `pause`."""

    set_weight: int | None = Field(None, ge=0, le=100, description="candidate percent")
    pause: PauseSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        if (self.set_weight is None) == (self.pause is None):
            raise ValueError('a step is either {"set_weight": N} or {"pause": {...}}')
        return self


class Sticky(Strict):
    header: str | None = Field(None, min_length=1, max_length=128)
    cookie: str | None = Field(None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _one(self) -> Sticky:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("give exactly one of header and cookie")
        return self


class RolloutSpec(Strict):
    model: str = Field(min_length=1)
    to: str = Field(min_length=1, description="the candidate version")
    from_: str | None = Field(None, alias="from", description="default: the model's stable")
    strategy: Literal["immediate", "gradual", "canary", "ab", "blue_green", "mirror"] = "canary"
    steps: list[Step] | None = Field(None, min_length=1)
    duration_seconds: float | None = Field(None, gt=0)
    step_percent: int | None = Field(None, ge=1, le=100)
    weight: int | None = Field(None, ge=0, le=100)
    sticky: Sticky | None = None
    percent: int | None = Field(None, ge=0, le=100)
    analysis: AnalysisSpec | None = None

    @model_validator(mode="after")
    def _strategy_fields(self) -> RolloutSpec:
        for name in REQUIRED_FIELDS.get(self.strategy, ()):
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required for strategy {self.strategy!r}")
        allowed = STRATEGY_FIELDS[self.strategy]
        for name in ("steps", "duration_seconds", "step_percent", "weight", "sticky", "percent"):
            if getattr(self, name) is not None and name not in allowed:
                raise ValueError(f"{name}: not used by strategy {self.strategy!r}")
        return self

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)
