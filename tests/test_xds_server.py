"""The ADS server's bookkeeping against a hand-driven gRPC client (real streams, no Envoy):
what counts as applied when changes come faster than an Envoy answers, and the ACKs of a
fleet parsed once (the same bytes from every Envoy) but judged per stream."""

from __future__ import annotations

import asyncio
import queue

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import metrics
from controlplane.config import parse_config
from controlplane.errors import AckTimeout, EnvoyRejected
from controlplane.state import Endpoint, State
from controlplane.xds import server as xds_server
from controlplane.xds.resources import ProxySettings
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import ENDPOINT, SnapshotBuilder


class Client:
    """One ADS stream whose every request the test sends by hand."""

    def __init__(self, port: int, node: str = "hand") -> None:
        self.node = node
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.responses = stub.StreamAggregatedResources(iter(self.requests.get, None), timeout=30)

    def send(self, type_url: str, names=(), answer=None, node=True, error=None) -> None:
        """A request; `answer`: an ACK of that response (a NACK with `error`); without
        `node`, as Envoy sends every request but its first (set_node_on_first_message_only)."""
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        if node:
            request.node.id, request.node.cluster = self.node, "switchyard"
        if answer is not None:
            request.version_info, request.response_nonce = answer.version_info, answer.nonce
        if error is not None:
            request.error_detail.message = error
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


@pytest.fixture
async def fleet():
    """A server publishing `_state()` and three clients that run it, each subscribed to the
    endpoints with the same names (as a fleet of Envoys is), answering without a node."""
    state, builder, server = _state(), SnapshotBuilder(ProxySettings("127.0.0.1", 0)), XdsServer()
    port = await server.start("127.0.0.1", 0)
    clients = [Client(port, f"hand-{index}") for index in range(3)]
    try:
        server.publish(builder.build(state))
        for client in clients:
            client.send(ENDPOINT, ["m@v1"])
            first = await asyncio.to_thread(next, client.responses)
            client.send(ENDPOINT, ["m@v1"], answer=first, node=False)
        for _ in range(100):  # until all three ran it (wait_applied waits only for those)
            if all(not s.types[ENDPOINT].pending for s in server.streams.values()):
                break
            await asyncio.sleep(0.05)
        assert len(server._active()) == 3
        yield state, builder, server, clients
    finally:
        for client in clients:
            client.close()
        await server.stop()


def _streams(server: XdsServer) -> list:
    """The fleet's streams in the order of its clients."""
    return sorted(server.streams.values(), key=lambda stream: stream.node_id)


async def _push(state, builder, server, clients, port: int):
    """Publish an endpoint change; every client's response to it."""
    _move(state, port)
    change = builder.build(state, ["m"])
    server.publish(change)
    return change, [await asyncio.to_thread(next, client.responses) for client in clients]


async def test_a_fleets_identical_acks_are_parsed_once_and_count_for_each_stream(
    fleet, monkeypatch
):
    """One change goes to every stream with one nonce, so the fleet's ACKs are the same
    bytes: parsed once, yet each stream is applied by its own ACK only."""
    state, builder, server, clients = fleet
    parsed, parse = [], xds_server._Request
    monkeypatch.setattr(xds_server, "_Request", lambda request: parsed.append(request)
                        or parse(request))  # fmt: skip
    before = server.snapshot.versions[ENDPOINT]
    change, responses = await _push(state, builder, server, clients, 9001)
    assert len({response.nonce for response in responses}) == 1
    waiting = asyncio.create_task(server.wait_applied(change, timeout=5))
    for client, response in zip(clients[:2], responses, strict=False):
        client.send(ENDPOINT, ["m@v1"], answer=response, node=False)
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the third has not answered: its stream is not applied
    assert [s.types[ENDPOINT].acked_version for s in _streams(server)] == [
        change.versions[ENDPOINT], change.versions[ENDPOINT], before
    ]
    clients[2].send(ENDPOINT, ["m@v1"], answer=responses[2], node=False)
    assert await asyncio.wait_for(waiting, 5) == 3
    assert len(parsed) == 1  # three ACKs, one parse


