"""Leader election with a coordination.k8s.io/v1 Lease: one controller replica acts at a time.

The algorithm of client-go's leaderelection: a candidate takes the Lease when it is free or
its holder stopped renewing it for `lease_duration_s` (measured on our own clock from when we
last saw the record change, so clocks need not agree); the leader renews every `retry_s`.
Every write carries the resourceVersion read, so two candidates never both win. Only the
leader runs the runtime and the rollout engine (and writes the state: service.py fences the
store with `is_leader`); the standby answers /healthz (alive) but not /readyz, so Services
only reach the leader.

Giving up in time does not depend on the API server answering. A renewal that succeeds
moves a local monotonic deadline to when that attempt *started* plus `renew_deadline_s`:
the record it wrote cannot be older than that start, so no standby can see it expire before
start + `lease_duration_s`, later than our deadline. `is_leader` is false from the deadline
on, a timer sets `lost` at it, and each API call is bounded by the time left (no client
retries), so a slow, hanging or dropping API server can make us stop early, never late.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import logging
import os
import socket
import time
from typing import Any

from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane import logs

log = logs.get("leader")
LEASE_NAME = "switchyard-controller"
CALL_TIMEOUT_S = 5.0  # one API call of a standby; a leader's get at most the time left


def default_identity() -> str:
    """The pod's name (SWITCHYARD_POD_NAME from the downward API), else the host name."""
    return os.environ.get("SWITCHYARD_POD_NAME") or socket.gethostname()


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        identity: str | None = None,
        name: str = LEASE_NAME,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_s: float = 2.0,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        assert renew_deadline_s < lease_duration_s, "the leader must give up before others take"
        # Our own client without retries: a call must fail when its time is up, not start over.
        configuration = copy.deepcopy(api_client.configuration)
        configuration.retries = False
        self.coordination = client.CoordinationV1Api(client.ApiClient(configuration))
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.name = name
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_s = retry_s
        self.call_timeout_s = call_timeout_s
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()  # set when a leader stops leading (then it should exit)
        self._deadline = 0.0  # time.monotonic() at which a leader stops acting
        self._timer: asyncio.TimerHandle | None = None
        self._observed: tuple[Any, float] | None = None  # (holder record, when it last changed)
        self._task: asyncio.Task | None = None

    @property
    def is_leader(self) -> bool:
        """True while this replica may act: elected, and its renew deadline not passed (read
        from the clock, so it turns false on time even if the event loop is busy)."""
        return (
            self.leading.is_set()
            and not self.lost.is_set()
            and time.monotonic() < self._deadline
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"leader-election-{self.identity}")

    async def wait_leading(self) -> None:
        await self.leading.wait()

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; a leader hands the Lease over at once when `release`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if release and self.is_leader:
            with contextlib.suppress(ApiException, OSError):
                await asyncio.to_thread(self._release)
            logs.event(log, "leader.released", identity=self.identity)
        self.lost.set()

    async def _run(self) -> None:
        while not self.lost.is_set():
            started = time.monotonic()
            try:
                held = await asyncio.to_thread(self._try_acquire_or_renew)
            except Exception as exc:  # API down or too slow: we cannot know, so we cannot renew
                logs.event(log, "leader.lease_error", logging.WARNING, error=str(exc)[:200])
                held = False
            if held:
                self._renewed(started)
            await asyncio.sleep(self.retry_s)

    def _renewed(self, started: float) -> None:
        """The Lease is ours as of `started`: lead (or keep leading) until the new deadline."""
        deadline = started + self.renew_deadline_s
        if self.lost.is_set() or time.monotonic() >= deadline:
            return  # too late: a leader that gave up never acts again (its process exits)
        self._deadline = deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(
            deadline - time.monotonic(), self._expire
        )
        if not self.leading.is_set():
            logs.event(log, "leader.elected", identity=self.identity, lease=self.name)
            self.leading.set()

    def _expire(self) -> None:
        """The renew deadline passed without a renewal: stop leading, whatever is in flight."""
        if self.leading.is_set() and not self.lost.is_set():
            logs.event(log, "leader.lost", logging.WARNING, identity=self.identity,
                       renew_deadline_s=self.renew_deadline_s)  # fmt: skip
            self.lost.set()

    def _call_timeout(self) -> float:
        """A leader's call must answer before its deadline (a later answer cannot help)."""
        if not self.leading.is_set():
            return self.call_timeout_s
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the renew deadline passed")
        return min(self.call_timeout_s, left)

    # -- one round, in a thread ------------------------------------------------------------------

    def _try_acquire_or_renew(self) -> bool:
        now = _micro_time()
        try:
            lease = self._read()
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._write(None, self._spec(now, now, transitions=0))
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder == self.identity:
            return self._write(lease, {**spec, "renewTime": now})
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, time.monotonic())
        duration = spec.get("leaseDurationSeconds") or self.lease_duration_s
        if holder and time.monotonic() - self._observed[1] < duration:
            return False  # someone else holds it and renews it
        transitions = (spec.get("leaseTransitions") or 0) + 1
        return self._write(lease, self._spec(now, now, transitions))

    def _spec(self, acquired: str, renewed: str, transitions: int) -> dict:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "acquireTime": acquired,
            "renewTime": renewed,
            "leaseTransitions": transitions,
        }

    def _read(self) -> dict:
        response = self.coordination.read_namespaced_lease(
            self.name, self.namespace, _preload_content=False,
            _request_timeout=self._call_timeout(),
        )  # fmt: skip
        return json.loads(response.data)

    def _write(self, current: dict | None, spec: dict) -> bool:
        """Create or replace the Lease; False when another candidate wrote first (409)."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        }
        try:
            if current is None:
                self.coordination.create_namespaced_lease(
                    self.namespace, body, _preload_content=False,
                    _request_timeout=self._call_timeout(),
                )  # fmt: skip
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.coordination.replace_namespaced_lease(
                    self.name, self.namespace, body, _preload_content=False,
                    _request_timeout=self._call_timeout(),
                )  # fmt: skip
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _release(self) -> None:
        lease = self._read()
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return
        released = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1}
        self._write(lease, {key: value for key, value in released.items() if value is not None})


def _micro_time() -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def serve_standby(host: str, port: int) -> web.AppRunner:
    """While waiting to lead: /healthz answers 200 (alive, so not restarted) and /readyz 503
    (so the Services send nothing here). Clean it up before the real admin API binds."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": "standby"})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "standby: another replica leads"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
