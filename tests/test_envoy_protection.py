"""Envoy protects clients by itself: health checks, outlier detection, retries and failover.

A canary that dies or hangs at 50 % costs no client its request (beyond those already on
it): Envoy retries what never reached it on the stable version, then takes it out of the
rotation, and sends its share to stable, all before anyone changes a weight. Retries do not
hide failures from the analysis: a canary failing half its attempts is rolled back although
clients see no errors.

The first two tests run their own simulators as `url` backends: no supervisor restarts them
or takes them out at once (the control plane probes `url` backends each second, with a 5 s
timeout), so what clients see is Envoy's doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import InBackground, Running, free_ports, http_json, switchyard, wait_until
from tests.test_auto_rollback import Load, canary, rolled_back

MODEL = "llama-3-8b"
BODY = {"model": MODEL, "prompt": "x", "max_tokens": 2}


class Sim:
    """A simulator process on a fixed port, as a `url` backend: kill, freeze, restart."""

    def __init__(self, port: int, version: str) -> None:
        self.port, self.version = port, version
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "sim", "--port", str(self.port),
             "--model", MODEL, "--version", self.version],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self.healthy, 20, message=f"sim {self.version} on {self.port}")

    def healthy(self) -> bool:
        with contextlib.suppress(OSError):
            return http_json("GET", f"{self.url}/health")[0] == 200
        return False

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait()


@dataclass
class Reply:
    sent: float
    version: str = ""
    status: int | None = None  # None: no answer yet; 0: none at all (broken, timed out)


class Traffic(InBackground):
    """Non-streamed requests at a steady rate from a background thread, each with its send
    time. Open loop: a request stuck on a hung backend holds up no other."""

    def __init__(self, proxy: str, rate: float = 50, timeout: float = 30) -> None:
        self.proxy, self.rate, self.timeout = proxy, rate, timeout
        self.replies: list[Reply] = []
        self.join_timeout = timeout + 5
        super().__init__()

    def since(self, moment: float) -> list[Reply]:
        return [reply for reply in list(self.replies) if reply.sent >= moment]

    def last(self, count: int) -> list[Reply]:
        """The last `count` requests sent over half a second ago: answered by now, unless
        stuck (status None)."""
        settled = time.time() - 0.5
        return [reply for reply in list(self.replies) if reply.sent < settled][-count:]

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one() -> None:
                reply = Reply(time.time())
                self.replies.append(reply)
                try:
                    async with session.post(f"{self.proxy}/v1/completions", json=BODY) as r:
                        await r.read()
                        reply.version = r.headers.get("x-switchyard-version", "?")
                        reply.status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    reply.status = 0

            tasks = set()
            while not self.stopping.is_set():
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1 / self.rate)
            if tasks:
                await asyncio.wait(tasks)


@dataclass
class UrlStack:
    running: Running
    sims: dict[str, Sim]

    def envoy_stat(self, version: str, stat: str) -> int:
        """One of Envoy's own counters for a version, from its admin port."""
        name = f"cluster.{MODEL}@{version}.{stat}"
        url = f"http://{self.running.config['listen']['envoy_admin']}/stats?filter=^{name}$"
        with urllib.request.urlopen(url, timeout=10) as response:
            found = re.search(rf"{re.escape(name)}: (\d+)", response.read().decode())
        return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def url_stack(tmp_path_factory) -> Iterator[UrlStack]:
    ports = free_ports(2)
    sims = {version: Sim(port, version) for version, port in zip(("v1", "v2"), ports, strict=True)}
    try:
        for sim in sims.values():
            sim.start()
        models = [
            {"name": MODEL, "versions": [
                {"name": "v1", "weight": 100, "backend": {"url": sims["v1"].url}},
                {"name": "v2", "weight": 0, "backend": {"url": sims["v2"].url}}]},
        ]  # fmt: skip
        with switchyard("up", tmp_path_factory.mktemp("protection"), models) as running:
            yield UrlStack(running, sims)
    finally:
        for sim in sims.values():
            sim.stop()


