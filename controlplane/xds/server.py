"""The ADS server (state of the world, over one gRPC stream per Envoy).

The server owns the transport: per stream and per type it keeps the nonce it sent, the
version the Envoy ACKed and any NACK. It serves whatever snapshot is current, in
make-before-break order (clusters, endpoints, listeners, routes), waits for a type's ACK
before sending it again (so rapid changes coalesce), and never resends a version an Envoy
NACKed. `wait_applied` lets the admin API answer only once every Envoy runs a change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import logs, metrics
from controlplane.errors import AckTimeout, EnvoyRejected
from controlplane.events import EventBus
from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    SHORT_NAMES,
    TYPE_ORDER,
    WILDCARD_TYPES,
    Snapshot,
)

log = logs.get("xds")
# Types whose ACK must arrive before later types are sent: a route may only name warm clusters.
WARMING_TYPES = (CLUSTER, ENDPOINT)


@dataclass
class TypeState:
    """One resource type on one stream."""

    names: frozenset[str] | None = None  # None: wildcard (all resources)
    nonce: str | None = None  # of the last response sent
    pending: bool = False  # last response neither ACKed nor NACKed yet
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    sent_at: float = 0.0
    acked_version: str | None = None
    nack: dict | None = None  # {"version", "message"} of the last rejected response
    force: bool = False  # resend even if unchanged (EDS after a CDS change)

    def to_json(self) -> dict:
        return {"acked_version": self.acked_version, "nack": self.nack, "pending": self.pending}


@dataclass
class EnvoyStream:
    key: str
    node_id: str = ""
    node_cluster: str = ""
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def applied(self, snapshot: Snapshot) -> bool:
        return all(ts.acked_version == snapshot.versions[t] for t, ts in self.types.items())

    def rejected(self, snapshot: Snapshot) -> tuple[str, dict] | None:
        for type_url, ts in self.types.items():
            if ts.nack and ts.nack["version"] == snapshot.versions[type_url]:
                return type_url, ts.nack
        return None

    @property
    def running(self) -> bool:
        """It runs something of ours: it ACKed at least one response (or reconnected with a
        version it still runs)."""
        return any(ts.acked_version is not None for ts in self.types.values())

    def to_json(self) -> dict:
        return {
            "node_id": self.node_id,
            "node_cluster": self.node_cluster,
            "stream": self.key,
            "connected_at": self.connected_at,
            "types": {SHORT_NAMES[t]: ts.to_json() for t, ts in self.types.items()},
        }


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, events: EventBus | None = None) -> None:
        self.snapshot: Snapshot | None = None
        self.streams: dict[str, EnvoyStream] = {}
        self._events = events or EventBus()
        self._changed = asyncio.Condition()
        self._nonces = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        services: Iterable[Callable[[grpc.aio.Server], None]] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        """Listen for ADS, and for each of `services` (an `add_to(server)`) on the same port;
        with `credentials` (controlplane.tls), only over mutual TLS."""
        self._server = grpc.aio.server(
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
                # gRPC binds with SO_REUSEPORT by default: a second control plane on this port
                # would start "fine" and silently take half of the Envoys. Make it fail instead.
                ("grpc.so_reuseport", 0),
            ]
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        for add_to in services:
            add_to(self._server)
        try:
            address = f"{host}:{port}"
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises (rather than returning 0) when bind fails
            self.port = None
        if not self.port:
            raise OSError(f"cannot listen for xDS on {host}:{port} (address in use or unavailable)")
        await self._server.start()
        logs.event(log, "xds.listening", address=f"{host}:{self.port}", tls=credentials is not None)
        return self.port

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve ADS on a gRPC server shared with other services (LRS, metrics)."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)

    # -- publishing --------------------------------------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current and push it to every stream."""
        self.snapshot = snapshot
        for stream in self.streams.values():
            stream.wake.set()

    async def wait_applied(self, snapshot: Snapshot, timeout: float = 10.0) -> int:
        """Return the number of Envoys once every one that serves our configuration runs
        `snapshot`.

        Raises EnvoyRejected as soon as one NACKs it, AckTimeout if they take too long.
        Envoys that disconnect meanwhile are not waited for, nor are those that have not
        ACKed anything yet: they serve nothing of ours, and get the newest snapshot anyway.
        So a client that connects and never ACKs (or NACKs everything) cannot hold changes
        back; an Envoy that runs our configuration and then stops answering, or refuses a
        change, does (docs/security.md).
        """

        def settled() -> bool:
            return all(s.applied(snapshot) or s.rejected(snapshot) for s in self._active())

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(settled), timeout)
            except TimeoutError:
                late = [s.node_id for s in self._active() if not s.applied(snapshot)]
                raise AckTimeout(
                    f"Envoys {late} did not confirm configuration {snapshot.version} in {timeout}s"
                ) from None
        for stream in self._active():
            rejection = stream.rejected(snapshot)
            if rejection:
                type_url, nack = rejection
                raise EnvoyRejected(
                    f"Envoy {stream.node_id} rejected the {SHORT_NAMES[type_url]} update: "
                    f"{nack['message']}"
                )
        return len(self._active())

    def _active(self) -> list[EnvoyStream]:
        """The Envoys serving a configuration of ours: those a change must reach."""
        return [stream for stream in self.streams.values() if stream.running]

    def envoys(self) -> list[dict]:
        return [stream.to_json() for stream in self.streams.values()]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- the gRPC stream ---------------------------------------------------------------------

    async def StreamAggregatedResources(self, request_iterator, context):
        stream = EnvoyStream(key=f"stream-{next(self._stream_ids)}")
        self.streams[stream.key] = stream
        metrics.xds_connected.set(len(self.streams))
        writer = asyncio.create_task(self._write_loop(stream, context), name=f"xds-{stream.key}")
        try:
            async for request in request_iterator:
                await self._on_request(stream, request)
                if writer.done():
                    break
        except asyncio.CancelledError:
            pass
        finally:
            writer.cancel()
            self.streams.pop(stream.key, None)
            metrics.xds_connected.set(len(self.streams))
            logs.event(log, "xds.disconnected", node=stream.node_id, stream=stream.key)
            await self._notify()

    async def _on_request(
        self, stream: EnvoyStream, request: discovery_pb2.DiscoveryRequest
    ) -> None:
        if not stream.node_id and request.node.id:
            stream.node_id, stream.node_cluster = request.node.id, request.node.cluster
            logs.event(log, "xds.connected", node=stream.node_id, stream=stream.key)
        type_url = request.type_url
        if type_url not in TYPE_ORDER:
            logs.event(log, "xds.unknown_type", logging.WARNING, node=stream.node_id, type=type_url)
            return
        ts = stream.types.setdefault(type_url, TypeState())
        if request.response_nonce and request.response_nonce != ts.nonce:
            return  # stale: an answer to a response we have since superseded
        if request.response_nonce:
            self._on_answer(stream, type_url, ts, request)
        elif request.version_info and ts.acked_version is None:
            ts.acked_version = request.version_info  # reconnect: what the Envoy still runs
        names = None if type_url in WILDCARD_TYPES else frozenset(request.resource_names)
        ts.names = names
        stream.wake.set()
        await self._notify()

    def _on_answer(self, stream: EnvoyStream, type_url: str, ts: TypeState, request) -> None:
        ts.pending = False
        short = SHORT_NAMES[type_url]
        if request.HasField("error_detail"):
            ts.nack = {"version": ts.sent_version, "message": request.error_detail.message}
            metrics.xds_nacks.labels(short).inc()
            logs.event(
                log,
                "xds.nack",
                logging.WARNING,
                node=stream.node_id,
                type=short,
                version=ts.sent_version,
                message=request.error_detail.message,
            )
            self._events.publish(
                "xds.nack",
                node=stream.node_id,
                type=short,
                version=ts.sent_version,
                message=request.error_detail.message,
            )
        else:
            ts.acked_version = request.version_info
            ts.nack = None
            metrics.xds_acks.labels(short).inc()
            metrics.xds_ack_latency.labels(short).observe(time.perf_counter() - ts.sent_at)

    async def _write_loop(self, stream: EnvoyStream, context) -> None:
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            if self.snapshot is not None:
                await self._send_due(stream, context, self.snapshot)

    async def _send_due(self, stream: EnvoyStream, context, snapshot: Snapshot) -> None:
        warming = False
        for type_url in TYPE_ORDER:
            ts = stream.types.get(type_url)
            if ts is None:
                continue
            if warming and type_url != ENDPOINT:
                return  # listeners and routes wait for warm clusters: make before break
            if not ts.pending and self._due(ts, snapshot.versions[type_url]):
                await self._send(stream, context, snapshot, type_url, ts)
                if type_url == CLUSTER and ENDPOINT in stream.types:
                    stream.types[ENDPOINT].force = True
            # Endpoints are part of a cluster's warming: Envoy ACKs a new cluster only once
            # its endpoints came, so EDS goes out while CDS waits for its ACK.
            warming = warming or (ts.pending and type_url in WARMING_TYPES)

    @staticmethod
    def _due(ts: TypeState, version: str) -> bool:
        if ts.force:
            return True
        if ts.sent_version == version and ts.sent_names == ts.names:
            return False
        rejected = ts.nack is not None and ts.nack["version"] == version
        return not (rejected and ts.sent_names == ts.names)  # never resend what was NACKed

    async def _send(
        self, stream, context, snapshot: Snapshot, type_url: str, ts: TypeState
    ) -> None:
        response = discovery_pb2.DiscoveryResponse()
        response.CopyFrom(snapshot.response(type_url, ts.names))
        response.nonce = str(next(self._nonces))
        ts.nonce, ts.pending, ts.force = response.nonce, True, False
        ts.sent_version, ts.sent_names = snapshot.versions[type_url], ts.names
        ts.sent_at = time.perf_counter()
        await context.write(response)
        metrics.xds_pushes.labels(SHORT_NAMES[type_url]).inc()