async def test_a_nack_with_the_nonce_of_a_parsed_ack_is_a_nack(fleet):
    """The NACK of the same response differs in its bytes (error_detail): it is read as
    what it is, for its stream only."""
    state, builder, server, clients = fleet
    change, responses = await _push(state, builder, server, clients, 9001)
    waiting = asyncio.create_task(server.wait_applied(change, timeout=5))
    clients[0].send(ENDPOINT, ["m@v1"], answer=responses[0], node=False)
    clients[1].send(ENDPOINT, ["m@v1"], answer=responses[1], node=False)
    await asyncio.sleep(0.3)
    clients[2].send(ENDPOINT, ["m@v1"], answer=responses[2], node=False, error="bad endpoints")
    with pytest.raises(EnvoyRejected, match="bad endpoints"):
        await asyncio.wait_for(waiting, 5)
    first, second, third = (s.types[ENDPOINT] for s in _streams(server))
    assert first.acked_version == second.acked_version == change.versions[ENDPOINT]
    assert first.nack is None and second.nack is None
    assert third.nack == {"version": change.versions[ENDPOINT], "message": "bad endpoints"}
    assert third.acked_version != change.versions[ENDPOINT]


async def test_an_ack_with_the_same_nonce_and_new_names_changes_that_subscription_only(fleet):
    state, builder, server, clients = fleet
    _, responses = await _push(state, builder, server, clients, 9001)
    clients[0].send(ENDPOINT, ["m@v1"], answer=responses[0], node=False)
    clients[1].send(ENDPOINT, ["m@v1", "m@v2"], answer=responses[1], node=False)
    again = await asyncio.to_thread(next, clients[1].responses)  # what the new names cover
    assert again.nonce != responses[1].nonce
    first, second, _ = (s.types[ENDPOINT] for s in _streams(server))
    assert first.names == frozenset({"m@v1"})
    assert second.names == frozenset({"m@v1", "m@v2"})
    assert second.pending and second.nonce == again.nonce


async def test_a_parsed_ack_with_a_superseded_nonce_is_stale_on_the_stream_that_moved_on(fleet):
    """The same bytes are an ACK on a stream still waiting for that nonce and stale on one
    that was sent a newer response since: the nonce is checked per stream."""
    state, builder, server, clients = fleet
    first_change, responses = await _push(state, builder, server, clients[:1], 9001)
    # only the first client's response is read: the others are sent it, and not answering
    late = [await asyncio.to_thread(next, client.responses) for client in clients[1:]]
    assert {r.nonce for r in late} == {responses[0].nonce}
    clients[0].send(ENDPOINT, ["m@v1"], answer=responses[0], node=False)
    second_change, (newer,) = await _push(state, builder, server, clients[:1], 9002)
    waiting = asyncio.create_task(server.wait_applied(second_change, timeout=1))
    clients[0].send(ENDPOINT, ["m@v1"], answer=responses[0], node=False)  # stale there
    clients[1].send(ENDPOINT, ["m@v1"], answer=late[0], node=False)  # the same bytes: an ACK
    pushed = await asyncio.to_thread(next, clients[1].responses)  # so it gets the newest
    assert pushed.version_info == second_change.versions[ENDPOINT]
    first = _streams(server)[0].types[ENDPOINT]
    assert first.acked_version == first_change.versions[ENDPOINT]
    assert first.pending and first.nonce == newer.nonce
    with pytest.raises(AckTimeout):
        await waiting


async def test_pushes_and_acks_are_counted_once_the_event_loop_turns(fleet):
    state, builder, server, clients = fleet

    def sample(name: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, {"type": "eds"}) or 0.0

    pushes, acks = sample("switchyard_xds_pushes_total"), sample("switchyard_xds_acks_total")
    observed = sample("switchyard_xds_push_ack_seconds_count")
    change, responses = await _push(state, builder, server, clients, 9001)
    for client, response in zip(clients, responses, strict=True):
        client.send(ENDPOINT, ["m@v1"], answer=response, node=False)
    await asyncio.wait_for(server.wait_applied(change), 5)
    await asyncio.sleep(0)
    assert sample("switchyard_xds_pushes_total") == pushes + 3
    assert sample("switchyard_xds_acks_total") == acks + 3
    assert sample("switchyard_xds_push_ack_seconds_count") == observed + 3


def test_observing_many_values_at_once_is_observing_each():
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    one = Histogram("one", "", buckets=metrics.FAST_BUCKETS, registry=registry)
    many = Histogram("many", "", buckets=metrics.FAST_BUCKETS, registry=registry)
    values = [0.0, 0.0002, 0.00021, 0.001, 0.0049, 0.3, 2.5, 7.0, 0.0002, 1e-9, 100.0]
    for value in values:
        one.observe(value)
    xds_server._observe_all(many, list(values))

    def read(family):
        return [(s.name.removeprefix(family.name), s.labels, s.value) for s in family.samples
                if not s.name.endswith("_created")]  # fmt: skip

    first, second = registry.collect()
    assert read(second) == read(first)
