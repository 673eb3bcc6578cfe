"""Scale to zero: park idle versions, and wake them on their next request (Knative's activator).

A version of a model with `idle_timeout_seconds` that saw no request for that long is parked
(the model's `park` mode; `keep` means sleep level 1 here). Its EDS endpoint then points at
a socket of this activator instead of the backend, so Envoy keeps routing its share of the
traffic here. The first request wakes the version and every request is held, not failed,
until the backend is ready, then proxied to it; from then on the backend is back in EDS and
traffic flows through Envoy directly again. A request held longer than the model's
`wake_timeout_seconds` gets a 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time

import aiohttp
from aiohttp import web

from controlplane import logs, metrics
from controlplane.controller import Controller
from controlplane.errors import SwitchyardError

log = logs.get("activator")
CHECK_INTERVAL_S = 1.0
BUSY_WINDOW_S = 2.0  # a version with a request or one in flight in this window is not idle
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "upgrade", "proxy-connection", "te", "trailer"}  # fmt: skip


class Activator:
    def __init__(self, controller: Controller, host: str = "127.0.0.1") -> None:
        self.controller = controller
        self.host = host
        self._runner: web.AppRunner | None = None
        self._sockets: dict[tuple[str, str], socket.socket] = {}
        self._by_port: dict[int, tuple[str, str]] = {}
        self._last_busy: dict[tuple[str, str], float] = {}
        self._wakes: dict[tuple[str, str], asyncio.Task] = {}
        self._watcher: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)  # Envoy's active health check
        app.router.add_get("/metrics", self._no_metrics)  # a scrape must not wake a version
        app.router.add_route("*", "/{path:.*}", self._hold)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._watcher = asyncio.create_task(self._watch_idle(), name="activator-idle")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for task in self._wakes.values():
            task.cancel()
        await asyncio.gather(*self._wakes.values(), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- scaling down ---------------------------------------------------------------------

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                await self._scale_down_idle()
            except Exception:  # a bug here must not end scaling to zero for good
                log.exception("scale.idle_check_failed", extra={"fields": {}})

    async def _scale_down_idle(self) -> None:
        now = time.monotonic()
        for model in list(self.controller.state.models.values()):
            if model.idle_timeout_s is None or model.active_rollout:
                continue
            for version in list(model.versions.values()):
                key = (model.name, version.name)
                if not version.ready or version.backend.url is not None:  # not ours
                    self._last_busy.pop(key, None)
                    continue
                figures = self.controller.health.window(model.name, version.name, BUSY_WINDOW_S)
                if figures.requests or figures.in_flight:
                    self._last_busy[key] = now
                idle = now - self._last_busy.setdefault(key, now)
                if idle >= model.idle_timeout_s:
                    self._last_busy.pop(key, None)
                    await self.scale_down(model.name, version.name, idle)

    async def scale_down(self, model: str, version: str, idle_seconds: float = 0.0) -> None:
        """Park the version with its EDS endpoint on the activator: nothing is lost."""
        url = await self._listen(model, version)
        self.controller.set_activator(model, version, url)
        park = self.controller.state.model(model).park
        try:
            if park == "stop":
                await self.controller.runtime.scale(model, version, 0)
            else:
                await self.controller.runtime.sleep(model, version, 2 if park == "sleep2" else 1)
        except Exception as exc:  # parking only saves resources: keep serving
            self.controller.set_activator(model, version, None)
            message = exc.message if isinstance(exc, SwitchyardError) else repr(exc)
            logs.event(log, "scale.down_failed", logging.WARNING, model=model, version=version,
                       error=message)  # fmt: skip
            return
        metrics.scale_events.labels(model, version, "down").inc()
        logs.event(log, "scale.down", model=model, version=version, idle_s=f"{idle_seconds:.1f}")
        self.controller.events.publish("scale.down", model=model, version=version)

    async def _listen(self, model: str, version: str) -> str:
        """One socket per scaled-down version: its port says which version a request is for."""
        key = (model, version)
        if key not in self._sockets:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            assert self._runner is not None
            await web.SockSite(self._runner, sock).start()
            self._sockets[key] = sock
            self._by_port[sock.getsockname()[1]] = key
        return f"http://{self.host}:{self._sockets[key].getsockname()[1]}"

    # -- scaling up: hold, wake, proxy -------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "activator"})

    async def _no_metrics(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="a parked version has no metrics\n")

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        key = self._by_port.get(port)
        if key is None:
            return _openai_error(404, "no version is parked behind this activator port")
        model_name, version_name = key
        model = self.controller.state.models.get(model_name)
        if model is None or version_name not in model.versions:
            return _openai_error(404, f"{model_name}@{version_name} no longer exists")
        body = await request.read()
        wake = self._wakes.get(key)
        if wake is None or wake.done():
            wake = self._wakes[key] = asyncio.create_task(self._wake(model_name, version_name))
        try:
            await asyncio.wait_for(asyncio.shield(wake), model.wake_timeout_s)
        except TimeoutError:
            retry = max(1, int(model.wake_timeout_s))
            return _openai_error(
                503, f"{model_name}@{version_name} is waking up; retry in {retry}s",
                headers={"Retry-After": str(retry)},
            )  # fmt: skip
        except SwitchyardError as exc:
            return _openai_error(503, f"{model_name}@{version_name} could not wake: {exc.message}",
                                 headers={"Retry-After": "5"})  # fmt: skip
        version = model.versions[version_name]
        targets = [ep.url for ep in version.endpoints if ep.ready]
        if not version.ready or not targets:
            return _openai_error(503, f"{model_name}@{version_name} is not ready",
                                 headers={"Retry-After": "1"})  # fmt: skip
        return await self._proxy(request, random.choice(targets), body)

    async def _wake(self, model: str, version: str) -> float:
        seconds = await self.controller.wake(model, version)
        metrics.scale_events.labels(model, version, "up").inc()
        logs.event(log, "scale.up", model=model, version=version, seconds=f"{seconds:.3f}")
        self.controller.events.publish("scale.up", model=model, version=version, seconds=seconds)
        return seconds

    async def _proxy(self, request: web.Request, target: str, body: bytes) -> web.StreamResponse:
        """Forward the held request to the now-ready backend, streaming its answer back."""
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, f"{target}{request.rel_url}", data=body, headers=headers
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_HEADERS:
                    response.headers[name] = value
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response


def _openai_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None,
                      "code": status}}  # fmt: skip
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers=headers)  # fmt: skip
