"""The analysis interface the engine asks at each step and during pauses.

An analysis answers one question about a rollout's candidate: `pass`, `fail` or
`inconclusive` (not enough data: the rollout holds, it never advances on no data). It never
touches routes itself; the engine turns verdicts into transitions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Result = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class Verdict:
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


class Analysis(Protocol):
    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        """Judge the candidate of `rollout` (the rollout document) over the last window."""
        ...


class NoAnalysis:
    """Used when a rollout has no `analysis` section: every step passes."""

    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        return Verdict("pass", "no analysis configured")


class ScriptedAnalysis:
    """Verdicts from a list, in order; the last one repeats. For tests and demos."""

    def __init__(self, verdicts: Iterable[Verdict]) -> None:
        self._verdicts = list(verdicts)
        self.calls = 0

    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        verdict = self._verdicts[min(self.calls, len(self._verdicts) - 1)]
        self.calls += 1
        return verdict
