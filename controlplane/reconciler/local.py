"""The local runtime: model versions as processes on this machine (see runtime.Runtime).

`sim` and `vllm` backends are child processes on free ports (output in state_dir/logs/),
restarted with exponential backoff when they die and marked `error` after repeated failures;
`url` backends are probed, never owned. An endpoint reaches Envoy only once its `/health`
answers 200 (and it is not asleep), and leaves at once when it stops being ready.

Each version has one supervising task that moves its backend towards a `desired` state:
`active` (running, awake), `sleeping` (running, vLLM sleep mode: the GPU is free, waking
takes seconds instead of a cold start) or `stopped` (no process at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from controlplane import logs, metrics, processes
from controlplane.config import Backend
from controlplane.controller import Controller
from controlplane.errors import Conflict, SwitchyardError, Unavailable
from controlplane.state import Endpoint

log = logs.get("local")
STARTUP_TIMEOUT_S = {"sim": 30.0, "vllm": 900.0}  # vLLM loads weights for minutes
MAX_BACKOFF_S = 30.0
ERROR_AFTER_FAILURES = 3  # consecutive failed starts before the version is `error`
PROBE_INTERVAL_S = 1.0  # url backends; and how often an active engine is checked awake
POLL_S = 0.05
# /sleep lets the requests already inside the engine finish (vLLM's default aborts them).
SLEEP_MODE = "wait"


@dataclass
class LocalBackend:
    """One version's backend as this runtime sees it."""

    model: str
    version: str
    backend: Backend
    desired: str = "active"  # active | sleeping | stopped
    sleep_level: int = 1
    url: str | None = None  # while a process (or the url backend) exists
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0
    # One sleep, wake or stop at a time: a wake_up must not overtake a sleep still in flight.
    transition: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return f"{self.backend.kind}-{self.model}@{self.version}".replace("/", "_")


