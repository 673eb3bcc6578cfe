"""The control plane's core: one desired state, one way to change it, one snapshot per change.

The admin API (and later the rollout engine) call the transition methods here. Each
validates first (a rejected call changes nothing), persists, rebuilds the snapshot once,
publishes it to every Envoy and waits for their ACK.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from controlplane import logs, metrics
from controlplane.config import Config, split_hostport
from controlplane.errors import Conflict, EnvoyRejected
from controlplane.events import EventBus
from controlplane.health.signals import HealthSignals
from controlplane.state import (
    Endpoint,
    Model,
    State,
    TrafficPolicy,
    apply_weights,
    check_weights,
)
from controlplane.store import Store
from controlplane.xds.resources import ProxySettings
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import Snapshot, SnapshotBuilder

log = logs.get("controller")


@dataclass(frozen=True)
class Traffic:
    """What a model's route should do: weights per version, and the rollout's route options."""

    weights: dict[str, int]
    policy: TrafficPolicy = field(default_factory=TrafficPolicy)


@dataclass(frozen=True)
class _Saved:
    weights: dict[str, int]
    policy: TrafficPolicy
    stable: str
    last_good: str | None


ACK_TIMEOUT_S = 10.0


class Controller:
    def __init__(self, config: Config, state_dir: Path | None = None) -> None:
        self.config = config
        self.state_dir = Path(state_dir or config.state_dir)
        self.state = State.from_config(config)
        self.store = Store(self.state_dir / "switchyard.db")
        self.store.restore_models(self.state)
        self.events = EventBus()
        self.health = HealthSignals()  # fed by Envoy stats and vLLM scrapes
        self.xds = XdsServer(self.events)
        self.proxy = ProxySettings(*split_hostport(config.listen.proxy))
        self.snapshot: Snapshot | None = None
        self._builder = SnapshotBuilder(self.proxy)
        self._changes = asyncio.Lock()  # one transition at a time: no lost updates

    def rebuild(self) -> Snapshot:
        """Build the snapshot of the current state and push it to every Envoy."""
        started = time.perf_counter()
        snapshot = self._builder.build(self.state)
        metrics.snapshot_build.observe(time.perf_counter() - started)
        self.snapshot = snapshot
        self.xds.publish(snapshot)
        for model in self.state.models.values():
            for version in model.versions.values():
                metrics.version_weight.labels(model.name, version.name).set(version.weight)
                metrics.backend_ready.labels(model.name, version.name).set(int(version.ready))
        return snapshot

    async def set_weights(self, model_name: str, weights: object) -> dict:
        """The admin API's weight change: refused while a rollout owns the model."""
        model = self.state.model(model_name)
        if model.active_rollout:
            raise Conflict(
                f"model {model_name!r} has an active rollout ({model.active_rollout}): "
                "pause, promote or abort it instead",
                field="model",
            )
        checked = check_weights(model, weights)
        await self.apply_traffic({model_name: Traffic(checked, model.policy)})
        return model.to_json()

    async def apply_traffic(
        self,
        changes: dict[str, Traffic],
        rollouts: list[dict] | None = None,
        undo_on_reject: bool = True,
    ) -> int:
        """Set weights and route policy of one or more models; return after every ACK.

        The models (and the rollout documents that caused the change) are persisted in one
        transaction before the push. An Envoy NACK undoes the whole change (state, store,
        Envoys) and raises EnvoyRejected; with `undo_on_reject=False` (emergency rollback:
        the Envoys that accept it must keep it) the change stays. Returns how many Envoys
        confirmed.
        """
        async with self._changes:
            models = [self.state.model(name) for name in changes]
            before = {m.name: _Saved(m.weights, m.policy, m.stable, m.last_good) for m in models}
            for model in models:
                apply_weights(model, changes[model.name].weights)
                model.policy = changes[model.name].policy
            try:
                self.store.save(models, rollouts or [])
                snapshot = self.rebuild()
            except Exception:
                self._restore(models, before)
                raise
            try:
                envoys = await self.xds.wait_applied(snapshot, ACK_TIMEOUT_S)
            except EnvoyRejected as exc:
                if not undo_on_reject:
                    exc.message += "; the other Envoys applied the change and keep it"
                    raise
                self._restore(models, before)
                self.store.save(models)
                self.rebuild()
                raise
        for model in models:
            metrics.weight_changes.labels(model.name).inc()
            logs.event(
                log, "weights.changed", model=model.name, weights=_fmt(model.weights),
                policy=model.policy.to_json() or "-", envoys=envoys,
            )  # fmt: skip
            self.events.publish("weights.changed", model=model.name, weights=model.weights)
        return envoys

    @staticmethod
    def _restore(models: list[Model], before: dict[str, _Saved]) -> None:
        for model in models:
            saved = before[model.name]
            for name, weight in saved.weights.items():
                model.versions[name].weight = weight
            model.policy, model.stable, model.last_good = (
                saved.policy,
                saved.stable,
                saved.last_good,
            )

    def set_endpoints(
        self, model_name: str, version_name: str, endpoints: list[Endpoint], state: str
    ) -> None:
        """Called by the runtime when a version's endpoints or readiness change."""
        version = self.state.model(model_name).versions[version_name]
        was_ready = version.ready
        version.endpoints, version.state = endpoints, state
        self.rebuild()
        if version.ready != was_ready:
            kind = "backend.ready" if version.ready else "backend.unready"
            logs.event(log, kind, model=model_name, version=version_name, state=state)
            self.events.publish(kind, model=model_name, version=version_name, state=state)


def _fmt(weights: dict[str, int]) -> str:
    return ",".join(f"{name}:{weight}" for name, weight in weights.items())
