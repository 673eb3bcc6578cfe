"""The ADS server (state of the world, over one gRPC stream per Envoy).

The server owns the transport: per stream and per type it keeps the nonce it sent, the
version the Envoy ACKed and any NACK. It serves whatever snapshot is current, in
make-before-break order (clusters, endpoints, listeners, routes), waits for a type's ACK
before sending it again (so rapid changes coalesce), and never resends a version an Envoy
NACKed. `wait_applied` lets the admin API answer only once every Envoy runs a change.

The transport is controlplane/xds/transport.py (ADR 0006): a change is written to every
stream by `publish` itself, and an Envoy's answer handled as it is read, with no task per
stream and no hand-off to other threads.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

from envoy.service.discovery.v3 import discovery_pb2

from controlplane import logs, metrics
from controlplane.errors import AckTimeout, EnvoyRejected
from controlplane.events import EventBus
from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    PARTIAL_TYPES,
    SHORT_NAMES,
    TYPE_ORDER,
    WILDCARD_TYPES,
    Packed,
    Snapshot,
)
from controlplane.xds.transport import INTERNAL, Call, Framed, GrpcServer, Opener

log = logs.get("xds")
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADS_METHOD = f"/{ADS_SERVICE}/StreamAggregatedResources"
# How many past versions per type are kept to send an Envoy only what changed since the one
# it runs (an Envoy further behind gets everything).
HISTORY = 16
# Requests remembered parsed, by their bytes (_AdsCall.on_message): a few per change.
PARSED_REQUESTS = 256


@dataclass(slots=True)
class TypeState:
    """One resource type on one stream (slots: each change reads a thousand of them, and
    one object is fewer cache misses than an object and its dict)."""

    names: frozenset[str] | None = None  # None: wildcard (all resources)
    names_key: bytes = b""  # the request that gave `names`, reduced to them (_subscription)
    nonce: str | None = None  # of the last response sent
    pending: bool = False  # last response neither ACKed nor NACKed yet
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    sent_at: float = 0.0
    acked_version: str | None = None
    nack: dict | None = None  # {"version", "message"} of the last rejected response
    force: bool = False  # resend even if unchanged (EDS after a CDS change)
    warming: bool = False  # the pending response completes new clusters (EDS after CDS)
    # The publication (XdsServer.publish, counted) the last response sent / ACKed came from:
    # an Envoy that ACKed a later one runs every earlier change too.
    sent_seq: int = 0
    acked_seq: int = 0

    def to_json(self) -> dict:
        return {"acked_version": self.acked_version, "nack": self.nack, "pending": self.pending}


@dataclass(eq=False)
class _Waiter:
    """One wait_applied: the streams it still waits for."""

    snapshot: Snapshot
    seq: int
    done: asyncio.Future
    pending: set[str] = field(default_factory=set)
    rejected_by: EnvoyStream | None = None  # the first Envoy found to NACK it


@dataclass(slots=True)
class EnvoyStream:
    key: str
    node_id: str = ""
    node_cluster: str = ""
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)
    call: Call | None = None  # its gRPC call: where responses are written
    # It runs something of ours: it ACKed at least one response (or reconnected with a
    # version it still runs). Only those are waited for.
    running: bool = False
    nacks: int = 0  # types whose last answer was a NACK (most streams: none to look for)
    # Something may be due once an answer comes (a type was pending or waited for warm
    # clusters when last looked at): only then does an ACK look at every type again.
    deferred: bool = False

    def applied(self, snapshot: Snapshot, seq: int = 0) -> bool:
        """It runs `snapshot` (published as number `seq`), or a later publication: a
        change superseded before this Envoy answered counts as applied by the newer one."""
        versions = snapshot.versions
        for type_url, ts in self.types.items():  # a loop, not all(): called per ACK
            if ts.acked_version != versions[type_url] and not (seq and ts.acked_seq >= seq):
                return False
        return True

    def rejected(self, snapshot: Snapshot) -> tuple[str, dict] | None:
        if not self.nacks:
            return None
        for type_url, ts in self.types.items():
            if ts.nack and ts.nack["version"] == snapshot.versions[type_url]:
                return type_url, ts.nack
        return None

    def to_json(self) -> dict:
        return {
            "node_id": self.node_id,
            "node_cluster": self.node_cluster,
            "stream": self.key,
            "connected_at": self.connected_at,
            "types": {SHORT_NAMES[t]: ts.to_json() for t, ts in self.types.items()},
        }


class XdsServer:
    def __init__(self, events: EventBus | None = None) -> None:
        self.snapshot: Snapshot | None = None
        self._history: OrderedDict[tuple[str, str], Packed] = OrderedDict()
        self._seq = 0  # publications so far
        self._seq_of: OrderedDict[str, int] = OrderedDict()  # snapshot version -> last seq
        self.streams: dict[str, EnvoyStream] = {}
        self._events = events or EventBus()
        self._waiters: set[_Waiter] = set()  # the wait_applied calls under way
        self._nonces = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._server: GrpcServer | None = None
        self.port: int | None = None
        # During publish: each response sent, with the nonce and frames every stream it
        # goes to shares (payload -> (nonce, Framed)).
        self._shared: dict[bytes, tuple[str, Framed]] | None = None
        self._parsed: dict[bytes, _Request] = {}  # requests without a node, by their bytes
        self._tallies = {short: _Tally() for short in SHORT_NAMES.values()}
        self._fold_due = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        services: Iterable[dict[str, Opener]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        """Listen for ADS, and for the methods of each of `services` on the same port (the
        stats push); with `ssl_context` (controlplane.tls), only over mutual TLS."""
        methods = self.methods()
        for more in services:
            methods.update(more)
        self._server = GrpcServer(methods, ssl_context)
        try:
            self.port = await self._server.start(host, port)
        except OSError as exc:
            self.port = None
            raise OSError(
                f"cannot listen for xDS on {host}:{port} (address in use or unavailable)"
            ) from exc
        logs.event(log, "xds.listening", address=f"{host}:{self.port}", tls=ssl_context is not None)
        return self.port

    def methods(self) -> dict[str, Opener]:
        """ADS, for a GrpcServer (shared with other services: the stats push).

        Responses go out as bytes: each is serialized once per change (Snapshot.payload)
        and shared by every stream, which only appends its nonce."""
        return {ADS_METHOD: self._open}

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        self._fold()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current and push it to every stream.

        Every stream sent the same response in this call gets the same nonce and the same
        framed bytes: the loop does little per stream but the write, and the Envoys' ACKs
        of it are byte for byte the same (_AdsCall.on_message parses one of them)."""
        self.snapshot = snapshot
        self._seq += 1
        self._seq_of[snapshot.version] = self._seq
        self._seq_of.move_to_end(snapshot.version)
        if len(self._seq_of) > HISTORY:
            self._seq_of.popitem(last=False)
        for type_url, packed in snapshot.packed.items():
            self._history[(type_url, packed.version)] = packed
            self._history.move_to_end((type_url, packed.version))
        while len(self._history) > HISTORY * len(TYPE_ORDER):
            self._history.popitem(last=False)
        self._shared = {}
        try:
            for stream in list(self.streams.values()):
                try:
                    self._send_due(stream, snapshot)
                except Exception as exc:  # one broken stream must not keep the change from the rest
                    logs.event(log, "xds.push_failed", logging.ERROR, node=stream.node_id,
                               stream=stream.key, error=repr(exc))  # fmt: skip
                    stream.call.close(INTERNAL, "the server failed to push")
        finally:
            self._shared = None

    async def wait_applied(self, snapshot: Snapshot, timeout: float = 10.0) -> int:
        """Return the number of Envoys once every one that serves our configuration runs
        `snapshot`.

        Raises EnvoyRejected as soon as one NACKs it, AckTimeout if they take too long.
        Envoys that disconnect meanwhile are not waited for, nor are those that have not
        ACKed anything yet: they serve nothing of ours, and get the newest snapshot anyway.
        So a client that connects and never ACKs (or NACKs everything) cannot hold changes
        back; an Envoy that runs our configuration and then stops answering, or refuses a
        change, does (docs/security.md). Each answer is checked against the waits it
        concerns only, so waiting costs O(1) per ACK whatever the number of Envoys.
        """
        seq = self._seq_of.get(snapshot.version, 0)
        waiter = _Waiter(snapshot, seq, asyncio.get_running_loop().create_future())
        for stream in self._active():
            if stream.applied(snapshot, seq):
                continue
            if stream.rejected(snapshot):
                waiter.rejected_by = stream
                break
            waiter.pending.add(stream.key)
        if waiter.pending and waiter.rejected_by is None:
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter.done, timeout)
            except TimeoutError:
                late = [self.streams[k].node_id for k in waiter.pending if k in self.streams]
                logs.event(log, "xds.ack_timeout", logging.WARNING, envoys=late,
                           snapshot=snapshot.version, types=[self.streams[k].to_json()["types"]
                                                             for k in waiter.pending
                                                             if k in self.streams])  # fmt: skip
                raise AckTimeout(
                    f"Envoys {late} did not confirm configuration {snapshot.version} in {timeout}s"
                ) from None
            finally:
                self._waiters.discard(waiter)
        stream = waiter.rejected_by
        rejection = stream.rejected(snapshot) if stream is not None else None
        if rejection:
            type_url, nack = rejection
            raise EnvoyRejected(
                f"Envoy {stream.node_id} rejected the {SHORT_NAMES[type_url]} update: "
                f"{nack['message']}"
            )
        return len(self._active())

    def _settle(self, stream: EnvoyStream, gone: bool = False, nack: bool = False) -> None:
        """An answer from `stream` (`nack`: a NACK), or its end: release the waits it was
        the last one of, at once for a NACK. (Only a NACK can make a stream reject a
        change: an earlier one ended the wait it concerns, or kept it from starting.)"""
        for waiter in self._waiters:
            if stream.key not in waiter.pending:
                continue
            rejected = nack and stream.rejected(waiter.snapshot)
            if rejected:
                waiter.rejected_by = stream
            if gone or rejected or stream.applied(waiter.snapshot, waiter.seq):
                waiter.pending.discard(stream.key)
                if (rejected or not waiter.pending) and not waiter.done.done():
                    waiter.done.set_result(None)

    def _active(self) -> list[EnvoyStream]:
        """The Envoys serving a configuration of ours: those a change must reach."""
        return [stream for stream in self.streams.values() if stream.running]

    def envoys(self) -> list[dict]:
        return [stream.to_json() for stream in self.streams.values()]

    # -- metrics -----------------------------------------------------------------------------

    def _tally(self, short: str) -> _Tally:
        """The type's counts since the last fold into prometheus, which is due at the end
        of this turn of the event loop: a push or an ACK costs an addition, and prometheus
        (a lock and a call per update) is paid once for all the ACKs read in one turn."""
        if not self._fold_due:
            try:
                asyncio.get_running_loop().call_soon(self._fold)
                self._fold_due = True
            except RuntimeError:  # off an event loop (publish in a test): with the next fold
                pass
        return self._tallies[short]

    def _fold(self) -> None:
        self._fold_due = False
        for short, tally in self._tallies.items():
            if tally.pushes or tally.ack_latencies:
                series = _series(short)
                if tally.pushes:
                    series.pushes.inc(tally.pushes)
                    series.pushed_bytes.inc(tally.pushed_bytes)
                    tally.pushes = tally.pushed_bytes = 0
                if tally.ack_latencies:
                    series.acks.inc(len(tally.ack_latencies))
                    _observe_all(series.ack_latency, tally.ack_latencies)
                    tally.ack_latencies = []

    # -- the gRPC stream ---------------------------------------------------------------------

    def _open(self, call: Call) -> _AdsCall:
        stream = EnvoyStream(key=f"stream-{next(self._stream_ids)}", call=call)
        self.streams[stream.key] = stream
        metrics.xds_connected.set(len(self.streams))
        return _AdsCall(self, stream)

    def _closed(self, stream: EnvoyStream) -> None:
        if self.streams.pop(stream.key, None) is None:
            return
        metrics.xds_connected.set(len(self.streams))
        logs.event(log, "xds.disconnected", node=stream.node_id, stream=stream.key)
        self._settle(stream, gone=True)

    def _on_request(self, stream: EnvoyStream, request: _Request) -> None:
        if not stream.node_id and request.node_id:
            stream.node_id, stream.node_cluster = request.node_id, request.node_cluster
            logs.event(log, "xds.connected", node=stream.node_id, stream=stream.key)
        type_url = request.type_url
        if type_url not in TYPE_ORDER:
            logs.event(log, "xds.unknown_type", logging.WARNING, node=stream.node_id, type=type_url)
            return
        ts = stream.types.get(type_url)
        if ts is None:
            ts = stream.types[type_url] = TypeState()
        nonce = request.nonce
        if nonce and nonce != ts.nonce:
            return  # stale: an answer to a response we have since superseded
        if nonce:
            self._on_answer(stream, type_url, ts, request)
        elif request.version and ts.acked_version is None:
            ts.acked_version = request.version  # reconnect: what the Envoy still runs
            stream.running = True
        resubscribed = False
        if type_url in WILDCARD_TYPES:
            ts.names = None
        elif request.names_key != ts.names_key:
            # Every ACK repeats the whole subscription (at 1,000 models, 1,002 route
            # configuration names): the set is made again only when it changed, and stays
            # the same object, which the checks below and the payload cache compare at once.
            ts.names, ts.names_key = request.names(), request.names_key
            resubscribed = True
        # An ACK of what is current, with the same names, leaves nothing to send unless
        # something waited for it (stream.deferred): the common case, looked at no further.
        if self.snapshot is not None and (not nonce or resubscribed or stream.deferred):
            self._send_due(stream, self.snapshot)
        if nonce:
            self._settle(stream, nack=request.error is not None)

    def _on_answer(self, stream: EnvoyStream, type_url: str, ts: TypeState, request) -> None:
        ts.pending = False
        short = SHORT_NAMES[type_url]
        if request.error is not None:
            stream.nacks += ts.nack is None
            ts.nack = {"version": ts.sent_version, "message": request.error}
            metrics.xds_nacks.labels(short).inc()
            logs.event(
                log,
                "xds.nack",
                logging.WARNING,
                node=stream.node_id,
                type=short,
                version=ts.sent_version,
                message=request.error,
            )
            self._events.publish(
                "xds.nack",
                node=stream.node_id,
                type=short,
                version=ts.sent_version,
                message=request.error,
            )
        else:
            ts.acked_version, ts.acked_seq = request.version, ts.sent_seq
            stream.running = True
            if ts.nack is not None:
                stream.nacks -= 1
                ts.nack = None
            self._tally(short).ack_latencies.append(time.perf_counter() - ts.sent_at)

    def _send_due(self, stream: EnvoyStream, snapshot: Snapshot) -> None:
        warming = False
        types, versions = stream.types, snapshot.versions
        stream.deferred = False
        for type_url in TYPE_ORDER:
            ts = types.get(type_url)
            if ts is None:
                continue
            if warming and type_url != ENDPOINT:
                stream.deferred = True
                return  # listeners and routes wait for warm clusters: make before break
            pending, version = ts.pending, versions[type_url]
            # Sent as it is: what most types are, on every push and ACK (else maybe due).
            unsent = ts.force or ts.sent_version != version or ts.sent_names is not ts.names
            if pending and unsent:
                stream.deferred = True  # due once answered, maybe
            if not pending and unsent and self._due(ts, version):
                ts.warming = ts.force
                self._send(stream, snapshot, type_url, ts)
                pending = True
                if type_url == CLUSTER and ENDPOINT in types:
                    types[ENDPOINT].force = True
            # Endpoints are part of a cluster's warming: Envoy ACKs a new cluster only once
            # its endpoints came, so EDS goes out while CDS waits for its ACK. Endpoint changes
            # of existing clusters hold nothing back: a weight change never queues behind them.
            if pending and (type_url == CLUSTER or (type_url == ENDPOINT and ts.warming)):
                warming = True

    @staticmethod
    def _due(ts: TypeState, version: str) -> bool:
        if ts.force:
            return True
        same_names = ts.sent_names is ts.names or ts.sent_names == ts.names
        if ts.sent_version == version and same_names:
            return False
        rejected = ts.nack is not None and ts.nack["version"] == version
        return not (rejected and same_names)  # never resend what was NACKed

    def _send(self, stream: EnvoyStream, snapshot: Snapshot, type_url: str, ts: TypeState) -> None:
        payload = snapshot.payload(type_url, ts.names, self._since(type_url, ts))
        shared = self._shared
        framed = shared.get(payload) if shared is not None else None
        if framed is None:
            # A nonce of its own per response sent; in publish, per response and every
            # stream it goes to: each stream still gets a new nonce with every response.
            nonce = str(next(self._nonces))
            framed = nonce, Framed(payload + _nonce_field(nonce))
            if shared is not None:
                shared[payload] = framed
        ts.nonce, ts.pending, ts.force = framed[0], True, False
        ts.sent_version, ts.sent_names = snapshot.packed[type_url].version, ts.names
        ts.sent_seq = self._seq
        ts.sent_at = time.perf_counter()
        stream.call.send(framed[1])
        tally = self._tally(SHORT_NAMES[type_url])
        tally.pushes += 1
        tally.pushed_bytes += len(payload)

    def _since(self, type_url: str, ts: TypeState) -> Packed | None:
        """What this Envoy runs of `type_url`, when it may be sent only what changed since:
        routes and endpoints, same subscription, a version we still know, no resend forced
        (endpoints after a cluster change: Envoy waits for all of them again)."""
        if type_url not in PARTIAL_TYPES or ts.force or ts.acked_version is None:
            return None
        if ts.sent_names is not ts.names and ts.sent_names != ts.names:
            return None
        return self._history.get((type_url, ts.acked_version))


