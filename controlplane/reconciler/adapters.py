"""LoRA adapter versions: loaded on their base model's servers, whatever runs those.

A version with `backend: {adapter: {base, path, lora_name?}}` has no server of its own. This
runtime loads it (`POST /v1/load_lora_adapter {"lora_name", "lora_path"}`, vLLM with
`--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) on every ready replica of the
base's *serving* versions (weight above 0, or stable), and reports as its endpoints the
replicas that answered: Envoy sends the adapter's traffic only there, with the body's
`model` rewritten to the lora name (xds/lora.py). So:

- a new adapter version is ready (`active`) once every serving replica of the base has it;
- a base replica that joins later, or comes back after a restart (which loses every adapter
  it had), gets the adapter loaded before it is one of the adapter's endpoints; one that
  leaves the base's endpoints leaves the adapter's in the same snapshot;
- every second each base server's `/v1/models` is read: an adapter it no longer lists (a
  `url` base restarted between two probes, an operator's unload) leaves the adapter's
  endpoints and is loaded again;
- parking (after a successful rollout, `park` other than `keep`; scale to zero) unloads it
  from every replica once Envoys stopped sending it traffic; waking loads it again;
  removal unloads it.

Every other version goes to the runtime this one wraps (local processes, Kubernetes), which
never sees adapter versions. State changes are logged: adapter.loaded, adapter.unloaded,
adapter.load_failed, adapter.lost, adapter.ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from controlplane import logs, metrics
from controlplane.adapters import lora_name
from controlplane.config import AdapterBackend, Backend
from controlplane.errors import Conflict, SwitchyardError, Unavailable
from controlplane.reconciler.runtime import Runtime
from controlplane.state import Endpoint

log = logs.get("adapters")
CHECK_INTERVAL_S = 1.0  # how often each base server's /v1/models is read
MAX_BACKOFF_S = 30.0
CALL_TIMEOUT_S = 120.0  # a load reads the adapter's weights (from disk, or downloads them)
POLL_S = 0.05


@dataclass
class Hosted:
    """One adapter version and where it is loaded."""

    model: str
    version: str
    adapter: AdapterBackend
    lora: str
    desired: str = "active"  # active | stopped (parked: unloaded everywhere)
    loaded: dict[str, float] = field(default_factory=dict)  # base URL -> when it loaded there
    loading: dict[str, asyncio.Task] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # base URL -> the last refusal
    was_ready: bool = False  # loaded on every serving replica once: `active` from then on
    reported: tuple | None = None
    transition: asyncio.Lock = field(default_factory=asyncio.Lock)  # park, wake, remove


class AdapterRuntime:
    """The Runtime the controller uses: adapter versions here, every other to `inner`."""

    def __init__(self, inner: Runtime | None, controller) -> None:
        self.inner = inner
        self.controller = controller
        self.hosted: dict[tuple[str, str], Hosted] = {}
        self._session: aiohttp.ClientSession | None = None
        self._checker: asyncio.Task | None = None
        controller.endpoint_watchers.append(self._base_changed)

    def __getattr__(self, name: str) -> Any:  # the wrapped runtime's own (wait_synced, ...)
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the Runtime interface ------------------------------------------------------------

    async def start(self) -> None:
        if self.inner is not None:
            await self.inner.start()
        for model in list(self.controller.state.models.values()):
            for version in list(model.versions.values()):
                if version.backend.adapter is not None:
                    await self.ensure(model.name, version.name, version.backend)
        self._checker = asyncio.create_task(self._check_loop(), name="adapters-check")

    def validate(self, model: str, version: str, backend: Backend) -> None:
        if self.inner is not None:
            self.inner.validate(model, version, backend)

    async def ensure(self, model: str, version: str, backend: Backend) -> None:
        """Every version goes to the wrapped runtime too: it runs nothing for an adapter
        but may record it (Kubernetes: a VLLMModel with `adapter`, and no pods)."""
        if self.inner is not None:
            await self.inner.ensure(model, version, backend)
        if backend.adapter is None:
            return
        key = (model, version)
        if key in self.hosted:
            return
        hosted = Hosted(model, version, backend.adapter, lora_name(model, version, backend.adapter))
        self.hosted[key] = hosted
        self._reconcile(hosted)

    async def remove(self, model: str, version: str) -> None:
        hosted = self.hosted.get((model, version))
        if hosted is not None:
            async with hosted.transition:
                del self.hosted[(model, version)]
                await self._unload_everywhere(hosted)
            logs.event(log, "adapter.removed", model=model, version=version, lora=hosted.lora)
        if self.inner is not None:
            await self.inner.remove(model, version)

    async def sleep(self, model: str, version: str, level: int) -> None:
        """An adapter has no sleep mode: parked, it is unloaded (its base's servers keep
        serving); woken, it is loaded again (seconds, not a cold start)."""
        hosted = self.hosted.get((model, version))
        if hosted is None:
            if self.inner is not None:
                await self.inner.sleep(model, version, level)
            return
        await self._park(hosted)

    async def scale(self, model: str, version: str, replicas: int) -> None:
        hosted = self.hosted.get((model, version))
        if hosted is None:
            if self.inner is not None:
                await self.inner.scale(model, version, replicas)
            return
        if replicas > 0:
            await self.wake(model, version)
        else:
            await self._park(hosted)

    async def wake(self, model: str, version: str) -> float:
        hosted = self.hosted.get((model, version))
        if hosted is None:
            if self.inner is None:
                return 0.0
            return await self.inner.wake(model, version)
        async with hosted.transition:
            record = self._version(hosted)
            if hosted.desired == "active" and record is not None and record.ready:
                return 0.0
            started = time.perf_counter()
            hosted.desired, hosted.was_ready = "active", False
            self._reconcile(hosted)
            timeout = self.controller.state.model(model).wake_timeout_s
            if not await _poll(lambda: (v := self._version(hosted)) is not None and v.ready,
                               timeout):  # fmt: skip
                raise Unavailable(f"{model}@{version}: the adapter did not load on every "
                                  f"replica of {hosted.adapter.base!r} in {timeout:g}s")
            seconds = time.perf_counter() - started
            metrics.backend_wakes.labels(model, version).inc()
            metrics.backend_wake_seconds.labels(model).observe(seconds)
            logs.event(log, "backend.awake", model=model, version=version,
                       seconds=f"{seconds:.3f}")  # fmt: skip
            return seconds

    async def wait_ready(self, timeout: float) -> bool:
        inner = self.inner is None or await self.inner.wait_ready(timeout)
        return inner and await _poll(self._all_ready, timeout)

    async def stop(self) -> None:
        """Stops the checks and the loads under way; leaves adapters loaded (the servers are
        the base's: a `url` base keeps serving them, and a restarted control plane finds
        them there)."""
        tasks = [t for h in self.hosted.values() for t in h.loading.values()]
        if self._checker is not None:
            tasks.append(self._checker)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self.inner is not None:
            await self.inner.stop()

    # -- following the base -----------------------------------------------------------------

    def _base_changed(self, model: str) -> None:
        """The controller's word that `model`'s endpoints or weights changed."""
        for hosted in list(self.hosted.values()):
            if hosted.adapter.base == model:
                self._reconcile(hosted)

    def _hosts(self, hosted: Hosted) -> list[str]:
        """The ready endpoints of the base's serving versions (weight above 0, or stable)."""
        base = self.controller.state.models.get(hosted.adapter.base)
        if base is None:
            return []
        urls: list[str] = []
        for version in base.versions.values():
            if version.state != "active" or (version.weight == 0 and version.name != base.stable):
                continue
            for endpoint in version.endpoints:
                url = endpoint.url
                if endpoint.ready and url != version.activator and url not in urls:
                    urls.append(url)
        return urls

    def _reconcile(self, hosted: Hosted) -> None:
        """Load where missing, forget where the base went, report what serves. Synchronous:
        a base replica that left is out of the adapter's endpoints in the same snapshot."""
        if self.hosted.get((hosted.model, hosted.version)) is not hosted:
            return  # removed
        if hosted.desired != "active":
            self._report(hosted, [], "stopped")
            return
        hosts = self._hosts(hosted)
        for url in [url for url in hosted.loaded if url not in hosts]:
            # Gone from the base (a replica that died, restarted, or was parked): loaded again
            # if it comes back, since a restarted server has lost its adapters.
            del hosted.loaded[url]
        for url in [url for url in hosted.loading if url not in hosts]:
            hosted.loading.pop(url).cancel()
        for url in [url for url in hosted.failed if url not in hosts]:
            del hosted.failed[url]
        for url in hosts:
            if url not in hosted.loaded and url not in hosted.loading:
                hosted.loading[url] = asyncio.create_task(
                    self._load(hosted, url), name=f"adapter-load-{hosted.model}@{hosted.version}"
                )
        serving = [url for url in hosts if url in hosted.loaded]
        if serving and (hosted.was_ready or len(serving) == len(hosts)):
            if not hosted.was_ready:
                hosted.was_ready = True
                logs.event(log, "adapter.ready", model=hosted.model, version=hosted.version,
                           lora=hosted.lora, replicas=len(serving))  # fmt: skip
            self._report(hosted, serving, "active", len(hosts))
        elif hosts and all(url in hosted.failed for url in hosts if url not in hosted.loaded):
            self._report(hosted, [], "error", len(hosts))
        else:
            self._report(hosted, [], "starting", len(hosts))

    def _report(self, hosted: Hosted, urls: list[str], state: str, hosts: int = 0) -> None:
        version = self._version(hosted)
        if version is not None and hosts:
            version.replicas = hosts  # `switchyard models`: yes 2/2
        if hosted.reported == (tuple(urls), state):
            return
        hosted.reported = (tuple(urls), state)
        endpoints = [Endpoint(url) for url in urls]
        self.controller.set_endpoints(hosted.model, hosted.version, endpoints, state)

    def _version(self, hosted: Hosted):
        model = self.controller.state.models.get(hosted.model)
        return model.versions.get(hosted.version) if model else None

    def _all_ready(self) -> bool:
        return all(
            (v := self._version(h)) is not None and v.ready
            for h in self.hosted.values()
            if h.desired == "active"
        )

    # -- loading and unloading ------------------------------------------------------------

    async def _load(self, hosted: Hosted, url: str) -> None:
        """Load on one base server until it answers, backing off (a full server, a base
        without --enable-lora, a path it cannot read: logged each time, retried)."""
        backoff, replaced = 0.5, False
        body = {"lora_name": hosted.lora, "lora_path": hosted.adapter.path}
        try:
            while True:
                try:
                    status, text = await self._post(url, "/v1/load_lora_adapter", body)
                    if status == 400 and "already been loaded" in text:
                        # Ours from before (a restarted control plane, a parked base woken):
                        # fine if from this path; from another (the path was changed while
                        # no control plane ran), it goes and this one is loaded at once.
                        root = await self._root(url, hosted.lora)
                        if root == hosted.adapter.path:
                            status = 200
                        elif not replaced and await self._unload(hosted, url):
                            replaced = True
                            logs.event(log, "adapter.unloaded", model=hosted.model,
                                       version=hosted.version, lora=hosted.lora, url=url,
                                       reason=f"loaded from {root}")  # fmt: skip
                            continue
                    if status == 200:
                        hosted.loaded[url] = asyncio.get_running_loop().time()
                        hosted.failed.pop(url, None)
                        logs.event(log, "adapter.loaded", model=hosted.model,
                                   version=hosted.version, lora=hosted.lora,
                                   base=hosted.adapter.base, url=url)  # fmt: skip
                        return
                    problem = f"{url} answered {status}: {text[:300]}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = f"{url}: {exc or type(exc).__name__}"
                hosted.failed[url] = problem
                logs.event(log, "adapter.load_failed", logging.WARNING, model=hosted.model,
                           version=hosted.version, lora=hosted.lora, error=problem,
                           retry_s=backoff)  # fmt: skip
                self._reconcile_soon(hosted)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            if hosted.loading.get(url) is asyncio.current_task():
                del hosted.loading[url]
                self._reconcile_soon(hosted)

    def _reconcile_soon(self, hosted: Hosted) -> None:
        asyncio.get_running_loop().call_soon(self._reconcile, hosted)

    async def _park(self, hosted: Hosted) -> None:
        """Out of every Envoy's endpoints first, then unloaded from every base server."""
        async with hosted.transition:
            if hosted.desired == "stopped":
                return
            started = time.perf_counter()
            hosted.desired = "stopped"
            self._reconcile(hosted)
            timeout = self.controller.state.model(hosted.model).wake_timeout_s
            try:
                await self.controller.endpoints_applied(timeout)
            except SwitchyardError as exc:  # unloading now could fail requests: keep it
                hosted.desired = "active"
                self._reconcile(hosted)
                raise Conflict(f"{hosted.model}@{hosted.version}: not unloaded, the Envoys "
                               f"did not confirm it left them ({exc.message})") from None
            await self._unload_everywhere(hosted)
            metrics.backend_sleeps.labels(hosted.model, hosted.version).inc()
            metrics.backend_sleep_seconds.labels(hosted.model).observe(
                time.perf_counter() - started)  # fmt: skip

    async def _unload_everywhere(self, hosted: Hosted) -> None:
        urls = {*hosted.loaded, *hosted.loading}
        tasks = list(hosted.loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hosted.loading.clear()
        hosted.loaded.clear()
        hosted.failed.clear()
        hosted.was_ready = False
        done = await asyncio.gather(*(self._unload(hosted, url) for url in urls))
        logs.event(log, "adapter.unloaded", model=hosted.model, version=hosted.version,
                   lora=hosted.lora, replicas=sum(done), of=len(urls))  # fmt: skip

    async def _unload(self, hosted: Hosted, url: str) -> bool:
        try:
            status, text = await self._post(url, "/v1/unload_lora_adapter",
                                            {"lora_name": hosted.lora})  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, text = 0, str(exc) or type(exc).__name__
        if status in (200, 404):  # 404: not there (a load that never went through)
            return True
        logs.event(log, "adapter.unload_failed", logging.WARNING, model=hosted.model,
                   version=hosted.version, url=url, error=f"{status}: {text[:200]}")  # fmt: skip
        return False

    # -- what the base servers list ---------------------------------------------------------

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                await self.check_once()
            except Exception:  # a bug here must not end the checks for good
                log.exception("adapter.check_failed", extra={"fields": {}})

    async def check_once(self) -> None:
        """Each base server that should have adapters lists them: one that does not (it
        restarted at the same address, someone unloaded it) is out of the adapter's
        endpoints at once and loaded again."""
        urls = {url for hosted in self.hosted.values() for url in hosted.loaded}
        if not urls:
            return
        started = asyncio.get_running_loop().time()
        listed = await asyncio.gather(*(self._listed(url) for url in urls))
        for url, names in zip(urls, listed, strict=True):
            if names is None:
                continue  # no answer: the base's own health checks deal with that
            for hosted in list(self.hosted.values()):
                at = hosted.loaded.get(url)
                if at is not None and at < started and hosted.lora not in names:
                    del hosted.loaded[url]
                    logs.event(log, "adapter.lost", logging.WARNING, model=hosted.model,
                               version=hosted.version, lora=hosted.lora, url=url)  # fmt: skip
                    self._reconcile(hosted)

    async def _listed(self, url: str) -> dict[str, str] | None:
        """The models a server lists, id -> root (an adapter's root is its path)."""
        try:
            async with self._http().get(f"{url}/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status != 200:
                    return None
                data = (await response.json())["data"]
                return {entry["id"]: entry.get("root") for entry in data}
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return None

    async def _root(self, url: str, name: str) -> str | None:
        listed = await self._listed(url)
        return None if listed is None else listed.get(name)

    async def _post(self, url: str, path: str, body: dict) -> tuple[int, str]:
        async with self._http().post(f"{url}{path}", json=body) as response:
            return response.status, await response.text()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
        return self._session


async def _poll(check, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if check():
            return True
        await asyncio.sleep(POLL_S)
    return bool(check())


def with_adapters(inner: Runtime | None, controller) -> AdapterRuntime:
    """`inner` (local processes, Kubernetes) with LoRA adapter versions hosted on top."""
    runtime = AdapterRuntime(inner, controller)
    controller.runtime = runtime
    return runtime

