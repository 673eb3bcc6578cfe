"""`url` backends at fleet size: the versions on one address share one probe.

A thousand LoRA models served by one vLLM are a thousand `url` versions on one address; the
local runtime probes that address once per interval (not once per version) and applies the
answer to each of them. In-process: a Controller and a LocalRuntime against a small aiohttp
server that counts its probes (the probe interval shortened so that the test is quick).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web

from controlplane.config import parse_config
from controlplane.controller import Controller
from controlplane.reconciler import local
from controlplane.reconciler.local import LocalRuntime

MODELS = 20


class Backend:
    """/health answering `status`, counted; no /is_sleeping (a server that never sleeps)."""

    def __init__(self) -> None:
        self.status, self.probes = 200, 0

    async def health(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.Response(status=self.status)


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    server = Backend()
    app = web.Application()
    app.router.add_get("/health", server.health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield server, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def until(check, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_versions_on_one_address_share_one_probe(backend, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(local, "PROBE_INTERVAL_S", 0.05)
    server, url = backend
    config = parse_config({"models": [
        {"name": f"m{i}", "versions": [
            {"name": "v1", "weight": 100, "backend": {"url": url}},
            {"name": "v2", "weight": 0, "backend": {"url": url}}]}
        for i in range(MODELS)]})  # fmt: skip
    controller = Controller(config, tmp_path)
    runtime = LocalRuntime(controller)
    runtime.adopt_url_backends()
    controller.runtime = runtime
    versions = [v for m in controller.state.models.values() for v in m.versions.values()]
    await runtime.start()
    try:
        await until(lambda: server.probes >= 5)
        rounds = server.probes
        await asyncio.sleep(0.2)
        # One probe per round for all 40 versions (a round per version would be 40 each).
        assert server.probes - rounds <= 10
        assert list(runtime._url_probes) == [url]

        server.status = 503  # the address fails: every version on it leaves EDS
        await until(lambda: not any(v.ready for v in versions))
        assert {v.state for v in versions} == {"error"}
        server.status = 200  # and every one comes back
        await until(lambda: all(v.ready for v in versions))

        for name in list(controller.state.models)[:-1]:  # removed versions stop being probed
            for version in ("v1", "v2"):
                await runtime.remove(name, version)
        assert list(runtime._url_probes) == [url]  # the last model still needs it
        for version in ("v1", "v2"):
            await runtime.remove(f"m{MODELS - 1}", version)
        assert runtime._url_probes == {} and runtime._url_members == {}
    finally:
        await runtime.stop()
        controller.store.close()
