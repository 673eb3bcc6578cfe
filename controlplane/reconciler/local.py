"""The local runtime: model versions as processes on this machine.

`sim` and `vllm` backends are child processes on free ports (output in state_dir/logs/),
restarted with exponential backoff when they die; `url` backends are used as given. An
endpoint is sent to Envoy only once its `/health` answers 200, and leaves at once when its
process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp

from controlplane import logs, processes
from controlplane.config import Backend
from controlplane.controller import Controller
from controlplane.state import Endpoint

log = logs.get("local")
STARTUP_TIMEOUT_S = {"sim": 30.0, "vllm": 900.0}  # vLLM loads weights for minutes
MAX_BACKOFF_S = 30.0


class LocalRuntime:
    def __init__(self, controller: Controller, host: str = "127.0.0.1") -> None:
        self.controller = controller
        self.host = host
        self._tasks: list[asyncio.Task] = []
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._session: aiohttp.ClientSession | None = None

    def adopt_url_backends(self) -> None:
        """`url` backends are used as given: in the very first snapshot, so an Envoy that
        reconnects to a restarted control plane never sees them without endpoints."""
        for model in self.controller.state.models.values():
            for version in model.versions.values():
                if version.backend.url is not None:
                    version.endpoints, version.state = [Endpoint(version.backend.url)], "active"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        for model in self.controller.state.models.values():
            for version in model.versions.values():
                self._tasks.append(
                    asyncio.create_task(
                        self._keep_running(model.name, version.name, version.backend),
                        name=f"backend-{model.name}@{version.name}",
                    )
                )

    async def wait_ready(self, timeout: float) -> bool:
        """True once every version is active (or timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            versions = [
                v for m in self.controller.state.models.values() for v in m.versions.values()
            ]
            if all(version.ready for version in versions):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _keep_running(self, model: str, version: str, backend: Backend) -> None:
        if backend.url is not None:
            return  # adopted before the first snapshot; probing it is the reconciler's job
        name = f"{backend.kind}-{model}@{version}".replace("/", "_")
        backoff = 0.5
        while True:
            port = processes.free_port(self.host)
            url = f"http://{self.host}:{port}"
            try:
                process = await processes.spawn(
                    name, self._argv(model, version, backend, port), self.controller.state_dir
                )
            except OSError as exc:
                logs.event(log, "backend.spawn_failed", model=model, version=version, error=exc)
                self.controller.set_endpoints(model, version, [], "error")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self._processes[name] = process
            if await self._wait_healthy(url, process, STARTUP_TIMEOUT_S[backend.kind]):
                self.controller.set_endpoints(model, version, [Endpoint(url)], "active")
                backoff = 0.5
            code = await process.wait()
            self.controller.set_endpoints(model, version, [], "error")
            logs.event(log, "backend.exited", model=model, version=version, code=code)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _argv(self, model: str, version: str, backend: Backend, port: int) -> list[str]:
        if backend.sim is not None:
            sim = backend.sim
            return [
                sys.executable, "-m", "controlplane", "sim",
                "--host", self.host, "--port", str(port), "--model", model,
                "--ttft-ms", str(sim.ttft_ms), "--itl-ms", str(sim.itl_ms),
                "--max-tokens-default", str(sim.max_tokens_default),
                "--wake-ms", str(sim.wake_ms), "--version", version,
            ]  # fmt: skip
        assert backend.vllm is not None
        return [
            "vllm", "serve", backend.vllm.model, "--host", self.host, "--port", str(port),
            "--served-model-name", model, *backend.vllm.args,
        ]  # fmt: skip

    async def _wait_healthy(self, url: str, process, timeout: float) -> bool:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(
                processes.stop(name, process, self.controller.state_dir)
                for name, process in self._processes.items()
            )
        )
        if self._session is not None:
            await self._session.close()
