"""The control plane's core: one desired state, one way to change it, one snapshot per change.

The admin API (and later the rollout engine) call the transition methods here. Each
validates first (a rejected call changes nothing), persists, rebuilds the snapshot once,
publishes it to every Envoy and waits for their ACK.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from controlplane import logs, metrics
from controlplane.config import Config, split_hostport
from controlplane.errors import Conflict, EnvoyRejected
from controlplane.events import EventBus
from controlplane.state import Endpoint, State, apply_weights, check_weights
from controlplane.store import Store
from controlplane.xds.resources import ProxySettings
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import Snapshot, build_snapshot

log = logs.get("controller")
ACK_TIMEOUT_S = 10.0


class Controller:
    def __init__(self, config: Config, state_dir: Path | None = None) -> None:
        self.config = config
        self.state_dir = Path(state_dir or config.state_dir)
        self.state = State.from_config(config)
        self.store = Store(self.state_dir / "switchyard.db")
        self.store.restore_weights(self.state)
        self.events = EventBus()
        self.xds = XdsServer(self.events)
        self.proxy = ProxySettings(*split_hostport(config.listen.proxy))
        self.snapshot: Snapshot | None = None
        self._changes = asyncio.Lock()  # one transition at a time: no lost updates

    def rebuild(self) -> Snapshot:
        """Build the snapshot of the current state and push it to every Envoy."""
        started = time.perf_counter()
        snapshot = build_snapshot(self.state, self.proxy)
        metrics.snapshot_build.observe(time.perf_counter() - started)
        self.snapshot = snapshot
        self.xds.publish(snapshot)
        for model in self.state.models.values():
            for version in model.versions.values():
                metrics.version_weight.labels(model.name, version.name).set(version.weight)
                metrics.version_ready.labels(model.name, version.name).set(int(version.ready))
        return snapshot

    async def set_weights(self, model_name: str, weights: object) -> dict:
        """Change a model's split; return once every connected Envoy runs it.

        An Envoy NACK undoes the change (state, store and Envoys back to the previous split).
        """
        model = self.state.model(model_name)
        if model.active_rollout:
            raise Conflict(
                f"model {model_name!r} has an active rollout ({model.active_rollout}): "
                "pause, promote or abort it instead",
                field="model",
            )
        checked = check_weights(model, weights)
        async with self._changes:
            previous, previous_stable = model.weights, model.stable
            apply_weights(model, checked)
            try:
                self.store.save_weights(model.name, checked, model.stable)
                snapshot = self.rebuild()
            except Exception:
                apply_weights(model, previous)
                model.stable = previous_stable
                raise
            try:
                envoys = await self.xds.wait_applied(snapshot, ACK_TIMEOUT_S)
            except EnvoyRejected:
                apply_weights(model, previous)
                model.stable = previous_stable
                self.store.save_weights(model.name, previous, previous_stable)
                self.rebuild()
                raise
        metrics.weight_changes.labels(model.name).inc()
        logs.event(log, "weights.changed", model=model.name, weights=_fmt(checked), envoys=envoys)
        self.events.publish("weights.changed", model=model.name, weights=checked)
        return model.to_json()

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
