"""kmock's KubernetesEmulator, extended with the API-server behaviour the runtime relies on.

kmock stores objects and streams watch events, but keeps no metadata and knows no concurrency
control. This subclass adds, as a real API server does: `uid`, `namespace`,
`creationTimestamp`, `generation` and a cluster-wide `resourceVersion` on every write; 409
Conflict on a stale `metadata.resourceVersion` and on creating an existing name; PUT
(replace); the `status` subresource (status writes change only status, other writes never
change it); lists with a resourceVersion and watches that resume from one; and 410 Gone for
a watch older than the compacted history (`expire_watches`). Faults for tests:
`conflict_next` (another writer gets in first), `fail_next` (5xx), `slow` (an API server
under load: requests wait before they are applied, answers come late or never). No garbage
collector: tests assert owner references and the controller's own cleanup.

Everything is served over real HTTP by `kmock.Server` and driven by the real `kubernetes`
client; `api_client()` builds one for the emulator's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
from kmock._internal import dicts, enums, rendering
from kubernetes import client


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message}  # fmt: skip


GONE = status(410, "Expired", "too old resource version")


def _error(code: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details={})


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _rv: int = attrs.field(default=0, init=False)
    _events: list[tuple[int, Any, dict]] = attrs.field(factory=list, init=False)
    _compacted: int = attrs.field(default=0, init=False)
    _epoch: int = attrs.field(default=0, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _faults: list[tuple[str, str | None, int]] = attrs.field(factory=list, init=False)
    _lag: tuple[str | None, float, float, random.Random] | None = attrs.field(
        default=None, init=False
    )
    _healed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    conflicts: int = attrs.field(default=0, init=False)  # 409s answered for stale writes
    dropped: int = attrs.field(default=0, init=False)  # answers never sent (see `slow`)

    # -- test controls ---------------------------------------------------------------------

    async def expire_watches(self, silently=None) -> None:
        """Compact the history: open watches get an ERROR 410 and end; resuming from any
        resourceVersion seen so far answers 410, so clients must relist. `silently(emulator)`
        runs first: changes it makes produce no watch event (as if lost in the compaction)."""
        async with self._changed:
            if silently is not None:
                silently(self)
            self._compacted = self._rv = self._rv + 1
            self._events.clear()
            self._epoch += 1
            self._changed.notify_all()

    def conflict_next(self, plural: str, count: int = 1) -> None:
        """The next `count` writes to `plural` find that someone else wrote first (409)."""
        self._faults.extend([("conflict", plural, 409)] * count)

    def fail_next(self, plural: str | None = None, count: int = 1, code: int = 500) -> None:
        """The next `count` requests (to `plural`, or any) fail with `code`."""
        self._faults.extend([("fail", plural, code)] * count)

    def slow(
        self, plural: str | None = None, max_delay_s: float = 1.0, drop: float = 0.0, seed: int = 0
    ) -> None:
        """From now on, each request (to `plural`, or any) waits a random 0-`max_delay_s`
        before it is applied and as long again before its answer leaves; with probability
        `drop` it is applied and its answer never comes (the client times out). `heal()`
        ends it, and releases every request held."""
        self._lag = (plural, max_delay_s, drop, random.Random(seed))
        self._healed.clear()

    def heal(self) -> None:
        self._lag = None
        self._healed.set()

    async def _hold(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._healed.wait(), seconds)

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        """The stored object (a copy), or None."""
        for (resource, ns, obj_name), obj in self.objects.items():
            if resource.plural == plural and ns == namespace and obj_name == name:
                return None if obj.deleted else copy.deepcopy(obj.raw)
        return None

    def items(self, plural: str, namespace: str) -> list[dict]:
        return [
            copy.deepcopy(obj.raw)
            for (resource, ns, _), obj in self.objects.items()
            if resource.plural == plural and ns == namespace and not obj.deleted
        ]

    def put_silently(self, resource: Any, namespace: str, body: dict) -> None:
        """Store an object without a watch event (use inside `expire_watches(silently=...)`)."""
        self._store(resource, namespace, body["metadata"]["name"], self._stamp(body, namespace))

    # -- the API server ----------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        lag = self._lag
        if lag is None or request.resource is None or lag[0] not in (None, request.resource.plural):
            return await self._serve(request)
        _, max_delay_s, drop, rng = lag
        before, after, lost = rng.uniform(0, max_delay_s), rng.uniform(0, max_delay_s), rng.random()
        await self._hold(before)
        response = await self._serve(request)
        if lost < drop:
            self.dropped += 1
            await self._hold(3600)  # until healed: the client gave up long before
        else:
            await self._hold(after)
        return response

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None:
            return await super()._handle(request)
        writes = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        write = request.action in writes or (request.method == enums.method.PUT and request.name)
        fault = self._take_fault(request, bool(write))
        if fault is not None and fault[0] == "fail":
            raise _error(fault[1], "InternalError", "injected failure")
        if not write:
            return await super()._handle(request)  # list, fetch, watch: served below
        async with self._changed:
            if fault is not None:
                self._touch(request)
            body, code = self._write(request)
            self._changed.notify_all()
        return aiohttp.web.json_response(body, status=code)

    def _take_fault(self, request: rendering.Request, write: bool) -> tuple[str, int] | None:
        for index, (kind, plural, code) in enumerate(self._faults):
            if plural not in (None, request.resource.plural):
                continue
            if kind == "conflict" and not (write and request.name):
                continue
            del self._faults[index]
            return kind, code
        return None

    def _touch(self, request: rendering.Request) -> None:
        """Someone else updated the object just before this request."""
        key = self._key(request.resource, request.namespace, request.name)
        if key is not None:
            current = copy.deepcopy(self.objects[key].raw)
            current["metadata"]["resourceVersion"] = str(self._next_rv())
            self.objects[key].create(current)

    def _write(self, request: rendering.Request) -> tuple[dict, int]:
        resource, namespace, data = request.resource, request.namespace, request.data
        if request.action == enums.action.CREATE:
            name = (data.get("metadata") or {}).get("name")
            if self._key(resource, namespace, name) is not None:
                raise _error(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
            obj = self._stamp(data, namespace)
            self._store(resource, namespace, name, obj)
            self._record(resource, "ADDED", obj)
            return obj, 201
        key = self._key(resource, namespace, request.name)
        if key is None:
            raise _error(404, "NotFound", f'{resource.plural} "{request.name}" not found')
        current = copy.deepcopy(self.objects[key].raw)
        if request.action == enums.action.DELETE:
            self.objects[key].delete()
            current["metadata"]["resourceVersion"] = str(self._next_rv())
            self._record(resource, "DELETED", current)
            return current, 200
        wanted = (data.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            self.conflicts += 1
            raise _error(
                409, "Conflict",
                f'Operation cannot be fulfilled on {resource.plural} "{request.name}": the object '
                "has been modified; please apply your changes to the latest version and try again",
            )  # fmt: skip
        if request.method == enums.method.PUT:
            new = copy.deepcopy(data)
            new["metadata"] = {**current["metadata"], **(data.get("metadata") or {})}
        else:
            new = dict(dicts.patch_dict(current, data))
        if request.subresource == "status":
            new = {**current, "status": new.get("status", {})}
        else:
            new = {key: value for key, value in new.items() if key != "status"}
            if "status" in current:
                new["status"] = current["status"]
            if new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = str(self._next_rv())
        self.objects[key].create(new)
        self._record(resource, "MODIFIED", new)
        return new, 200

    def _key(self, resource: Any, namespace: str | None, name: str | None):
        key = (resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return key
        return None

    def _stamp(self, data: dict, namespace: str | None) -> dict:
        obj = copy.deepcopy(data)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta["uid"] = str(uuid.uuid4())
        meta["generation"] = 1
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        meta["creationTimestamp"] = now.isoformat().replace("+00:00", "Z")
        meta["resourceVersion"] = str(self._next_rv())
        return obj

    def _store(self, resource: Any, namespace: str | None, name: str, obj: dict) -> None:
        key = (resource, namespace, name)
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, resource: Any, kind: str, obj: dict) -> None:
        self._events.append((int(obj["metadata"]["resourceVersion"]), resource, {
            "type": kind, "object": copy.deepcopy(obj)}))  # fmt: skip

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        return {
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": self._matching(request),
        }

    def _matching(self, request: rendering.Request) -> list[dict]:
        return [
            copy.deepcopy(obj.raw)
            for (resource, namespace, name), obj in self.objects.items()
            if resource == request.resource and not obj.deleted
            and request.namespace in (None, namespace) and request.name in (None, name)
        ]

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        since_param = request.params.get("resourceVersion") or "0"
        epoch = self._epoch
        if since_param == "0":
            for obj in self._matching(request):
                yield {"type": "ADDED", "object": obj}
            since = self._rv
        else:
            since = int(since_param)
            if since < self._compacted:
                yield {"type": "ERROR", "object": GONE}
                return
        timeout = float(request.params.get("timeoutSeconds") or 3600)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    left = deadline - asyncio.get_running_loop().time()
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda s=since: self._rv > s or self._epoch > epoch),
                        max(left, 0.001),
                    )
                if self._epoch != epoch:
                    events = [{"type": "ERROR", "object": GONE}]
                else:
                    events = [
                        event for rv, resource, event in self._events
                        if rv > since and resource == request.resource
                        and request.namespace in (None, event["object"]["metadata"]["namespace"])
                    ]  # fmt: skip
                    since = self._rv
            for event in events:
                yield event
            if self._epoch != epoch or asyncio.get_running_loop().time() >= deadline:
                return


class _QuickStopServer(aiohttp.test_utils.RawTestServer):
    """aiohttp waits up to 60 s at shutdown for handlers still running: a watch whose
    client went away without closing its connection would hold a test that long."""

    async def _make_runner(self, **kwargs):
        runner = await super()._make_runner(**kwargs)
        runner._shutdown_timeout = 1.0
        return runner


@contextlib.asynccontextmanager
async def serve() -> AsyncIterator[tuple[Emulator, str]]:
    """An Emulator on a free port: (emulator, base URL)."""
    async with (
        Emulator() as emulator,
        kmock.Server(emulator, server_cls=_QuickStopServer) as server,
    ):
        try:
            yield emulator, str(server.url).rstrip("/")
        finally:
            emulator.heal()  # held requests end before the server stops


def api_client(url: str) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)



def resource_of(group: str, version: str, plural: str) -> kmock.resource:
    """The key kmock stores objects of that resource under."""
    return kmock.resource(group=group, version=version, plural=plural)
