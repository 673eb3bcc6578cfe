"""The desired state: models, their versions, weights and endpoints. Pure data, no I/O.

Everything else derives from it: the xDS snapshot, the admin API's answers, the persisted
copy in the store. Changes go through the small functions here so that validation lives in
one place and a rejected change leaves the state untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controlplane.config import (
    AlertThresholds,
    Backend,
    Config,
    ModelConfig,
    RetryPolicy,
    VersionConfig,
)
from controlplane.errors import Invalid, NotFound

VERSION_STATES = ("starting", "active", "sleeping", "waking", "error", "stopped")


@dataclass
class Endpoint:
    """One backend address of a version; only ready endpoints are sent to Envoy."""

    url: str  # http://host:port
    ready: bool = True

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.split("://", 1)[1].rpartition(":")
        return host.strip("[]"), int(port)


@dataclass
class Version:
    name: str
    weight: int
    backend: Backend
    state: str = "starting"
    endpoints: list[Endpoint] = field(default_factory=list)
    added: bool = False  # added at run time (API or runtime), not in switchyard.yaml
    activator: str | None = None  # scaled to zero: Envoy sends its requests here meanwhile
    crashes: int = 0  # backend processes that died unasked (a rollout's candidate must not)
    replicas: int = 1  # backend servers when all run (a url backend: one per URL)

    @property
    def ready(self) -> bool:
        return self.state == "active" and any(endpoint.ready for endpoint in self.endpoints)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "ready": self.ready,
            "state": self.state,
            # The backends' URLs: not the activator a scaled-to-zero version is routed to.
            "endpoints": [ep.url for ep in self.endpoints if ep.url != self.activator],
            "replicas": self.replicas,
            "backend": self.backend.model_dump(exclude_none=True),
        }

    @classmethod
    def from_config(cls, config: VersionConfig, added: bool = False) -> Version:
        return cls(config.name, config.weight, config.backend, added=added,
                   replicas=config.replica_count)  # fmt: skip


@dataclass(frozen=True)
class TrafficPolicy:
    """Route options a rollout holds while it runs, beyond the weights.

    `sticky_header`/`sticky_cookie`: the split follows a hash of that value, so one user
    always reaches one version (A/B). `mirror_to`/`mirror_percent`: that share of the
    requests is copied to another version, whose answers are discarded.
    """

    sticky_header: str | None = None
    sticky_cookie: str | None = None
    mirror_to: str | None = None
    mirror_percent: int = 0

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TrafficPolicy:
        return cls(**(data or {}))


@dataclass
class Model:
    name: str
    versions: dict[str, Version]
    stable: str
    created: int = field(default_factory=lambda: int(time.time()))
    active_rollout: str | None = None
    last_good: str | None = None  # the stable before the last successful rollout: undo target
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    # Settings from the model's configuration (see config.ModelConfig).
    park: str = "sleep1"
    idle_timeout_s: float | None = None
    wake_timeout_s: float = 120.0
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    alerts: AlertThresholds | None = None
    routing: str = "least_request"  # how an endpoint is picked inside a version
    spec: ModelConfig | None = None  # set when the model was added at run time (persisted)
    removed: set[str] = field(default_factory=set)  # configured versions removed at run time
    # Bumped by every traffic change: work decided on older traffic (parking) is dropped.
    traffic_generation: int = 0

    @property
    def weights(self) -> dict[str, int]:
        return {name: version.weight for name, version in self.versions.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [version.to_json() for version in self.versions.values()],
            "stable": self.stable,
            "last_good": self.last_good,
            "active_rollout": self.active_rollout,
            "traffic_policy": self.policy.to_json(),
            "routing": self.routing,
        }

    @classmethod
    def from_config(cls, config: ModelConfig) -> Model:
        versions = {version.name: Version.from_config(version) for version in config.versions}
        stable = max(config.versions, key=lambda version: version.weight).name
        return cls(
            config.name, versions, stable, park=config.park,
            idle_timeout_s=config.idle_timeout_seconds, wake_timeout_s=config.wake_timeout_seconds,
            retries=config.retries, alerts=config.alerts, routing=config.routing,
        )  # fmt: skip


@dataclass
class State:
    """All models by name, in configuration order."""

    models: dict[str, Model] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> State:
        return cls({model.name: Model.from_config(model) for model in config.models})

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}", field="model") from None


def check_weights(model: Model, weights: Any) -> dict[str, int]:
    """Validate a full weight assignment for `model`; return it in version order.

    Versions left out get 0, so `{"v2": 100}` is a complete flip. Raises Invalid naming
    the offending field; never touches the model.
    """
    if not isinstance(weights, dict) or not weights:
        raise Invalid("weights must be a non-empty object of version: percent", field="weights")
    for name, weight in weights.items():
        if name not in model.versions:
            known = ", ".join(model.versions)
            raise Invalid(
                f"model {model.name!r} has no version {name!r} (versions: {known})",
                field=f"weights.{name}",
            )
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise Invalid(
                f"weight must be an integer percent, got {weight!r}", field=f"weights.{name}"
            )
        if not 0 <= weight <= 100:
            raise Invalid(f"weight must be from 0 to 100, got {weight}", field=f"weights.{name}")
    total = sum(weights.values())
    if total != 100:
        raise Invalid(f"weights must sum to 100, got {total}", field="weights")
    return {name: weights.get(name, 0) for name in model.versions}


def apply_weights(model: Model, weights: dict[str, int]) -> None:
    """Set already-checked weights.

    A version that now holds all traffic becomes `stable`, and the stable it replaces is
    remembered as the last known-good version (where an emergency rollback goes).
    """
    for name, weight in weights.items():
        model.versions[name].weight = weight
    full = next((name for name, weight in weights.items() if weight == 100), None)
    if full and full != model.stable:
        model.last_good, model.stable = model.stable, full
