"""Simulated Envoys for the fan-out benchmark: real ADS gRPC streams that subscribe and ACK.

Each client opens its own gRPC channel (its own TCP connection, like a separate Envoy) with
its own node id, and behaves like Envoy on the wire: CDS and LDS as wildcards, EDS for the
clusters CDS named, and routes the way the listener asks for them. Two layouts:

- the listener's connection manager names one route configuration (`rds`): RDS for it;
- it has `scoped_routes` (Scoped RDS): ScopedRouteConfiguration as a wildcard when it says
  `scoped_rds` (the inline `scoped_route_configurations_list` otherwise), then RDS for the
  `route_configuration_name` of every scope, as Envoy does.

Every response is ACKed with its version and nonce and the current resource names (the
subscription), the node only in a stream's first request (as Envoy does with our
bootstrap's `set_node_on_first_message_only`); a stream that fails is opened again after
0.1-1 s, as Envoy does. A state-of-the-world RDS or EDS response may carry only some of
the subscribed resources (the ones that changed); SRDS, like CDS and LDS, is taken as
complete.
Run by bench/bench_fanout.py in processes of their own, so the control plane's event loop
serves them exactly as it serves Envoys:

    python bench/ads_clients.py --xds 127.0.0.1:18000 --count 250 --first 0

Prints `ready` once every stream has received every route configuration it subscribed to,
then keeps serving until its stdin closes; it then prints one JSON line: per client, every
RDS response received after `ready` as [version, received, ack_written, bytes, resources]
(time.monotonic(), comparable across processes on one host; bytes = the serialized
DiscoveryResponse), how many responses of each other type arrived after `ready`, and how
many streams failed after `ready`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from h2_client import H2Call, StreamClosed

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SRDS = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
SHORT = {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds", SRDS: "srds"}
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
GIVE_UP_S = 120.0  # a client whose streams fail for this long in a row gives up (--give-up)


class Client:
    """One simulated Envoy: one channel, one ADS stream."""

    def __init__(
        self, target: str, node_id: str, give_up: float = GIVE_UP_S, transport: str = "grpc"
    ) -> None:
        self.target, self.give_up, self.transport = target, give_up, transport
        self.node = base_pb2.Node(id=node_id, cluster="bench-fanout")
        self.names: dict[str, list[str]] = {CDS: [], LDS: [], EDS: [], RDS: [], SRDS: []}
        self.acked: dict[str, tuple[str, str]] = {}  # type -> (version, nonce) last ACKed
        self.node_sent = False  # on this stream: the node goes in its first request only
        self.subscribed: set[str] = {CDS, LDS}
        self.listener_routes: set[str] = set()  # RDS names the listener gives (layout `rds`)
        self.scope_routes: set[str] = set()  # RDS names the scopes give (Scoped RDS)
        self.routes_seen: set[str] = set()  # route configurations received at least once
        self.synced = asyncio.Event()
        self.recording = False
        self.rds: list[tuple[str, float, float, int, int]] = []
        self.others: dict[str, int] = {}  # non-RDS responses while recording, by type
        self.reconnects = 0  # streams that failed while recording
        self.received = 0  # responses, all streams together

    def request(self, type_url: str) -> discovery_pb2.DiscoveryRequest:
        """The next request of `type_url`; the node only in the stream's first, as Envoy
        sends it with our bootstrap (`set_node_on_first_message_only`)."""
        version, nonce = self.acked.get(type_url, ("", ""))
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=self.names[type_url],
            version_info=version, response_nonce=nonce,
        )  # fmt: skip
        if not self.node_sent:
            request.node.CopyFrom(self.node)
            self.node_sent = True
        return request

    async def run(self) -> None:
        """One ADS stream after the other: like Envoy, reconnect (after 0.1-1 s, jittered)
        when the stream fails, with a fresh subscription; give up after `give_up` seconds of
        failures in a row."""
        failures, first_failure = 0, 0.0
        while True:
            seen = self.received
            try:
                await self.stream()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, OSError) as exc:
                now = time.monotonic()
                if self.received > seen:
                    failures = 0  # that stream worked for a while: a new series of failures
                failures, first_failure = failures + 1, first_failure if failures else now
                if self.recording:
                    self.reconnects += 1
                if now - first_failure > self.give_up:
                    raise ConnectionError(f"{self.node.id}: {failures} failed streams") from exc
                self.reset()
                await asyncio.sleep(min(1.0, 0.1 * failures) * random.uniform(0.5, 1.5))

    def reset(self) -> None:
        for type_url in self.names:
            self.names[type_url] = []
        self.acked.clear()
        self.node_sent = False
        self.subscribed = {CDS, LDS}
        self.listener_routes, self.scope_routes = set(), set()

    async def stream(self) -> None:
        if self.transport == "h2":
            host, _, port = self.target.rpartition(":")
            call = _LeanCall(await H2Call.open(host, int(port), METHOD))
            try:
                await self.serve(call)
            finally:
                call.h2.close()
            return
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await self.serve(call)

    async def serve(self, call) -> None:
        """Subscribe like Envoy, then answer every response (`call`: grpc.aio's or lean)."""
        await call.write(self.request(CDS))
        await call.write(self.request(LDS))
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise ConnectionError(f"{self.node.id}: stream closed by the server")
            received = time.monotonic()
            self.received += 1
            await self.answer(call, response)
            if response.type_url == RDS:
                self.routes_seen.update(_names(response))
                if self.recording:
                    self.rds.append((response.version_info, received, time.monotonic(),
                                     response.ByteSize(), len(response.resources)))  # fmt: skip
                wanted = self.names[RDS]
                if wanted and self.routes_seen.issuperset(wanted):
                    self.synced.set()
            elif self.recording:
                short = SHORT.get(response.type_url, response.type_url)
                self.others[short] = self.others.get(short, 0) + 1

    async def answer(self, call, response: discovery_pb2.DiscoveryResponse) -> None:
        """ACK, then subscribe to what the response names (EDS after CDS, SRDS and RDS after
        LDS, RDS after SRDS)."""
        type_url = response.type_url
        self.acked[type_url] = (response.version_info, response.nonce)
        await call.write(self.request(type_url))
        if type_url == CDS:
            clusters = [cluster_pb2.Cluster.FromString(r.value) for r in response.resources]
            eds = {c.name for c in clusters if c.type == cluster_pb2.Cluster.EDS}
            await self.follow(call, EDS, eds)
        elif type_url == LDS:
            listeners = [listener_pb2.Listener.FromString(r.value) for r in response.resources]
            rds, inline_scopes, scoped_rds = set(), set(), False
            for listener in listeners:
                for manager in managers(listener):
                    kind = manager.WhichOneof("route_specifier")
                    if kind == "rds":
                        rds.add(manager.rds.route_config_name)
                    elif kind == "scoped_routes":
                        scoped = manager.scoped_routes
                        if scoped.HasField("scoped_rds"):
                            scoped_rds = True
                        inline = scoped.scoped_route_configurations_list
                        for scope in inline.scoped_route_configurations:
                            if scope.route_configuration_name:
                                inline_scopes.add(scope.route_configuration_name)
            self.listener_routes = rds | inline_scopes
            if scoped_rds and SRDS not in self.subscribed:
                self.subscribed.add(SRDS)  # a wildcard, like Envoy's SRDS subscription
                await call.write(self.request(SRDS))
            await self.follow(call, RDS, self.listener_routes | self.scope_routes)
        elif type_url == SRDS:
            scopes = [
                scoped_route_pb2.ScopedRouteConfiguration.FromString(r.value)
                for r in response.resources
            ]
            self.scope_routes = {s.route_configuration_name for s in scopes} - {""}
            await self.follow(call, RDS, self.listener_routes | self.scope_routes)

    async def follow(self, call, type_url: str, wanted: set[str]) -> None:
        """Subscribe `type_url` to `wanted` when that changes the subscription."""
        names = sorted(wanted)
        if names != self.names[type_url]:
            self.names[type_url] = names
            self.subscribed.add(type_url)
            await call.write(self.request(type_url))


class _LeanCall:
    """bench/h2_client.py's call with grpc.aio's read/write of messages."""

    def __init__(self, h2: H2Call) -> None:
        self.h2 = h2

    async def write(self, request: discovery_pb2.DiscoveryRequest) -> None:
        self.h2.write(request.SerializeToString())

    async def read(self):
        try:
            return discovery_pb2.DiscoveryResponse.FromString(await self.h2.read())
        except StreamClosed:
            return grpc.aio.EOF


def _names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    """The names of the route configurations a response carries."""
    return [route_pb2.RouteConfiguration.FromString(r.value).name for r in response.resources]


def managers(listener: listener_pb2.Listener) -> list[hcm_pb2.HttpConnectionManager]:
    found = []
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(manager):
                found.append(manager)
    return found


async def main_async(args: argparse.Namespace) -> None:
    clients = [
        Client(args.xds, f"bench-ads-{args.first + i:05d}", args.give_up, args.transport)
        for i in range(args.count)
    ]
    tasks = []
    wave = max(1, round(args.connect_rate / 20))
    for start in range(0, len(clients), wave):  # connect in small waves, as a fleet would
        tasks += [asyncio.create_task(c.run()) for c in clients[start : start + wave]]
        await asyncio.sleep(0.05)
    synced = asyncio.gather(*(c.synced.wait() for c in clients))
    done, _ = await asyncio.wait([synced, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if synced not in done:
        next(iter(done)).result()  # a stream failed: raise its error
    for client in clients:
        client.recording = True
    layout = "scoped" if SRDS in clients[0].subscribed else "rds"
    print(f"ready {layout} {len(clients[0].names[RDS])}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
    for task in tasks:
        if task.done():
            task.result()  # a stream that died during the run is an error, not a quiet gap
        task.cancel()
    report = [
        {"node": c.node.id, "rds": c.rds, "others": c.others, "reconnects": c.reconnects}
        for c in clients
    ]
    print(json.dumps(report), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xds", required=True, help="host:port of the ADS server")
    parser.add_argument("--count", type=int, default=250, help="streams in this process")
    parser.add_argument("--first", type=int, default=0, help="number of the first node id")
    parser.add_argument("--connect-rate", type=float, default=1000, help="new streams per second")
    parser.add_argument("--give-up", type=float, default=GIVE_UP_S,
                        help="seconds of failed streams before a client gives up")  # fmt: skip
    parser.add_argument("--transport", choices=("grpc", "h2"), default="grpc",
                        help="grpc: grpc.aio; h2: bench/h2_client.py, on uvloop")  # fmt: skip
    args = parser.parse_args()
    try:  # uvloop when installed (not a dependency): the lean clients' loop costs less
        import uvloop
    except ImportError:
        uvloop = None
    if args.transport == "h2" and uvloop is not None:
        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
