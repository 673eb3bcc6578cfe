"""Strategies as step plans: plain data the engine walks, one step at a time.

A plan is a list of `SetWeight` (the candidate's percent; the rest goes to `from`) and
`Pause` (seconds, or None for a manual gate that waits for resume or promote), plus the route
policy held while the rollout runs. When the engine walks past the last step, the candidate
gets 100 % and the rollout succeeds. Adding a strategy is one function in PLANNERS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.rollout.spec import RolloutSpec
from controlplane.state import TrafficPolicy


@dataclass(frozen=True)
class SetWeight:
    weight: int


@dataclass(frozen=True)
class Pause:
    seconds: float | None  # None: until resume or promote


PlanStep = SetWeight | Pause


@dataclass(frozen=True)
class Plan:
    steps: list[PlanStep]
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)


def immediate(spec: RolloutSpec) -> Plan:
    return Plan([SetWeight(100)])


def gradual(spec: RolloutSpec) -> Plan:
    """Even steps of `step_percent` up to 100 %, spread over `duration_seconds`."""
    assert spec.step_percent is not None and spec.duration_seconds is not None
    count = math.ceil(100 / spec.step_percent)
    weights = [min(100, spec.step_percent * i) for i in range(1, count + 1)]
    steps: list[PlanStep] = []
    for weight in weights:
        if steps:
            steps.append(Pause(spec.duration_seconds / max(1, count - 1)))
        steps.append(SetWeight(weight))
    return Plan(steps)


def canary(spec: RolloutSpec) -> Plan:
    assert spec.steps is not None
    return Plan(
        [
            SetWeight(step.set_weight) if step.set_weight is not None else Pause(step.pause.seconds)
            for step in spec.steps
        ]
    )


def ab(spec: RolloutSpec) -> Plan:
    """A fixed split, sticky per user, held until promote or abort."""
    assert spec.weight is not None and spec.sticky is not None
    policy = TrafficPolicy(sticky_header=spec.sticky.header, sticky_cookie=spec.sticky.cookie)
    return Plan([SetWeight(spec.weight), Pause(None)], policy)


def blue_green(spec: RolloutSpec) -> Plan:
    """The candidate takes no traffic, but the preview header reaches it; promote flips."""
    return Plan([SetWeight(0), Pause(None)])


def mirror(spec: RolloutSpec) -> Plan:
    """A copy of `percent` of the stable traffic goes to the candidate; promote flips."""
    assert spec.percent is not None
    return Plan(
        [SetWeight(0), Pause(None)], TrafficPolicy(mirror_to=spec.to, mirror_percent=spec.percent)
    )


PLANNERS: dict[str, Callable[[RolloutSpec], Plan]] = {
    "immediate": immediate,
    "gradual": gradual,
    "canary": canary,
    "ab": ab,
    "blue_green": blue_green,
    "mirror": mirror,
}


def plan_for(spec: RolloutSpec) -> Plan:
    return PLANNERS[spec.strategy](spec)
