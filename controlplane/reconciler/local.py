"""The local runtime: model versions as processes on this machine (see runtime.Runtime).

`sim` and `vllm` backends are child processes on free ports, `replicas` of them per version
(output in state_dir/logs/), each restarted with exponential backoff when it dies; a version
with no replica up is marked `error` after repeated failures. `url` backends (one replica per
URL) are probed, never owned. An endpoint reaches Envoy only once its `/health`
answers 200 (and it is not asleep), and leaves at once when it stops being ready.

Each replica has one supervising task; a version's replicas move together towards its
`desired` state:
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
class Replica:
    """One backend server of a version: a process this runtime runs, or a `url` it probes."""

    index: int
    url: str | None = None  # while a process (or the url backend) exists
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None
    ready: bool = False  # healthy and awake: its endpoint is in EDS
    failures: int = 0  # failed starts in a row
    broken: bool = False  # a url that fails its probe, an engine that would not wake


@dataclass
class LocalBackend:
    """One version's backends as this runtime sees it: `replicas` servers, moved together
    towards `desired`."""

    model: str
    version: str
    backend: Backend
    members: list[Replica] = field(default_factory=list)
    desired: str = "active"  # active | sleeping | stopped
    sleep_level: int = 1
    waking: bool = False  # a wake from sleep is under way
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # One sleep, wake or stop at a time: a wake_up must not overtake a sleep still in flight.
    transition: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return f"{self.backend.kind}-{self.model}@{self.version}".replace("/", "_")

    def process_name(self, replica: Replica) -> str:
        """Its log and pid file name: the version's, with `.<index>` when it has several."""
        return self.name if len(self.members) == 1 else f"{self.name}.{replica.index}"

    def live(self) -> list[Replica]:
        """The replicas that have a server now (a process or a url)."""
        return [replica for replica in self.members if replica.url is not None]