class LocalRuntime:
    def __init__(self, controller: Controller, host: str = "127.0.0.1") -> None:
        self.controller = controller
        self.host = host
        self.backends: dict[tuple[str, str], LocalBackend] = {}
        self._session: aiohttp.ClientSession | None = None
        # `url` backends by address, and the one probe task of each address
        self._url_members: dict[str, dict[tuple[str, str], LocalBackend]] = {}
        self._url_probes: dict[str, asyncio.Task] = {}

    def adopt_url_backends(self) -> None:
        """`url` backends are used as given: in the very first snapshot, so an Envoy that
        reconnects to a restarted control plane never sees them without endpoints. The
        probe takes them out if they do not answer."""
        for model in self.controller.state.models.values():
            for version in model.versions.values():
                if version.backend.url is not None:
                    version.endpoints, version.state = [Endpoint(version.backend.url)], "active"

    # -- the Runtime interface --------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for model in self.controller.state.models.values():
            for version in model.versions.values():
                await self.ensure(model.name, version.name, version.backend)

    def validate(self, model: str, version: str, backend: Backend) -> None:
        """Every backend kind runs here (one that fails to start ends in `error`)."""

    async def ensure(self, model: str, version: str, backend: Backend) -> None:
        key = (model, version)
        if key in self.backends:
            return
        record = self.backends[key] = LocalBackend(model, version, backend)
        supervise = self._probe if backend.url is not None else self._supervise
        record.task = asyncio.create_task(supervise(record), name=f"backend-{model}@{version}")

    async def remove(self, model: str, version: str) -> None:
        record = self.backends.pop((model, version), None)
        if record is None:
            return
        if record.task is not None:
            record.task.cancel()
            await asyncio.gather(record.task, return_exceptions=True)
        await self._stop_process(record)
        logs.event(log, "backend.removed", model=model, version=version)

    async def sleep(self, model: str, version: str, level: int) -> None:
        record = self._record(model, version)
        async with record.transition:
            await self._sleep(record, model, version, level)

    async def _sleep(self, record: LocalBackend, model: str, version: str, level: int) -> None:
        if record.desired == "sleeping" or record.url is None or record.backend.url is not None:
            return  # asleep already, no process, or a url backend: not ours to put to sleep
        started = time.perf_counter()
        timeout = self.controller.state.model(model).wake_timeout_s
        # Out of EDS first, as every Envoy confirms: a request that reached an engine going to
        # sleep would wait there until it wakes.
        self.controller.set_endpoints(model, version, [], "sleeping")
        record.desired, record.sleep_level = "sleeping", level
        try:
            await self.controller.endpoints_applied(timeout)
            await self._post(record.url, f"/sleep?level={level}&mode={SLEEP_MODE}", timeout)
        except SwitchyardError:
            record.desired = "active"  # cannot sleep: keep serving rather than lose it
            await self._back_in_service(record)
            raise
        metrics.backend_sleeps.labels(model, version).inc()
        metrics.backend_sleep_seconds.labels(model).observe(time.perf_counter() - started)
        logs.event(log, "backend.sleeping", model=model, version=version, level=level)

    async def wake(self, model: str, version: str) -> float:
        record = self._record(model, version)
        async with record.transition:
            return await self._wake(record, model, version)

    async def _wake(self, record: LocalBackend, model: str, version: str) -> float:
        if record.desired == "active" and self.controller.state.model(model).versions[
            version
        ].ready:
            return 0.0
        started = time.perf_counter()
        was = record.desired
        record.desired = "active"
        if was == "sleeping" and record.url is not None:
            self.controller.set_endpoints(model, version, [], "waking")
            timeout = self.controller.state.model(model).wake_timeout_s
            await self._wake_engine(record.url, record.sleep_level, timeout)
            if not await self._wait_awake(record, timeout):
                raise Unavailable(f"{model}@{version} did not say it is awake in {timeout:g}s")
            self.controller.set_endpoints(model, version, [Endpoint(record.url)], "active")
        else:
            record.changed.set()  # stopped: the supervisor starts a process
        await self._wait_ready(model, version)
        seconds = time.perf_counter() - started
        metrics.backend_wakes.labels(model, version).inc()
        metrics.backend_wake_seconds.labels(model).observe(seconds)
        logs.event(log, "backend.awake", model=model, version=version, seconds=f"{seconds:.3f}")
        return seconds

    async def scale(self, model: str, version: str, replicas: int) -> None:
        """Locally a version has one process or none."""
        record = self._record(model, version)
        if replicas > 0:
            await self.wake(model, version)
            return
        async with record.transition:
            await self._stop(record, model, version)

    async def _stop(self, record: LocalBackend, model: str, version: str) -> None:
        if record.desired == "stopped" or record.backend.url is not None:
            return
        self.controller.set_endpoints(model, version, [], "stopped")
        record.desired = "stopped"
        await self._stop_process(record)
        record.changed.set()
        metrics.backend_sleeps.labels(model, version).inc()
        logs.event(log, "backend.stopped", model=model, version=version)

    async def stop(self) -> None:
        records = list(self.backends.values())
        for record in records:
            if record.task is not None:
                record.task.cancel()
        await asyncio.gather(*(r.task for r in records if r.task), return_exceptions=True)
        await asyncio.gather(*(self._stop_process(record) for record in records))
        if self._session is not None:
            await self._session.close()

    async def wait_ready(self, timeout: float) -> bool:
        """True once every version is active (or timeout)."""
        models = self.controller.state.models
        return await poll_until(
            lambda: all(v.ready for m in models.values() for v in m.versions.values()), timeout
        )

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self, record: LocalBackend) -> None:
        """Keep a process running while desired; restart it with backoff when it dies."""
        backoff = 0.5
        model, version, kind = record.model, record.version, record.backend.kind
        while True:
            if record.desired == "stopped":
                record.changed.clear()
                await record.changed.wait()
                continue
            port = processes.free_port(self.host)
            url = f"http://{self.host}:{port}"
            self.controller.set_endpoints(model, version, [], "starting")
            try:
                record.process = await processes.spawn(
                    record.name, self._argv(record, port), self.controller.state_dir,
                    env=self._env(record),
                )  # fmt: skip
            except OSError as exc:
                logs.event(log, "backend.spawn_failed", logging.ERROR, model=model,
                           version=version, error=exc)  # fmt: skip
                record.process = None
            if record.process is not None:
                record.url = url
                if await self._wait_healthy(url, record.process, STARTUP_TIMEOUT_S[kind]):
                    record.failures, backoff = 0, 0.5
                    await self._settle(record)
                code = await self._run(record, record.process)
                record.process, record.url = None, None
                if record.desired == "stopped":
                    continue  # stopped on purpose
                logs.event(log, "backend.exited", logging.WARNING, model=model,
                           version=version, code=code)  # fmt: skip
                metrics.backend_restarts.labels(model, version).inc()
                self.controller.record_crash(model, version, code)
            record.failures += 1
            state = "error" if record.failures >= ERROR_AFTER_FAILURES else "starting"
            self.controller.set_endpoints(model, version, [], state)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _settle(self, record: LocalBackend) -> None:
        """A healthy process: serve, or go back to sleep if it was parked when it died."""
        assert record.url is not None
        if record.desired == "sleeping":
            timeout = self.controller.state.model(record.model).wake_timeout_s
            with contextlib.suppress(Unavailable):
                await self._post(record.url, f"/sleep?level={record.sleep_level}", timeout)
                self.controller.set_endpoints(record.model, record.version, [], "sleeping")
                return
        self.controller.set_endpoints(record.model, record.version, [Endpoint(record.url)],
                                      "active")  # fmt: skip

    async def _run(self, record: LocalBackend, process) -> int:
        """Until the process exits (its code); meanwhile an engine that can sleep is checked
        awake every second while we route to it."""
        watch = None
        if self._sleeps(record):
            watch = asyncio.create_task(self._keep_awake(record), name=f"awake-{record.name}")
        try:
            return await process.wait()
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            _kill_group(process.pid)

    async def _keep_awake(self, record: LocalBackend) -> None:
        """An engine found asleep while it should serve (a /sleep that completed after we gave
        up on it, an operator's call) holds every request it gets until it wakes: wake it.
        It stays in EDS meanwhile: its requests are held and answered once it is awake, where
        taking it out would fail them (it may be the model's only version)."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            url = record.url
            if record.desired != "active" or url is None or record.transition.locked():
                continue
            if await self._is_sleeping(url) is not True:
                continue
            async with record.transition:
                if record.desired == "active" and record.url == url:
                    logs.event(log, "backend.found_asleep", logging.WARNING, model=record.model,
                               version=record.version)  # fmt: skip
                    await self._back_in_service(record, routed=True)

    async def _back_in_service(self, record: LocalBackend, routed: bool = False) -> None:
        """Route to the engine again, but only once it says it is awake: wake it first when it
        sleeps (a /sleep we gave up on may have gone through after all). `routed`: it is in
        EDS now, and stays there while it wakes. Never raises."""
        model, version, url = record.model, record.version, record.url
        if url is None:
            return
        timeout = self.controller.state.model(model).wake_timeout_s
        sleeping = await self._is_sleeping(url)
        if sleeping is None and await self._healthy(url):  # no sleep endpoints: never sleeps
            self.controller.set_endpoints(model, version, [Endpoint(url)], "active")
            return
        if sleeping is not False:
            if not routed:
                self.controller.set_endpoints(model, version, [], "waking")
            try:
                await self._wake_engine(url, record.sleep_level or 2, timeout)
            except Unavailable as exc:
                logs.event(log, "backend.wake_failed", logging.WARNING, model=model,
                           version=version, error=exc.message)  # fmt: skip
        if await self._wait_awake(record, timeout):
            self.controller.set_endpoints(model, version, [Endpoint(url)], "active")
            logs.event(log, "backend.back_in_service", model=model, version=version)
        else:
            self.controller.set_endpoints(model, version, [], "error")
            logs.event(log, "backend.not_awake", logging.ERROR, model=model, version=version)

    async def _wake_engine(self, url: str, level: int, timeout: float) -> None:
        """vLLM's wake-up. After level 2 the weights were discarded: a plain /wake_up would
        serve garbage, so wake the weights, reload them from disk, then the KV cache."""
        if level >= 2:
            await self._post(url, "/wake_up?tags=weights", timeout)
            await self._post(url, "/collective_rpc", timeout, {"method": "reload_weights"})
            await self._post(url, "/wake_up?tags=kv_cache", timeout)
        else:
            await self._post(url, "/wake_up", timeout)

    async def _probe(self, record: LocalBackend) -> None:
        """A `url` backend is not ours: watch its /health and route to it only while it is
        healthy and awake. The versions on one address share one probe (`_probe_address`):
        a thousand LoRA models on one server cost two GETs a second, not two thousand."""
        url = record.backend.url
        assert url is not None
        record.url = url
        key = (record.model, record.version)
        members = self._url_members.setdefault(url, {})
        members[key] = record
        if url not in self._url_probes:
            self._url_probes[url] = asyncio.create_task(
                self._probe_address(url), name=f"probe-{url}"
            )
        try:
            await asyncio.Event().wait()  # until the version is removed (cancelled)
        finally:
            if members.get(key) is record:
                del members[key]
            if not members and self._url_members.get(url) is members:
                del self._url_members[url]
                probe = self._url_probes.pop(url)
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)

    async def _probe_address(self, url: str) -> None:
        """Probe one address every PROBE_INTERVAL_S (+-10 %, so that addresses do not all
        probe at the same moment) and apply the answer to every version on it."""
        while True:
            healthy = await self._healthy(url) and not await self._is_sleeping(url)  # None: no
            # sleep endpoints, so awake
            for record in list(self._url_members.get(url, {}).values()):
                self._apply_probe(record, url, healthy)
            await asyncio.sleep(PROBE_INTERVAL_S * random.uniform(0.9, 1.1))

    def _apply_probe(self, record: LocalBackend, url: str, healthy: bool) -> None:
        model = self.controller.state.models.get(record.model)
        version = model.versions.get(record.version) if model else None
        if version is None:
            return  # removed: its task is being cancelled
        if record.desired == "active" and healthy != version.ready:
            endpoints = [Endpoint(url)] if healthy else []
            self.controller.set_endpoints(record.model, record.version, endpoints,
                                          "active" if healthy else "error")  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------

    def _record(self, model: str, version: str) -> LocalBackend:
        try:
            return self.backends[(model, version)]
        except KeyError:
            message = f"{model}@{version} is not run by this runtime"
            raise Conflict(message, field="version") from None

    async def _wait_ready(self, model: str, version: str) -> None:
        timeout = self.controller.state.model(model).wake_timeout_s
        ready = lambda: self.controller.state.model(model).versions[version].ready  # noqa: E731
        if not await poll_until(ready, timeout):
            raise Unavailable(f"{model}@{version} did not become ready in {timeout:g}s")

    async def _wait_awake(self, record: LocalBackend, timeout: float) -> bool:
        """Until the engine itself says it is not sleeping (and /health is 200)."""

        async def awake() -> bool:
            url = record.url
            return (url is not None and await self._is_sleeping(url) is False
                    and await self._healthy(url))  # fmt: skip

        return await poll_until(awake, timeout, give_up=lambda: record.url is None)

    async def _post(self, url: str, path: str, timeout: float, json: dict | None = None) -> None:
        """POST to a backend's sleep-mode endpoints; they answer when done (seconds to
        minutes for a large model: `timeout` is the model's wake_timeout_seconds)."""
        assert self._session is not None
        try:
            async with self._session.post(f"{url}{path}", json=json,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status >= 300:
                    text = (await response.text())[:200]
                    raise Unavailable(f"{url}{path} answered {response.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{url}{path} failed: {exc or type(exc).__name__}") from None

    async def _healthy(self, url: str) -> bool:
        assert self._session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self._session.get(f"{url}/health") as response:
                return response.status == 200
        return False

    async def _is_sleeping(self, url: str) -> bool | None:
        """vLLM's /is_sleeping (dev mode only): None when it does not say (no such endpoint,
        no answer), which only a server that cannot sleep may be taken to mean awake."""
        assert self._session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError,
                                 TypeError):  # fmt: skip
            async with self._session.get(f"{url}/is_sleeping") as response:
                if response.status == 200:
                    return bool((await response.json())["is_sleeping"])
        return None

    async def _wait_healthy(self, url: str, process, timeout: float) -> bool:
        return await poll_until(
            lambda: self._healthy(url), timeout, give_up=lambda: process.returncode is not None
        )

    async def _stop_process(self, record: LocalBackend) -> None:
        process, record.process = record.process, None
        if process is not None:
            await processes.stop(record.name, process, self.controller.state_dir)
            _kill_group(process.pid)

    def _argv(self, record: LocalBackend, port: int) -> list[str]:
        backend = record.backend
        if backend.sim is not None:
            sim = backend.sim
            return [
                sys.executable, "-m", "controlplane", "sim",
                "--host", self.host, "--port", str(port), "--model", record.model,
                "--ttft-ms", str(sim.ttft_ms), "--itl-ms", str(sim.itl_ms),
                "--max-tokens-default", str(sim.max_tokens_default),
                "--wake-ms", str(sim.wake_ms), "--startup-ms", str(sim.startup_ms),
                "--version", record.version,
            ]  # fmt: skip
        assert backend.vllm is not None
        argv = [
            *backend.vllm.argv(), "--host", self.host, "--port", str(port),
            "--served-model-name", record.model, *backend.vllm.args,
        ]  # fmt: skip
        # Sleep mode frees the GPU while parked. A platform that refuses the flag (vLLM's
        # CPU build) is told `--no-enable-sleep-mode` in `args`: never overridden, and its
        # sleep endpoints (dev mode, below) still pause and resume the engine.
        chosen = {"--enable-sleep-mode", "--no-enable-sleep-mode"} & set(backend.vllm.args)
        if self._sleeps(record) and not chosen:
            argv.append("--enable-sleep-mode")
        return argv

    def _env(self, record: LocalBackend) -> dict[str, str] | None:
        """vLLM serves /sleep, /wake_up and /is_sleeping only in its dev mode."""
        if record.backend.vllm is not None and self._sleeps(record):
            return {"VLLM_SERVER_DEV_MODE": "1"}
        return None

    def _sleeps(self, record: LocalBackend) -> bool:
        model = self.controller.state.models.get(record.model)
        return model is not None and (
            model.park in ("sleep1", "sleep2") or model.idle_timeout_s is not None
        )


def _kill_group(pid: int) -> None:
    """What a dead backend left in its process group (vLLM's multiprocessing resource
    tracker ignores SIGTERM and outlives a killed server): gone with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def poll_until(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    give_up: Callable[[], bool] = lambda: False,
) -> bool:
    """True once `check()` (plain or async) is true; False after `timeout` seconds or as soon
    as `give_up()` is (the process died, the backend went away)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not give_up():
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(POLL_S)
    return False
