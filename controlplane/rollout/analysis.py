"""The analysis interface the engine asks at each step and during pauses.

An analysis answers one question about a rollout's candidate: `pass`, `fail` or
`inconclusive` (not enough data: the rollout holds, it never advances on no data). It never
touches routes itself; the engine turns verdicts into transitions. `Verdict` is health's
(`health/verdict.py`); `health.analysis.HealthAnalysis` is the analysis the service plugs in.
"""

from __future__ import annotations

from typing import Any, Protocol

from controlplane.health.verdict import Verdict

__all__ = ["Analysis", "NoAnalysis", "Verdict"]


class Analysis(Protocol):
    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        """Judge the candidate of `rollout` (the rollout document) over the last window."""
        ...


class NoAnalysis:
    """Used when a rollout has no `analysis` section: every step passes."""

    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        return Verdict("pass", "no analysis configured")