class LocalRuntime:
    def __init__(self, controller: Controller, host: str = "127.0.0.1") -> None:
        self.controller = controller
        self.host = host
        self.backends: dict[tuple[str, str], LocalBackend] = {}
        self._session: aiohttp.ClientSession | None = None
        # `url` backends by address: the replicas on it, and the one probe task of each
        self._url_members: dict[str, dict[tuple[str, str, int], tuple[LocalBackend, Replica]]] = {}
        self._url_probes: dict[str, asyncio.Task] = {}
        self._url_joined: set[str] = set()  # addresses with a replica not yet told the answer

    def adopt_url_backends(self) -> None:
        """`url` backends are used as given: in the very first snapshot, so an Envoy that
        reconnects to a restarted control plane never sees them without endpoints. The
        probe takes them out if they do not answer."""
        for model in self.controller.state.models.values():
            for version in model.versions.values():
                if version.backend.url is not None:
                    version.endpoints = [Endpoint(url) for url in version.backend.urls]
                    version.state = "active"

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
        if key in self.backends or backend.adapter is not None:
            return  # an adapter runs on its base's servers (reconciler/adapters.py)
        record = self.backends[key] = LocalBackend(model, version, backend)
        if backend.url is not None:
            routed = {ep.url for ep in self._version(record).endpoints if ep.ready}
            for index, url in enumerate(backend.urls):
                replica = Replica(index, url=url, ready=url in routed)
                record.members.append(replica)
                replica.task = asyncio.create_task(
                    self._probe(record, replica), name=f"backend-{model}@{version}.{index}"
                )
            return
        for index in range(self._version(record).replicas):
            replica = Replica(index)
            record.members.append(replica)
            replica.task = asyncio.create_task(
                self._supervise(record, replica), name=f"backend-{model}@{version}.{index}"
            )

    async def remove(self, model: str, version: str) -> None:
        record = self.backends.pop((model, version), None)
        if record is None:
            return
        tasks = [replica.task for replica in record.members if replica.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_processes(record)
        logs.event(log, "backend.removed", model=model, version=version)

    async def sleep(self, model: str, version: str, level: int) -> None:
        record = self._record(model, version)
        async with record.transition:
            await self._sleep(record, model, version, level)

    async def _sleep(self, record: LocalBackend, model: str, version: str, level: int) -> None:
        urls = [replica.url for replica in record.live()]
        if record.desired == "sleeping" or not urls or record.backend.url is not None:
            return  # asleep already, no process, or a url backend: not ours to put to sleep
        started = time.perf_counter()
        timeout = self.controller.state.model(model).wake_timeout_s
        # Out of EDS first, as every Envoy confirms: a request that reached an engine going to
        # sleep would wait there until it wakes.
        record.desired, record.sleep_level = "sleeping", level
        for replica in record.members:
            replica.ready = False
        self._report(record)
        try:
            await self.controller.endpoints_applied(timeout)
            await asyncio.gather(*(
                self._post(url, f"/sleep?level={level}&mode={SLEEP_MODE}", timeout)
                for url in urls
            ))  # fmt: skip
        except SwitchyardError:
            record.desired = "active"  # cannot sleep: keep serving rather than lose it
            await self._back_in_service(record, record.live())
            raise
        metrics.backend_sleeps.labels(model, version).inc()
        metrics.backend_sleep_seconds.labels(model).observe(time.perf_counter() - started)
        logs.event(log, "backend.sleeping", model=model, version=version, level=level,
                   replicas=len(urls))  # fmt: skip

    async def wake(self, model: str, version: str) -> float:
        record = self._record(model, version)
        async with record.transition:
            return await self._wake(record, model, version)

    async def _wake(self, record: LocalBackend, model: str, version: str) -> float:
        if record.desired == "active" and self._version(record).ready:
            return 0.0
        started = time.perf_counter()
        was = record.desired
        record.desired = "active"
        if was == "sleeping" and record.live():
            timeout = self.controller.state.model(model).wake_timeout_s
            record.waking = True
            self._report(record)
            try:
                woken = await asyncio.gather(
                    *(self._wake_replica(record, replica, timeout) for replica in record.live())
                )
            finally:
                record.waking = False
                self._report(record)
            if not any(woken):
                raise Unavailable(f"{model}@{version} did not say it is awake in {timeout:g}s")
        else:
            record.changed.set()  # stopped: the supervisors start their processes
        await self._wait_ready(model, version)
        seconds = time.perf_counter() - started
        metrics.backend_wakes.labels(model, version).inc()
        metrics.backend_wake_seconds.labels(model).observe(seconds)
        logs.event(log, "backend.awake", model=model, version=version, seconds=f"{seconds:.3f}")
        return seconds

    async def _wake_replica(self, record: LocalBackend, replica: Replica, timeout: float) -> bool:
        """Wake one engine; it serves (joins EDS) as soon as it says it is awake."""
        assert replica.url is not None
        try:
            await self._wake_engine(replica.url, record.sleep_level, timeout)
        except Unavailable as exc:
            logs.event(log, "backend.wake_failed", logging.WARNING, model=record.model,
                       version=record.version, replica=replica.index,
                       error=exc.message)  # fmt: skip
            return False
        if not await self._wait_awake(replica, timeout):
            return False
        replica.ready, replica.broken = True, False
        self._report(record)
        return True

    async def scale(self, model: str, version: str, replicas: int) -> None:
        """Locally a version runs all its replicas (`replicas > 0`) or none."""
        record = self._record(model, version)
        if replicas > 0:
            await self.wake(model, version)
            return
        async with record.transition:
            await self._stop(record, model, version)

    async def _stop(self, record: LocalBackend, model: str, version: str) -> None:
        if record.desired == "stopped" or record.backend.url is not None:
            return
        record.desired = "stopped"
        for replica in record.members:
            replica.ready = False
        self._report(record)
        await self._stop_processes(record)
        record.changed.set()
        metrics.backend_sleeps.labels(model, version).inc()
        logs.event(log, "backend.stopped", model=model, version=version)

    async def stop(self) -> None:
        records = list(self.backends.values())
        tasks = [r.task for record in records for r in record.members if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_processes(record) for record in records))
        if self._session is not None:
            await self._session.close()

    async def wait_ready(self, timeout: float) -> bool:
        """True once every version is active with all its replicas (or timeout)."""
        models = self.controller.state.models

        def ready() -> bool:
            return all(v.ready for m in models.values() for v in m.versions.values()) and all(
                replica.ready
                for record in self.backends.values()
                if record.desired == "active"
                for replica in record.members
            )

        return await poll_until(ready, timeout)

    # -- what the controller is told ---------------------------------------------------------

    def _report(self, record: LocalBackend) -> None:
        """The version's ready endpoints and its state, from its replicas and `desired`."""
        endpoints = [Endpoint(r.url) for r in record.members if r.ready and r.url is not None]
        if record.desired != "active":
            state, endpoints = record.desired, []
        elif endpoints:
            state = "active"
        elif record.waking:
            state = "waking"
        elif any(r.broken or r.failures >= ERROR_AFTER_FAILURES for r in record.members):
            state = "error"
        else:
            state = "starting"
        self.controller.set_endpoints(record.model, record.version, endpoints, state)

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self, record: LocalBackend, replica: Replica) -> None:
        """Keep one replica's process running while desired; restart it with backoff when it
        dies."""
        backoff = 0.5
        model, version, kind = record.model, record.version, record.backend.kind
        name = record.process_name(replica)
        while True:
            if record.desired == "stopped":
                record.changed.clear()
                await record.changed.wait()
                continue
            port = processes.free_port(self.host)
            url = f"http://{self.host}:{port}"
            self._report(record)
            try:
                replica.process = await processes.spawn(
                    name, self._argv(record, replica, port), self.controller.state_dir,
                    env=self._env(record),
                )  # fmt: skip
            except OSError as exc:
                logs.event(log, "backend.spawn_failed", logging.ERROR, model=model,
                           version=version, replica=replica.index, error=exc)  # fmt: skip
                replica.process = None
            if replica.process is not None:
                replica.url = url
                if await self._wait_healthy(url, replica.process, STARTUP_TIMEOUT_S[kind]):
                    replica.failures, backoff = 0, 0.5
                    await self._settle(record, replica)
                code = await self._run(record, replica, replica.process)
                replica.process, replica.url, replica.ready = None, None, False
                if record.desired == "stopped":
                    continue  # stopped on purpose
                logs.event(log, "backend.exited", logging.WARNING, model=model,
                           version=version, replica=replica.index, code=code)  # fmt: skip
                metrics.backend_restarts.labels(model, version).inc()
                self.controller.record_crash(model, version, code)
            replica.failures += 1
            self._report(record)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _settle(self, record: LocalBackend, replica: Replica) -> None:
        """A healthy process: serve, or go back to sleep if it was parked when it died."""
        assert replica.url is not None
        if record.desired == "sleeping":
            timeout = self.controller.state.model(record.model).wake_timeout_s
            with contextlib.suppress(Unavailable):
                await self._post(replica.url, f"/sleep?level={record.sleep_level}", timeout)
                self._report(record)
                return
        replica.ready, replica.broken = True, False
        self._report(record)

    async def _run(self, record: LocalBackend, replica: Replica, process) -> int:
        """Until the process exits (its code); meanwhile an engine that can sleep is checked
        awake every second while we route to it."""
        watch = None
        if self._sleeps(record):
            watch = asyncio.create_task(
                self._keep_awake(record, replica), name=f"awake-{record.process_name(replica)}"
            )
        try:
            return await process.wait()
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            _kill_group(process.pid)

    async def _keep_awake(self, record: LocalBackend, replica: Replica) -> None:
        """An engine found asleep while it should serve (a /sleep that completed after we gave
        up on it, an operator's call) holds every request it gets until it wakes: wake it.
        It stays in EDS meanwhile: its requests are held and answered once it is awake, where
        taking it out would fail them (it may be the model's only version)."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            url = replica.url
            if record.desired != "active" or url is None or record.transition.locked():
                continue
            if await self._is_sleeping(url) is not True:
                continue
            async with record.transition:
                if record.desired == "active" and replica.url == url:
                    logs.event(log, "backend.found_asleep", logging.WARNING, model=record.model,
                               version=record.version, replica=replica.index)  # fmt: skip
                    await self._back_in_service(record, [replica], routed=True)

    async def _back_in_service(
        self, record: LocalBackend, replicas: list[Replica], routed: bool = False
    ) -> None:
        """Route to these engines again, but each only once it says it is awake: wake it first
        when it sleeps (a /sleep we gave up on may have gone through after all). `routed`:
        they are in EDS now, and stay there while they wake. Never raises."""
        record.waking = not routed
        try:
            await asyncio.gather(*(self._replica_back(record, r, routed) for r in replicas))
        finally:
            record.waking = False
        self._report(record)

    async def _replica_back(self, record: LocalBackend, replica: Replica, routed: bool) -> None:
        model, version, url = record.model, record.version, replica.url
        if url is None:
            return
        timeout = self.controller.state.model(model).wake_timeout_s
        sleeping = await self._is_sleeping(url)
        if sleeping is None and await self._healthy(url):  # no sleep endpoints: never sleeps
            replica.ready, replica.broken = True, False
            return
        if sleeping is not False:
            if not routed:
                replica.ready = False
                self._report(record)
            try:
                await self._wake_engine(url, record.sleep_level or 2, timeout)
            except Unavailable as exc:
                logs.event(log, "backend.wake_failed", logging.WARNING, model=model,
                           version=version, replica=replica.index, error=exc.message)  # fmt: skip
        if await self._wait_awake(replica, timeout):
            replica.ready, replica.broken = True, False
            logs.event(log, "backend.back_in_service", model=model, version=version,
                       replica=replica.index)  # fmt: skip
        else:
            replica.ready, replica.broken = False, True
            logs.event(log, "backend.not_awake", logging.ERROR, model=model, version=version,
                       replica=replica.index)  # fmt: skip

    async def _wake_engine(self, url: str, level: int, timeout: float) -> None:
        """vLLM's wake-up. After level 2 the weights were discarded: a plain /wake_up would
        serve garbage, so wake the weights, reload them from disk, then the KV cache."""
        if level >= 2:
            await self._post(url, "/wake_up?tags=weights", timeout)
            await self._post(url, "/collective_rpc", timeout, {"method": "reload_weights"})
            await self._post(url, "/wake_up?tags=kv_cache", timeout)
        else:
            await self._post(url, "/wake_up", timeout)

    async def _probe(self, record: LocalBackend, replica: Replica) -> None:
        """A `url` backend is not ours: watch its /health and route to it only while it is
        healthy and awake. The replicas on one address share one probe (`_probe_address`):
        a thousand LoRA models on one server cost two GETs a second, not two thousand."""
        url = replica.url
        assert url is not None
        key = (record.model, record.version, replica.index)
        members = self._url_members.setdefault(url, {})
        members[key] = (record, replica)
        self._url_joined.add(url)  # the next answer goes to it, changed or not
        if url not in self._url_probes:
            self._url_probes[url] = asyncio.create_task(
                self._probe_address(url), name=f"probe-{url}"
            )
        try:
            await asyncio.Event().wait()  # until the version is removed (cancelled)
        finally:
            if members.get(key, (None, None))[1] is replica:
                del members[key]
            if not members and self._url_members.get(url) is members:
                del self._url_members[url]
                probe = self._url_probes.pop(url)
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)

    async def _probe_address(self, url: str) -> None:
        """Probe one address every PROBE_INTERVAL_S (+-10 %, so that addresses do not all
        probe at the same moment) and apply the answer to every replica on it when it changed
        or a replica joined (the probe is the only one to set a url replica's readiness)."""
        last: bool | None = None
        while True:
            healthy = await self._healthy(url) and not await self._is_sleeping(url)  # None: no
            # sleep endpoints, so awake
            if healthy != last or url in self._url_joined:
                self._url_joined.discard(url)
                for record, replica in list(self._url_members.get(url, {}).values()):
                    self._apply_probe(record, replica, healthy)
                last = healthy
            await asyncio.sleep(PROBE_INTERVAL_S * random.uniform(0.9, 1.1))

    def _apply_probe(self, record: LocalBackend, replica: Replica, healthy: bool) -> None:
        model = self.controller.state.models.get(record.model)
        if model is None or record.version not in model.versions:
            return  # removed: its task is being cancelled
        if record.desired == "active" and healthy != replica.ready:
            replica.ready, replica.broken = healthy, not healthy
            self._report(record)

    # -- helpers ----------------------------------------------------------------------------

    def _record(self, model: str, version: str) -> LocalBackend:
        try:
            return self.backends[(model, version)]
        except KeyError:
            message = f"{model}@{version} is not run by this runtime"
            raise Conflict(message, field="version") from None

    def _version(self, record: LocalBackend):
        return self.controller.state.model(record.model).versions[record.version]

    async def _wait_ready(self, model: str, version: str) -> None:
        timeout = self.controller.state.model(model).wake_timeout_s
        ready = lambda: self.controller.state.model(model).versions[version].ready  # noqa: E731
        if not await poll_until(ready, timeout):
            raise Unavailable(f"{model}@{version} did not become ready in {timeout:g}s")

    async def _wait_awake(self, replica: Replica, timeout: float) -> bool:
        """Until the engine itself says it is not sleeping (and /health is 200)."""

        async def awake() -> bool:
            url = replica.url
            return (url is not None and await self._is_sleeping(url) is False
                    and await self._healthy(url))  # fmt: skip

        return await poll_until(awake, timeout, give_up=lambda: replica.url is None)

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

    async def _stop_processes(self, record: LocalBackend) -> None:
        await asyncio.gather(*(self._stop_process(record, r) for r in record.members))

    async def _stop_process(self, record: LocalBackend, replica: Replica) -> None:
        process, replica.process = replica.process, None
        if process is not None:
            await processes.stop(record.process_name(replica), process, self.controller.state_dir)
            _kill_group(process.pid)

    def _argv(self, record: LocalBackend, replica: Replica, port: int) -> list[str]:
        backend = record.backend
        if backend.sim is not None:
            sim = backend.sim
            argv = [
                sys.executable, "-m", "controlplane", "sim",
                "--host", self.host, "--port", str(port), "--model", record.model,
                "--ttft-ms", str(sim.ttft_ms), "--itl-ms", str(sim.itl_ms),
                "--max-tokens-default", str(sim.max_tokens_default),
                "--wake-ms", str(sim.wake_ms), "--startup-ms", str(sim.startup_ms),
                "--prefill-ms-per-token", str(sim.prefill_ms_per_token),
                "--max-num-seqs", str(sim.max_num_seqs),
                "--kv-cache-tokens", str(sim.kv_cache_tokens),
                "--block-size", str(sim.block_size),
                "--max-loras", str(sim.max_loras), "--lora-load-ms", str(sim.lora_load_ms),
                "--version", record.version,
            ]  # fmt: skip
            if len(record.members) > 1:
                argv += ["--replica", str(replica.index)]
            return argv
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
        """vLLM serves /sleep, /wake_up and /is_sleeping only in its dev mode, and loads LoRA
        adapters at run time (adapter versions on it: reconciler/adapters.py) only with
        VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
        vllm, env = record.backend.vllm, {}
        if vllm is not None and self._sleeps(record):
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if vllm is not None and "--enable-lora" in vllm.args:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env or None

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
