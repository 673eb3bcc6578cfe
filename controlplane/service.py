"""Running the control plane: `switchyard serve` (alone) and `switchyard up` (with Envoy).

Start order matters: the xDS server and a first snapshot before Envoy, so Envoy's first
connection gets configuration; backends before the "ready" line, so the first request works.
Stop order is the reverse, and every child process is stopped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from controlplane import logs, processes
from controlplane.admin.app import make_app
from controlplane.config import Config, split_hostport
from controlplane.controller import Controller
from controlplane.errors import ConfigError
from controlplane.health.alerts import HealthAlerts
from controlplane.health.analysis import HealthAnalysis
from controlplane.health.envoy_stats import EnvoyStatsReceiver
from controlplane.health.vllm_metrics import VllmScraper
from controlplane.notify import Notifier
from controlplane.picker.supervisor import PickerSupervisor, picker_argv
from controlplane.proxy import EnvoySupervisor
from controlplane.reconciler.activator import Activator
from controlplane.reconciler.adapters import with_adapters
from controlplane.reconciler.local import LocalRuntime
from controlplane.reconciler.runtime import Runtime
from controlplane.rollout.engine import RolloutEngine
from controlplane.tls import is_loopback, read_pem, server_context
from controlplane.xds.snapshot import ROUTE

log = logs.get("service")
BACKEND_READY_TIMEOUT_S = 60.0


def admin_token() -> str | None:
    return os.environ.get("SWITCHYARD_ADMIN_TOKEN") or None


def check_admin_exposure(config: Config, token: str | None) -> None:
    """Without a token the admin API may only listen on loopback."""
    host, _ = split_hostport(config.listen.admin)
    if not token and not is_loopback(host):
        raise ConfigError(
            f"listen.admin: {config.listen.admin} is not a loopback address; "
            "set SWITCHYARD_ADMIN_TOKEN to expose the admin API"
        )


def check_xds_exposure(config: Config) -> None:
    """Without mutual TLS the xDS port may only listen on loopback: it hands out every
    endpoint and takes in the stats the health analysis trusts."""
    host, _ = split_hostport(config.listen.xds)
    if config.xds.tls is None and not is_loopback(host):
        raise ConfigError(
            f"listen.xds: {config.listen.xds} is not a loopback address; "
            "configure xds.tls (mutual TLS) to expose the xDS port"
        )


@dataclass
class Stack:
    """Everything one `up`/`serve` runs, started and stopped together."""

    config: Config
    with_envoy: bool
    token: str | None = None
    state_dir: Path | None = None
    node_id: str | None = None
    controller: Controller = field(init=False)
    engine: RolloutEngine | None = field(init=False, default=None)
    kube_api: object | None = None  # runtime: kubernetes: the API client (run() makes it)
    leader: object | None = None  # runtime: kubernetes: the LeaderElector; fences the store
    runtime: Runtime | None = field(init=False, default=None)
    activator: Activator | None = field(init=False, default=None)
    alerts: HealthAlerts | None = field(init=False, default=None)
    notifier: Notifier | None = field(init=False, default=None)
    scraper: VllmScraper | None = field(init=False, default=None)
    envoy: EnvoySupervisor | None = field(init=False, default=None)
    envoy_stats: EnvoyStatsReceiver = field(init=False)
    picker: PickerSupervisor | None = field(init=False, default=None)
    _admin: web.AppRunner | None = field(init=False, default=None)
    _picker_watch: asyncio.Task | None = field(init=False, default=None)

    async def start(self) -> None:
        check_admin_exposure(self.config, self.token)
        check_xds_exposure(self.config)
        tls = self.config.xds.tls
        ssl_context = server_context(tls) if tls else None
        if tls and self.with_envoy:  # the Envoy we run reads these: fail here, not in a loop
            for key in ("envoy_cert", "envoy_key", "envoy_ca"):
                if getattr(tls, key):
                    read_pem(getattr(tls, key), f"xds.tls.{key}")
        self.state_dir = Path(self.state_dir or self.config.state_dir)
        processes.reap_orphans(self.state_dir)
        # The endpoint picker's addresses are in every snapshot (Envoy's cluster for it), so
        # they are chosen now, even if no model needs the picker yet: its gRPC port (GIE's
        # protocol) and its HTTP port; Envoy asks the one of `picker.transport`.
        picker_grpc = self.config.listen.picker or f"127.0.0.1:{processes.free_port()}"
        picker_http = f"127.0.0.1:{processes.free_port()}"
        envoy_asks = picker_http if self.config.picker.transport == "http" else picker_grpc
        self.controller = Controller(self.config, self.state_dir, picker=envoy_asks)
        metrics_address = f"127.0.0.1:{processes.free_port()}"
        self.controller.picker_metrics = f"http://{metrics_address}/metrics"
        self.picker = PickerSupervisor(
            picker_argv(self.config.picker, picker_grpc, metrics_address, http=picker_http),
            self.state_dir,
        )
        if self.leader is not None:  # not one write once the Lease may be someone else's
            self.controller.store.may_write = lambda: self.leader.is_leader
        self.envoy_stats = EnvoyStatsReceiver(self.controller.health, self.controller.state)
        if self.config.runtime == "local":
            self.runtime = LocalRuntime(self.controller)
            self.runtime.adopt_url_backends()
            self.controller.runtime = self.runtime
        elif self.config.runtime == "kubernetes":
            from controlplane.reconciler.kubernetes import KubernetesRuntime, default_namespace

            self.runtime = KubernetesRuntime(
                self.controller, namespace=default_namespace(), api_client=self.kube_api
            )  # simulator pods use $SWITCHYARD_SIM_IMAGE
            self.controller.runtime = self.runtime
        # LoRA adapter versions are loaded on their base's servers, whatever runs those.
        self.runtime = with_adapters(self.runtime, self.controller)
        host, port = split_hostport(self.config.listen.xds)
        try:
            await self.controller.xds.start(
                host, port, services=[self.envoy_stats.methods()], ssl_context=ssl_context
            )
        except OSError as exc:
            raise _busy("listen.xds", self.config.listen.xds, exc) from None
        self.controller.rebuild()
        health = self.controller.health
        self.engine = RolloutEngine(self.controller, lambda rollout: HealthAnalysis(health))
        self._admin = web.AppRunner(
            make_app(self.controller, self.engine, self.token), access_log=None
        )
        await self._admin.setup()
        host, port = split_hostport(self.config.listen.admin)
        try:
            await web.TCPSite(self._admin, host, port).start()
        except OSError as exc:
            raise _busy("listen.admin", self.config.listen.admin, exc) from None
        logs.event(log, "admin.listening", address=self.config.listen.admin)
        if self.runtime is not None:
            await self.runtime.start()
        if self.config.runtime == "kubernetes" and self.runtime is not None:
            await self.runtime.wait_synced(30)  # resumed rollouts must find their models
        if self.runtime is not None:
            # Envoy must reach the activator: on Kubernetes at the controller pod's IP.
            host = os.environ.get("SWITCHYARD_POD_IP", "127.0.0.1")
            self.activator = Activator(self.controller, host)
            await self.activator.start()
        # vLLM's metrics at the resolution of Envoy's stats: a hung engine's unanswered
        # scrape then comes as soon as its requests' silence shows (health/analysis.py).
        self.scraper = VllmScraper(self.controller.state, self.controller.health,
                                   interval=self.config.health.stats_flush_seconds,
                                   changed=lambda: self.controller.snapshot)  # fmt: skip
        await self.scraper.start()
        if self.with_envoy:
            self.envoy = EnvoySupervisor(self.config, self.state_dir, self.node_id)
            await self.envoy.start()
        await self._start_picker_if_needed()
        self._picker_watch = asyncio.create_task(self._watch_for_picker(), name="picker-watch")
        self.notifier = Notifier(self.controller.events, self.config.notifications.webhooks)
        self.notifier.start()
        await self.engine.start()
        self.alerts = HealthAlerts(self.controller)  # health.degraded, rollout or not
        self.alerts.start()

    async def _start_picker_if_needed(self) -> None:
        """The picker runs once a model routes `prefix_aware` (configured or added)."""
        models = self.controller.state.models.values()
        if self.picker is not None and any(m.routing == "prefix_aware" for m in models):
            await self.picker.start()

    async def _watch_for_picker(self) -> None:
        queue = self.controller.events.subscribe()
        try:
            while (event := await queue.get()) is not None:
                if event.type == "model.added":
                    try:
                        await self._start_picker_if_needed()
                    except OSError as exc:
                        logs.event(log, "picker.spawn_failed", logging.ERROR, error=exc)
        finally:
            self.controller.events.unsubscribe(queue)

    async def wait_ready(self) -> bool:
        backends = self.runtime is None or await self.runtime.wait_ready(BACKEND_READY_TIMEOUT_S)
        if not backends:
            logs.event(log, "backends.not_ready", timeout=BACKEND_READY_TIMEOUT_S)
        proxy = self.envoy is None or (
            await self.envoy.wait_ready() and await self._envoy_applied_config()
        )
        return backends and proxy

    async def _envoy_applied_config(self, timeout: float = 15.0) -> bool:
        """The listener port opens before routes arrive: wait until Envoy runs our snapshot."""
        snapshot = self.controller.snapshot
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            snapshot = self.controller.snapshot
            streams = list(self.controller.xds.streams.values())
            for stream in streams:
                rejected = snapshot and stream.rejected(snapshot)
                if rejected:
                    logs.event(
                        log, "envoy.rejected_config", logging.ERROR, node=stream.node_id,
                        message=rejected[1]["message"],
                    )  # fmt: skip
                    return False
            if snapshot and any(ROUTE in s.types and s.applied(snapshot) for s in streams):
                return True
            await asyncio.sleep(0.02)
        logs.event(log, "envoy.not_configured", logging.ERROR, timeout=timeout)
        return False

    async def stop(self) -> None:
        """Stop what start() got to, in reverse order (it may have failed halfway)."""
        if self.alerts is not None:
            await self.alerts.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        if self._picker_watch is not None:
            self._picker_watch.cancel()
            await asyncio.gather(self._picker_watch, return_exceptions=True)
        if self.envoy is not None:
            await self.envoy.stop()
        if self.picker is not None:
            await self.picker.stop()
        if self.activator is not None:
            await self.activator.stop()
        if self.runtime is not None:
            await self.runtime.stop()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.controller.xds.stop()
        self.controller.store.close()

    def banner(self) -> str:
        admin = f"http://{self.config.listen.admin}"
        if self.with_envoy:
            return (
                f"Switchyard is up: proxy http://{self.config.listen.proxy}/v1  admin {admin}  "
                f"console {admin}/ui/"
            )
        return (
            f"Switchyard control plane is serving: admin {admin}  xds {self.config.listen.xds}  "
            f"console {admin}/ui/"
        )


def _busy(key: str, address: str, exc: OSError) -> ConfigError:
    """A listen address we cannot bind: one line naming the key, not a traceback."""
    if exc.errno == errno.EADDRINUSE:
        reason = "address already in use"
    else:
        reason = exc.strerror or "address in use or unavailable"
    return ConfigError(f"{key}: cannot listen on {address}: {reason}")


async def run(config: Config, with_envoy: bool) -> None:
    """Run until SIGINT/SIGTERM, then stop everything.

    On Kubernetes only the holder of the Lease acts: a standby answers /healthz (alive) and
    /readyz (503) until it leads, and a leader that loses the Lease exits (Kubernetes restarts
    it as a standby) rather than act beside the new leader.
    """
    check_admin_exposure(config, admin_token())
    check_xds_exposure(config)  # before campaigning for the Lease: fail at once
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    elector, api = None, None
    if config.runtime == "kubernetes":
        elector, api = await _campaign(config, stopping)
        if stopping.is_set():
            if elector is not None:
                await elector.stop()
            return
    stack = Stack(config, with_envoy, admin_token(), kube_api=api, leader=elector)
    lost = False
    try:
        await stack.start()
        ready = await stack.wait_ready()
        print(stack.banner() + ("" if ready else "  (some backends are not ready yet)"), flush=True)
        await _first(stopping, elector.lost if elector is not None else None)
        lost = elector is not None and elector.lost.is_set() and not stopping.is_set()
        logs.event(log, "stopping")
    finally:
        if hasattr(stack, "controller"):
            await stack.stop()
        if elector is not None:
            await elector.stop(release=True)
    if lost:
        logs.event(log, "leader.lost_exiting", logging.ERROR)
        sys.exit(1)


async def _campaign(config: Config, stopping: asyncio.Event):
    """Wait for the Lease (or a stop), serving standby probes meanwhile."""
    from kubernetes.config import ConfigException

    from controlplane.reconciler.kubernetes import default_namespace, load_api_client
    from controlplane.reconciler.leader import LeaderElector, serve_standby

    try:
        api = load_api_client()  # in-cluster service account, else $KUBECONFIG / ~/.kube/config
    except ConfigException as exc:
        raise ConfigError(f"runtime: kubernetes: no cluster credentials: {exc}") from None
    elector = LeaderElector(api, default_namespace())  # identity: $SWITCHYARD_POD_NAME
    elector.start()
    standby = await serve_standby(*split_hostport(config.listen.admin))
    try:
        await _first(stopping, elector.leading)
    finally:
        await standby.cleanup()
    return elector, api


async def _first(*events: asyncio.Event | None) -> None:
    """Wait until one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events if event is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
