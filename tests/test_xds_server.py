"""The ADS server's bookkeeping against a hand-driven gRPC client (real streams, no Envoy):
what counts as applied when changes come faster than an Envoy answers."""

from __future__ import annotations

import asyncio
import queue

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.config import parse_config
from controlplane.errors import AckTimeout
from controlplane.state import Endpoint, State
from controlplane.xds.resources import ProxySettings
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import ENDPOINT, SnapshotBuilder


class Client:
    """One ADS stream whose every request the test sends by hand."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.responses = stub.StreamAggregatedResources(iter(self.requests.get, None), timeout=30)

    def send(self, type_url: str, names=(), answer=None) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        request.node.id, request.node.cluster = "hand", "switchyard"
        if answer is not None:  # an ACK of `answer`
            request.version_info, request.response_nonce = answer.version_info, answer.nonce
        self.requests.put(request)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


def _state() -> State:
    config = parse_config({"models": [{"name": "m", "versions": [
        {"name": "v1", "weight": 100, "backend": {"url": "http://127.0.0.1:8001"}}]}]})  # fmt: skip
    state = State.from_config(config)
    version = state.models["m"].versions["v1"]
    version.endpoints, version.state = [Endpoint("http://127.0.0.1:8001")], "active"
    return state


@pytest.fixture
async def running():
    """A server publishing `_state()`, and a client that runs it (it ACKed the endpoints)."""
    state, builder, server = _state(), SnapshotBuilder(ProxySettings("127.0.0.1", 0)), XdsServer()
    client = Client(await server.start("127.0.0.1", 0))
    try:
        server.publish(builder.build(state))
        client.send(ENDPOINT, ["m@v1"])
        first = await asyncio.to_thread(next, client.responses)
        client.send(ENDPOINT, ["m@v1"], answer=first)
        yield state, builder, server, client
    finally:
        client.close()
        await server.stop()


def _move(state: State, port: int) -> None:
    """An endpoint change: the version's backend moved to another port."""
    state.models["m"].versions["v1"].endpoints = [Endpoint(f"http://127.0.0.1:{port}")]


async def test_a_change_superseded_before_the_envoy_answered_counts_as_applied(running):
    """Envoy answers the response in flight, then gets the newest snapshot, never the one
    in between: waiting for that one ends when the Envoy runs the newer (it used to time
    out, and a rollout step waiting on it paused with an AckTimeout)."""
    state, builder, server, client = running
    _move(state, 9001)
    server.publish(builder.build(state, ["m"]))  # sent at once, left unanswered
    in_flight = await asyncio.to_thread(next, client.responses)
    _move(state, 9002)
    middle = builder.build(state, ["m"])
    server.publish(middle)  # coalesced: never sent on its own
    waiting = asyncio.create_task(server.wait_applied(middle, timeout=5))
    _move(state, 9003)
    newest = builder.build(state, ["m"])
    server.publish(newest)

    client.send(ENDPOINT, ["m@v1"], answer=in_flight)
    latest = await asyncio.to_thread(next, client.responses)
    assert latest.version_info == newest.versions[ENDPOINT]
    assert not waiting.done()  # the client runs 9001: not yet
    client.send(ENDPOINT, ["m@v1"], answer=latest)
    assert await asyncio.wait_for(waiting, 5) == 1


async def test_an_envoy_that_stops_answering_still_times_out(running):
    """The counterpart: a change no later ACK carries is not applied."""
    state, builder, server, client = running
    _move(state, 9001)
    change = builder.build(state, ["m"])
    server.publish(change)
    await asyncio.to_thread(next, client.responses)  # received, never answered
    with pytest.raises(AckTimeout, match="hand"):
        await server.wait_applied(change, timeout=0.5)


async def test_an_ack_that_changes_the_subscription_is_answered_and_one_that_repeats_it_not(
    running,
):
    """Every ACK repeats the subscription; the server makes its set of names again only
    when the names changed (issue 17: 1,002 names per ACK at 1,000 models), and then sends
    what the new names cover."""
    state, builder, server, client = running
    (stream,) = server.streams.values()
    kept = stream.types[ENDPOINT].names
    assert kept == frozenset({"m@v1"})
    first = server.snapshot.response(ENDPOINT, kept)
    client.send(ENDPOINT, ["m@v1"], answer=first)  # the same subscription, ACKed again
    client.send(ENDPOINT, ["m@v1", "m@v2"], answer=first)  # a new one
    response = await asyncio.to_thread(next, client.responses)
    assert [r.value for r in response.resources] == [
        r.value for r in server.snapshot.response(ENDPOINT, None).resources
    ]
    names = stream.types[ENDPOINT].names
    assert names == frozenset({"m@v1", "m@v2"})
    client.send(ENDPOINT, ["m@v1", "m@v2"], answer=response)  # the same, as Envoy repeats it
    _move(state, 9001)
    change = builder.build(state, ["m"])
    server.publish(change)
    pushed = await asyncio.to_thread(next, client.responses)
    assert pushed.version_info == change.versions[ENDPOINT]
    assert stream.types[ENDPOINT].names is names