class _Request:
    """What the server reads of a DiscoveryRequest."""

    __slots__ = ("_names", "_parsed", "error", "names_key", "node_cluster", "node_id", "nonce",
                 "type_url", "version")  # fmt: skip

    def __init__(self, request: discovery_pb2.DiscoveryRequest) -> None:
        self._parsed = request
        self._names: frozenset[str] | None = None
        self.type_url, self.version = request.type_url, request.version_info
        self.nonce = request.response_nonce
        self.node_id, self.node_cluster = request.node.id, request.node.cluster
        self.error = request.error_detail.message if request.HasField("error_detail") else None
        self.names_key = b"" if self.type_url in WILDCARD_TYPES else _subscription(request)

    def names(self) -> frozenset[str]:
        """The subscription as a set: made once, shared by every stream that sent these
        bytes (at 1,000 models, ~150-190 us)."""
        if self._names is None:
            self._names = frozenset(self._parsed.resource_names)
        return self._names


class _AdsCall:
    """One Envoy's ADS call: its requests (ACKs, NACKs, subscriptions) handled as read."""

    __slots__ = ("server", "stream")

    def __init__(self, server: XdsServer, stream: EnvoyStream) -> None:
        self.server, self.stream = server, stream

    def on_message(self, message: bytes) -> None:
        """A request, parsed once per distinct bytes.

        Why that is safe: what _Request holds is a function of the bytes alone (type,
        version, nonce, error, names); everything that depends on the stream (is the nonce
        the one it was sent, is it an ACK or a NACK of it, did its subscription change) is
        still decided per stream by XdsServer._on_request. Why it pays: publish sends every
        stream the same response with the same nonce, and Envoy (our bootstrap sets
        `set_node_on_first_message_only`) answers without its node, so a fleet's ACKs of
        one change are the same bytes. Requests that name a node are one stream's and are
        not kept."""
        parsed = self.server._parsed
        request = parsed.get(message)
        if request is None:
            try:
                request = _Request(discovery_pb2.DiscoveryRequest.FromString(message))
            except Exception:  # DecodeError: not a DiscoveryRequest
                logs.event(log, "xds.bad_request", logging.WARNING, node=self.stream.node_id,
                           stream=self.stream.key)  # fmt: skip
                self.stream.call.close(INTERNAL, "not a DiscoveryRequest")
                return
            if not request.node_id and not request.node_cluster:
                if len(parsed) >= PARSED_REQUESTS:
                    parsed.clear()
                parsed[message] = request
        self.server._on_request(self.stream, request)

    def on_end(self) -> None:
        self.server._closed(self.stream)  # a half-closed call the transport then ends with OK


