"""The control plane's core: one desired state, one way to change it, one snapshot per change.

The admin API, the rollout engine and the runtimes call the transition methods here. Each
validates first (a rejected call changes nothing), persists, rebuilds the snapshot once,
publishes it to every Envoy and waits for their ACK. Runtimes report endpoints through
`set_endpoints` (the changes of one event-loop turn make one snapshot); parking and waking
(`park`, `wake`) go through the runtime the Stack set in `self.runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane import logs, metrics
from controlplane.adapters import Problem, check_adapters
from controlplane.config import Backend, Config, ModelConfig, VersionConfig
from controlplane.errors import (
    AckTimeout,
    Conflict,
    EnvoyRejected,
    Invalid,
    NotFound,
    SwitchyardError,
)
from controlplane.events import EventBus
from controlplane.health.signals import HealthSignals
from controlplane.state import (
    Endpoint,
    Model,
    State,
    TrafficPolicy,
    Version,
    apply_weights,
    check_weights,
)
from controlplane.store import Store
from controlplane.xds.resources import ProxySettings
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import Snapshot, SnapshotBuilder

if TYPE_CHECKING:
    from controlplane.reconciler.runtime import Runtime

SLEEP_LEVELS = {"sleep1": 1, "sleep2": 2}  # a model's `park` -> vLLM's /sleep?level=

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
PARKED_STATES = ("sleeping", "waking", "stopped")
PARK_GRACE_S = 1.5  # after its weight went to 0, before a version may be parked
DRAIN_TIMEOUT_S = 60.0  # the longest a park waits for the version's requests to finish


class Controller:
    def __init__(
        self, config: Config, state_dir: Path | None = None, picker: str | None = None
    ) -> None:
        """`picker`: the endpoint picker's address, which `prefix_aware` models' routes
        use (the Stack chooses it); without one those models fall back to least request."""
        self.config = config
        self.state_dir = Path(state_dir or config.state_dir)
        self.state = State.from_config(config)
        self.store = Store(self.state_dir / "switchyard.db")
        self.store.restore_models(self.state)
        self.events = EventBus()
        self.health = HealthSignals()  # fed by Envoy stats and vLLM scrapes
        self.xds = XdsServer(self.events)
        self.proxy = ProxySettings.from_config(config, picker)
        self.picker_metrics: str | None = None  # the picker's /metrics, which ours include
        self.snapshot: Snapshot | None = None
        self._builder = SnapshotBuilder(self.proxy)
        self._changes = asyncio.Lock()  # one transition at a time: no lost updates
        self.runtime: Runtime | None = None  # set by the Stack; runs the versions' backends
        self._rebuild_pending = False
        self._dirty_models: set[str] = set()  # whose endpoints changed since the last rebuild
        # Told a model's name when its endpoints, readiness or weights change: LoRA adapter
        # versions follow their base's serving replicas (reconciler/adapters.py).
        self.endpoint_watchers: list[Callable[[str], None]] = []

    def rebuild(self, models: Iterable[str] | None = None) -> Snapshot:
        """Build the snapshot of the current state and push it to every Envoy.

        `models`: only these models changed (their weights, policy, endpoints or readiness;
        not the set of models or versions), so only their resources are looked at: a weight
        change costs the same with a thousand models as with one."""
        started = time.perf_counter()
        snapshot = self._builder.build(self.state, models)
        metrics.snapshot_build.observe(time.perf_counter() - started)
        self.snapshot = snapshot
        self.xds.publish(snapshot)
        if models is None:
            metrics.observe_models(self.state.models.values())
        else:
            metrics.observe_models(
                [self.state.models[n] for n in models if n in self.state.models], prune=False
            )
        return snapshot

    def _rebuild_soon(self, model_name: str) -> None:
        """One snapshot for all the endpoint changes of one event-loop turn (a start-up with
        100 versions becoming ready at once builds a few snapshots, not 100)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.rebuild([model_name])
            return
        self._dirty_models.add(model_name)
        if not self._rebuild_pending:
            self._rebuild_pending = True
            loop.call_soon(self._rebuild_now)

    def _rebuild_now(self) -> None:
        self._rebuild_pending = False
        models, self._dirty_models = self._dirty_models, set()
        self.rebuild(models)

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
        # A parked version that gets traffic back is woken first: no request may meet it asleep.
        parked = [v for v, w in checked.items() if w and model.versions[v].state in PARKED_STATES]
        await asyncio.gather(*(self.wake(model_name, version) for version in parked))
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
                model.traffic_generation += 1
            try:
                self.store.save(models, rollouts or [])
                snapshot = self.rebuild(changes)
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
                self.rebuild(changes)
                raise
        for model in models:
            self._tell_watchers(model.name)
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

    # -- models and versions at run time ----------------------------------------------------
    #
    # A refused change leaves nothing behind (CONTRACT section 3): what the runtime cannot run
    # is refused before anything is persisted; a NACK undoes state, store and Envoys (as in
    # apply_traffic); a runtime that fails to start the backend (its API down) takes the
    # addition back unless traffic already uses it. An ACK timeout keeps the change, which
    # the Envoys apply when they catch up; its backends are started (or stopped) all the same.

    async def add_model(self, config: ModelConfig) -> Model:
        """A new model with its versions: checked, persisted, routed, its backends started."""
        async with self._changes:
            if config.name in self.state.models:
                raise Conflict(f"model {config.name!r} already exists", field="name")
            self._check_adapters(config.name, [(v.name, v.backend) for v in config.versions],
                                 config.routing, "versions[{}].backend")  # fmt: skip
            for version in config.versions:
                self._check_runnable(config.name, version.name, version.backend,
                                     f"versions[{version.name}].backend")  # fmt: skip
            model = Model.from_config(config)
            model.spec = config
            # Known from before a restart (a Kubernetes runtime registers its catalogue
            # again): its saved traffic wins over the defaults of `config`.
            saved = self.store.saved_model(model.name)
            self.store.restore_model(model)
            self.state.models[model.name] = model

            def undo() -> None:
                del self.state.models[model.name]
                self.store.put_saved_model(model.name, saved)

            late = await self._persist_and_push(model, undo)
        await self._start_or_retract(model, list(model.versions.values()), undo)
        logs.event(log, "model.added", model=model.name, versions=",".join(model.versions))
        self.events.publish("model.added", model=model.name)
        if late is not None:
            raise late
        return model

    async def add_version(self, model_name: str, config: VersionConfig) -> Version:
        """A new version of a model, at weight 0: it starts, becomes ready, takes no traffic
        until a rollout or a weight change gives it some."""
        async with self._changes:
            model = self.state.model(model_name)
            if config.name in model.versions:
                raise Conflict(
                    f"model {model_name!r} already has a version {config.name!r}", field="name"
                )
            if config.weight:
                raise Invalid(
                    "a new version joins at weight 0; use a rollout or a weight change",
                    field="weight",
                )
            pairs = [(v.name, v.backend) for v in model.versions.values()]
            self._check_adapters(model_name, [*pairs, (config.name, config.backend)],
                                 model.routing, "backend")  # fmt: skip
            self._check_runnable(model_name, config.name, config.backend, "backend")
            version = Version.from_config(config, added=True)
            was_removed = version.name in model.removed
            model.versions[version.name] = version
            model.removed.discard(version.name)

            def undo() -> None:
                del model.versions[version.name]
                if was_removed:
                    model.removed.add(version.name)
                self.store.save([model])

            late = await self._persist_and_push(model, undo)
        await self._start_or_retract(model, [version], undo)
        logs.event(log, "version.added", model=model_name, version=version.name,
                   backend=version.backend.kind)  # fmt: skip
        self.events.publish("version.added", model=model_name, version=version.name)
        if late is not None:
            raise late
        return version

    async def remove_version(self, model_name: str, version_name: str) -> None:
        """Take a version out: refused while it has weight, is a rollout's, or is the last."""
        async with self._changes:
            model = self.state.model(model_name)
            version = model.versions.get(version_name)
            if version is None:
                raise NotFound(
                    f"model {model_name!r} has no version {version_name!r}", field="version"
                )
            if version.weight:
                raise Conflict(
                    f"{model_name}@{version_name} has weight {version.weight}%: "
                    "move its traffic away first",
                    field="version",
                )
            if model.active_rollout:
                raise Conflict(
                    f"model {model_name!r} has an active rollout ({model.active_rollout})",
                    field="version",
                )
            if model.policy.mirror_to == version_name:
                raise Conflict(f"{version_name!r} receives mirrored traffic", field="version")
            versions, last_good, removed = dict(model.versions), model.last_good, set(model.removed)
            del model.versions[version_name]
            if model.last_good == version_name:
                model.last_good = None
            if not version.added:
                model.removed.add(version_name)

            def undo() -> None:
                model.versions.clear()
                model.versions.update(versions)  # in its place among the others
                model.last_good, model.removed = last_good, removed
                self.store.save([model])

            late = await self._persist_and_push(model, undo)
            self.health.forget(model_name, version_name)
        logs.event(log, "version.removed", model=model_name, version=version_name)
        self.events.publish("version.removed", model=model_name, version=version_name)
        if self.runtime is not None:
            await self.runtime.remove(model_name, version_name)
        if late is not None:
            raise late

    def _check_adapters(
        self, model: str, versions: list[tuple[str, Backend]], routing: str, field: str
    ) -> None:
        """Refuse, before anything changes, an addition that breaks the rules of LoRA adapter
        versions (controlplane/adapters.py) in the fleet it would make. `field`: where the
        backend of a version of `model` is in the request (`{}`: the version's name)."""
        models = {name: [(v.name, v.backend) for v in m.versions.values()]
                  for name, m in self.state.models.items()}  # fmt: skip
        models[model] = versions
        routes = {name: m.routing for name, m in self.state.models.items()}
        routes[model] = routing
        try:
            check_adapters(models, routes)
        except Problem as problem:
            if problem.model != model:  # the addition breaks another model's adapters
                raise Invalid(f"{problem.path()}: {problem.message}",
                              field=field.format(versions[-1][0])) from None  # fmt: skip
            if problem.version is None:
                raise Invalid(problem.message, field=problem.key) from None
            where = field.format(problem.version)
            raise Invalid(problem.message, field=f"{where}.{problem.key}") from None

    def _tell_watchers(self, model_name: str) -> None:
        for watch in self.endpoint_watchers:
            watch(model_name)

    def _check_runnable(self, model: str, version: str, backend: Backend, field: str) -> None:
        """Refuse, before anything changes, a backend the runtime cannot run (`url` on
        Kubernetes), naming the field at fault."""
        if self.runtime is None:
            return
        try:
            self.runtime.validate(model, version, backend)
        except Invalid as exc:
            raise Invalid(exc.message, field=field) from None

    async def _persist_and_push(self, model: Model, undo: Callable[[], None]) -> AckTimeout | None:
        """Persist `model`'s catalogue change, route it, wait for every Envoy (the caller holds
        the lock and has changed the state). A failure to persist or build, or a NACK: `undo`
        puts state and store back, the Envoys get the previous snapshot again, and the error
        is raised. An ACK timeout is returned: the change stays desired."""
        try:
            self.store.save([model])
            snapshot = self.rebuild()
        except Exception:
            with contextlib.suppress(SwitchyardError):
                undo()
            raise
        try:
            await self.xds.wait_applied(snapshot, ACK_TIMEOUT_S)
        except EnvoyRejected as exc:
            undo()
            self.rebuild()
            logs.event(log, "catalog.change_rejected", logging.WARNING, model=model.name,
                       error=exc.message)  # fmt: skip
            raise
        except AckTimeout as exc:
            return exc
        return None

    async def _start_or_retract(
        self, model: Model, versions: list[Version], undo: Callable[[], None]
    ) -> None:
        """Start the added versions' backends. If the runtime fails (its API down), the
        addition is taken back, unless traffic or a rollout uses it already."""
        generation = model.traffic_generation
        try:
            for version in versions:
                await self._ensure(model.name, version)
        except SwitchyardError as exc:
            async with self._changes:
                if model.traffic_generation == generation and not model.active_rollout:
                    undo()
                    self.rebuild()
                    if self.runtime is not None:
                        for version in versions:
                            await self.runtime.remove(model.name, version.name)
            logs.event(log, "catalog.start_failed", logging.WARNING, model=model.name,
                       versions=",".join(v.name for v in versions), error=exc.message)  # fmt: skip
            raise

    # -- parking -------------------------------------------------------------------------------

    async def park(self, model_name: str, version_name: str, generation: int) -> None:
        """Park a version nobody routes to, as the model's `park` says: vLLM sleep level 1
        or 2 (the process stays, the GPU is freed), stopped, or kept running. `generation`
        is the model's traffic_generation the decision was taken on: any traffic change
        since (a new rollout, a weight change) cancels it. Failures are logged, never
        raised: parking only saves resources."""
        model = self.state.models.get(model_name)
        if self.runtime is None or model is None or model.park == "keep":
            return

        def unchanged() -> bool:
            return model.traffic_generation == generation and version_name in model.versions

        await self._drained(model_name, version_name, unchanged)
        if not unchanged():
            logs.event(log, "backend.park_skipped", model=model_name, version=version_name,
                       reason="traffic changed since")  # fmt: skip
            return
        try:
            if model.park == "stop":
                await self.runtime.scale(model_name, version_name, 0)
            else:
                await self.runtime.sleep(model_name, version_name, SLEEP_LEVELS[model.park])
        except Exception as exc:  # parking runs in the background: nothing may escape it
            message = exc.message if isinstance(exc, SwitchyardError) else repr(exc)
            logs.event(log, "backend.park_failed", logging.WARNING, model=model_name,
                       version=version_name, error=message)  # fmt: skip

    async def _drained(self, model_name: str, version_name: str, unchanged) -> None:
        """Let the requests Envoy sent the version before it lost its weight arrive and
        finish (streams run for minutes): wait until none is in flight, at most
        DRAIN_TIMEOUT_S, or until `unchanged()` says the decision is stale. Figures come
        from Envoy's stats and vLLM's metrics, each a second apart, hence the grace first."""
        await asyncio.sleep(PARK_GRACE_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while loop.time() < deadline and unchanged():
            figures = self.health.window(model_name, version_name, PARK_GRACE_S)
            if not figures.in_flight and not figures.running:
                return
            await asyncio.sleep(0.2)

    async def endpoints_applied(self, timeout: float) -> None:
        """Until every Envoy runs the endpoints set so far (a version taken out of EDS gets no
        new request from then on). Raises AckTimeout or EnvoyRejected."""
        if self._rebuild_pending:
            self._rebuild_now()
        if self.snapshot is not None:
            await self.xds.wait_applied(self.snapshot, timeout)

    async def wake(self, model_name: str, version_name: str) -> float:
        """Wake a parked version; the seconds it took (0 when it was not parked)."""
        version = self.state.model(model_name).versions[version_name]
        if self.runtime is None or version.state not in PARKED_STATES:
            return 0.0
        return await self.runtime.wake(model_name, version_name)

    def record_crash(self, model_name: str, version_name: str, code: int | None) -> None:
        """A backend died unasked: counted, so that a rollout whose candidate crashes is rolled
        back even when the runtime restarts it before anyone saw an error."""
        model = self.state.models.get(model_name)
        version = model.versions.get(version_name) if model else None
        if version is not None:
            version.crashes += 1
            self.events.publish("backend.crashed", model=model_name, version=version_name,
                                code=code, crashes=version.crashes)  # fmt: skip

    def set_activator(self, model_name: str, version_name: str, url: str | None) -> None:
        """Scale to zero: while the version is parked, its EDS endpoint is the activator."""
        version = self.state.model(model_name).versions[version_name]
        version.activator = url
        if url is None and version.state in PARKED_STATES:
            version.endpoints = []
            self.rebuild([model_name])

    async def _ensure(self, model_name: str, version: Version) -> None:
        if self.runtime is not None:
            await self.runtime.ensure(model_name, version.name, version.backend)

    def set_endpoints(
        self, model_name: str, version_name: str, endpoints: list[Endpoint], state: str
    ) -> None:
        """Called by the runtime when a version's endpoints or readiness change."""
        model = self.state.models.get(model_name)
        version = model.versions.get(version_name) if model else None
        if version is None:
            return  # removed meanwhile: its runtime is stopping it
        was_ready, was_state = version.ready, version.state
        if version.activator and not endpoints and state in PARKED_STATES:
            endpoints = [Endpoint(version.activator)]  # scaled to zero: requests wake it
        elif state == "active":
            version.activator = None  # ready again: traffic goes to it directly
        version.endpoints, version.state = endpoints, state
        self._rebuild_soon(model_name)
        self._tell_watchers(model_name)
        fields = dict(model=model_name, version=version_name, state=state)
        if version.ready != was_ready:
            kind = "backend.ready" if version.ready else "backend.unready"
            logs.event(log, kind, **fields)
            self.events.publish(kind, **fields)
        if state != was_state and state == "sleeping":
            self.events.publish("backend.sleeping", **fields)
        if state == "active" and was_state in ("sleeping", "waking", "stopped"):
            self.events.publish("backend.awake", **fields)


def _fmt(weights: dict[str, int]) -> str:
    return ",".join(f"{name}:{weight}" for name, weight in weights.items())