@pytest.fixture
def split(url_stack) -> Iterator[UrlStack]:
    """v2 running and 50/50 (set by hand, no rollout); v1=100 and v2 alive again after."""
    running, v2 = url_stack.running, url_stack.sims["v2"]
    if not v2.healthy():
        v2.stop()
        v2.start()
    status, body = running.api(
        "PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": 50, "v2": 50}}
    )
    assert status == 200, body
    yield url_stack
    v2.stop()
    v2.start()
    running.api("PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": 100, "v2": 0}})


def weights(running: Running) -> dict[str, int]:
    model = running.api("GET", f"/v1/models/{MODEL}")[1]
    return {version["name"]: version["weight"] for version in model["versions"]}


def serves_both(traffic: Traffic) -> bool:
    return {reply.version for reply in traffic.last(40)} >= {"v1", "v2"}


def stable_serves_alone(traffic: Traffic) -> bool:
    """The last 30 requests were all answered by v1 (at 50/50, chance once in a billion)."""
    last = traffic.last(30)
    return len(last) == 30 and all(r.version == "v1" and r.status == 200 for r in last)


def pinned_status(running: Running, version: str) -> tuple[int, str | None]:
    request = urllib.request.Request(
        f"{running.proxy}/v1/completions",
        data=b'{"model": "llama-3-8b", "prompt": "x", "max_tokens": 1}',
        headers={"Content-Type": "application/json", "x-switchyard-version": version},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("x-switchyard-version")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("x-switchyard-version")


def test_a_killed_canary_costs_no_request_but_those_in_flight(split):
    running, v2 = split.running, split.sims["v2"]
    with Traffic(running.proxy) as traffic:
        wait_until(lambda: serves_both(traffic), 10, message="both versions serving")
        v2.signal(signal.SIGKILL)
        v2.process.wait()
        killed_at = time.time()  # dead, its sockets closed
        wait_until(lambda: stable_serves_alone(traffic), 10, message="stable alone")
    failed = [reply for reply in traffic.replies if reply.status != 200]
    assert all(reply.sent < killed_at for reply in failed), failed  # only those in flight
    after = traffic.since(killed_at + 0.05)
    assert after and all(r.status == 200 and r.version == "v1" for r in after)
    assert weights(running) == {"v1": 50, "v2": 50}  # nobody moved the weights
    # A pinned request is never failed over: it asked for v2, which is gone.
    status, version = pinned_status(running, "v2")
    assert status == 503 and version == "v2"


def test_a_hung_canary_is_taken_out_by_envoys_health_checks(split):
    running, v2 = split.running, split.sims["v2"]
    with Traffic(running.proxy) as traffic:
        wait_until(lambda: serves_both(traffic), 10, message="both versions serving")
        failures = split.envoy_stat("v2", "health_check.failure")
        v2.signal(signal.SIGSTOP)  # the process hangs: connections open, nothing answers
        try:
            wait_until(lambda: stable_serves_alone(traffic), 15, message="stable alone")
            assert split.envoy_stat("v2", "health_check.failure") > failures
        finally:
            v2.signal(signal.SIGCONT)  # the requests stuck on it finish
    assert all(reply.status == 200 for reply in traffic.replies), [
        reply for reply in traffic.replies if reply.status != 200
    ]
    assert weights(running) == {"v1": 50, "v2": 50}


RETRYING = [
    {
        "name": MODEL,
        "retries": {"attempts": 2, "on_5xx": True},
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {}}},
        ],
    }
]


def test_retries_are_counted_a_half_failing_canary_is_rolled_back(tmp_path):
    with switchyard("up", tmp_path, RETRYING) as stack:
        candidate = stack.api("GET", f"/v1/models/{MODEL}")[1]["versions"][1]["endpoints"][0]
        with Load(stack.proxy) as load:
            rollout = canary(stack, {"max_error_rate": 0.1})
            http_json("POST", f"{candidate}/sim/faults", {"error_rate": 0.5})
            done = rolled_back(stack, rollout)
    assert done["weights"] == {"v1": 100, "v2": 0}
    assert "error_rate" in done["message"], done["message"]
    assert done["analysis_status"]["figures"]["candidate"]["retries"] > 0
    # Envoy retried the failed half on stable: clients saw (almost) nothing of it.
    failed = [status for _, _, status in load.statuses if status != 200]
    assert len(failed) <= max(1, len(load.statuses) // 100), (len(failed), len(load.statuses))