@dataclass
class _Tally:
    """One type's pushes and ACKs not yet in prometheus (XdsServer._tally)."""

    pushes: int = 0
    pushed_bytes: int = 0
    ack_latencies: list[float] = field(default_factory=list)


@functools.cache
def _series(short: str) -> SimpleNamespace:
    """A type's metric series, looked up once: `labels()` costs ~3 us."""
    return SimpleNamespace(
        pushes=metrics.xds_pushes.labels(short),
        pushed_bytes=metrics.xds_pushed_bytes.labels(short),
        acks=metrics.xds_acks.labels(short),
        ack_latency=metrics.xds_ack_latency.labels(short),
    )


def _observe_all(histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for each of `values`, in one update per bucket: sorted, the
    values each bucket gets are found by bisection (in C), where observe() costs ~1.5 us a
    value. It writes the histogram's own fields, as observe() does (prometheus_client has
    no bulk observe); tests/test_xds_server.py checks the result against observe()."""
    values.sort()
    below = 0
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets, strict=True):
        upto = bisect.bisect_right(values, bound)  # observe() puts v in the first bound >= v
        if upto > below:
            bucket.inc(upto - below)
            below = upto
    histogram._sum.inc(sum(values))


def _subscription(request: discovery_pb2.DiscoveryRequest) -> bytes:
    """A request's type and resource names alone, serialized: equal bytes, equal
    subscription. Copying and serializing runs in C (~35 us for 1,000 names, where a
    frozenset of them takes ~150-190 us)."""
    only = discovery_pb2.DiscoveryRequest()
    only.CopyFrom(request)
    for name in ("version_info", "node", "response_nonce", "error_detail"):
        only.ClearField(name)
    return only.SerializeToString(deterministic=True)


def _nonce_field(nonce: str) -> bytes:
    """DiscoveryResponse.nonce (field 5) on the wire: appended to a serialized response, it
    sets the nonce (protobuf reads fields in any order)."""
    data = nonce.encode()
    size, length = len(data), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            return b"\x2a" + bytes(length) + data
