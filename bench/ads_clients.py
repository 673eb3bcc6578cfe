"""Simulated Envoys for the fan-out benchmark: real ADS gRPC streams that subscribe and ACK.

Each client opens its own gRPC channel (its own TCP connection, like a separate Envoy) with
its own node id, and behaves like Envoy on the wire: CDS and LDS as wildcards, EDS for the
clusters CDS named, RDS for the route configuration the listener names; every response is
ACKed with its version and nonce and the current resource names. Run by
bench/bench_fanout.py in processes of their own, so the control plane's event loop serves
them exactly as it serves Envoys:

    python bench/ads_clients.py --xds 127.0.0.1:18000 --count 250 --first 0

Prints `ready` once every stream has ACKed a route configuration, then keeps serving until
its stdin closes; it then prints one JSON line: per client, every RDS response received
after `ready` as [version, received, ack_written] (time.monotonic(), comparable across
processes on one host), and how many responses of the other types arrived after `ready`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SHORT = {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds"}


class Client:
    """One simulated Envoy: one channel, one ADS stream."""

    def __init__(self, target: str, node_id: str) -> None:
        self.target = target
        self.node = base_pb2.Node(id=node_id, cluster="bench-fanout")
        self.names: dict[str, list[str]] = {CDS: [], LDS: [], EDS: [], RDS: []}
        self.acked: dict[str, tuple[str, str]] = {}  # type -> (version, nonce) last ACKed
        self.synced = asyncio.Event()
        self.recording = False
        self.rds: list[tuple[str, float, float]] = []  # (version, received, ack written)
        self.others = 0  # non-RDS responses while recording

    def request(self, type_url: str) -> discovery_pb2.DiscoveryRequest:
        version, nonce = self.acked.get(type_url, ("", ""))
        return discovery_pb2.DiscoveryRequest(
            node=self.node, type_url=type_url, resource_names=self.names[type_url],
            version_info=version, response_nonce=nonce,
        )  # fmt: skip

    async def run(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(self.request(CDS))
            await call.write(self.request(LDS))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError(f"{self.node.id}: stream closed by the server")
                received = time.monotonic()
                await self.answer(call, response)
                if response.type_url == RDS:
                    if self.recording:
                        self.rds.append((response.version_info, received, time.monotonic()))
                    self.synced.set()
                elif self.recording:
                    self.others += 1

    async def answer(self, call, response: discovery_pb2.DiscoveryResponse) -> None:
        """ACK, then subscribe to what the response names (EDS after CDS, RDS after LDS)."""
        type_url = response.type_url
        self.acked[type_url] = (response.version_info, response.nonce)
        await call.write(self.request(type_url))
        if type_url == CDS:
            clusters = [cluster_pb2.Cluster.FromString(r.value) for r in response.resources]
            wanted = sorted(c.name for c in clusters if c.type == cluster_pb2.Cluster.EDS)
            follow = EDS
        elif type_url == LDS:
            listeners = [listener_pb2.Listener.FromString(r.value) for r in response.resources]
            wanted = sorted({name for lis in listeners for name in route_config_names(lis)})
            follow = RDS
        else:
            return
        if wanted != self.names[follow]:
            self.names[follow] = wanted
            await call.write(self.request(follow))


def route_config_names(listener: listener_pb2.Listener) -> list[str]:
    names = []
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(manager) and manager.HasField("rds"):
                names.append(manager.rds.route_config_name)
    return names


async def main_async(args: argparse.Namespace) -> None:
    clients = [Client(args.xds, f"bench-ads-{args.first + i:04d}") for i in range(args.count)]
    tasks = []
    for start in range(0, len(clients), 50):  # connect in small waves, as a fleet would
        tasks += [asyncio.create_task(c.run()) for c in clients[start : start + 50]]
        await asyncio.sleep(0.05)
    synced = asyncio.gather(*(c.synced.wait() for c in clients))
    done, _ = await asyncio.wait([synced, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if synced not in done:
        next(iter(done)).result()  # a stream failed: raise its error
    for client in clients:
        client.recording = True
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
    for task in tasks:
        if task.done():
            task.result()  # a stream that died during the run is an error, not a quiet gap
        task.cancel()
    report = [{"node": c.node.id, "rds": c.rds, "others": c.others} for c in clients]
    print(json.dumps(report), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xds", required=True, help="host:port of the ADS server")
    parser.add_argument("--count", type=int, default=250, help="streams in this process")
    parser.add_argument("--first", type=int, default=0, help="number of the first node id")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
