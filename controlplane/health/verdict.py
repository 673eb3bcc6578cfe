"""What a health analysis answers and what it judges against.

Health owns these types: `health.analysis` makes verdicts from thresholds, and the rollout
engine consumes them (a rollout spec's `analysis` section is an `AnalysisSpec`; the engine
turns each `Verdict` into a transition). Health never imports the rollout package.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Result = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class Verdict:
    """`pass`, `fail` or `inconclusive` (not enough data), why, and the figures it used."""

    result: Result
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "reason": self.reason,
            "figures": self.figures,
            "time": self.time,
        }


class AnalysisSpec(BaseModel):
    """Thresholds the candidate must keep; a figure left out is not checked."""

    # Strict like the rollout spec it is part of: `false` or "10" is not a number of seconds;
    # NaN and Infinity are not thresholds.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False
    )

    interval_seconds: float = Field(1.0, gt=0, le=3600)
    min_requests: int = Field(20, ge=0)
    failure_limit: int = Field(1, ge=1, description="consecutive failing verdicts that roll back")
    max_error_rate: float | None = Field(None, ge=0, le=1)
    max_latency_p95_ms: float | None = Field(None, gt=0)
    max_ttft_p95_ms: float | None = Field(None, gt=0)
    max_itl_p95_ms: float | None = Field(None, gt=0)
    max_latency_ratio: float | None = Field(None, gt=0)
    max_ttft_ratio: float | None = Field(None, gt=0)
    max_error_rate_delta: float | None = Field(None, ge=0, le=1)
    unready_grace_seconds: float = Field(10.0, ge=0)
