"""Real Envoys on one control plane: every Envoy ACKs and follows each change, and a push an
Envoy rejects (NACK) is reported, never resent, and leaves the last good configuration serving.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import regex_pb2

from controlplane.config import ModelConfig, VersionConfig, parse_config
from controlplane.controller import Controller
from controlplane.errors import EnvoyRejected
from controlplane.metrics import REGISTRY
from controlplane.proxy import EnvoySupervisor
from controlplane.reconciler.local import LocalRuntime
from controlplane.sim import SimConfig, make_app
from controlplane.xds import resources
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Snapshot
from tests.conftest import (
    EnvoyProcess,
    Running,
    complete_once,
    free_ports,
    listen_ports,
    switchyard,
    two_version_models,
    wait_for_proxy,
    wait_until,
    write_config,
)

MODEL = "llama-3-8b"
NODES = ("edge-a", "edge-b")
COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 1}
# An Envoy build without this extension refuses every route configuration we send: a real
# Envoy that NACKs, as an older or differently built Envoy in a fleet would.
PREVIOUS_HOSTS = "envoy.retry_host_predicates/envoy.retry_host_predicates.previous_hosts"


# -- helpers -------------------------------------------------------------------------------


def served(proxy: str, count: int) -> Counter:
    """Versions that answered `count` requests, one connection each (all must be 200).

    Envoys sharing the listener port (SO_REUSEPORT) each get a share of new connections.
    """
    versions: Counter = Counter()
    for _ in range(count):
        status, version = complete_once(proxy)
        assert status == 200
        versions[version] += 1
    return versions


def upstream_counts(admin_port: int) -> dict[str, int]:
    """Requests one Envoy sent to each llama-3-8b version, from its own admin stats."""
    stat = r"^cluster\.llama-3-8b@v[12]\.upstream_rq_completed$"
    url = f"http://127.0.0.1:{admin_port}/stats?filter={stat}"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r"cluster\.llama-3-8b@(v\d)\.upstream_rq_completed: (\d+)", text)
    return {version: int(count) for version, count in found}


def envoys_by_node(running: Running) -> dict[str, dict]:
    status, body = running.api("GET", "/v1/envoys")
    assert status == 200, body
    return {envoy["node_id"]: envoy for envoy in body["envoys"]}


def weights_of(model: dict) -> dict[str, int]:
    return {version["name"]: version["weight"] for version in model["versions"]}


def synced(running: Running, nodes) -> bool:
    """Every node connected, each type ACKed with nothing pending or rejected."""
    envoys = envoys_by_node(running)
    return set(nodes) <= set(envoys) and all(
        len(envoys[node]["types"]) == 5  # cds, eds, lds, srds, rds
        and all(
            t["acked_version"] and not t["pending"] and t["nack"] is None
            for t in envoys[node]["types"].values()
        )
        for node in nodes
    )


def rds_nack(running: Running, node: str) -> dict | None:
    """The NACK `node` sent for the routes, if it is connected and sent one."""
    envoy = envoys_by_node(running).get(node)
    return envoy and envoy["types"].get("rds", {}).get("nack")


class PickyEnvoy(EnvoyProcess):
    """A real Envoy built without an extension our route configuration uses: it NACKs RDS."""

    extra_args = ("--disable-extensions", PREVIOUS_HOSTS)


# -- two Envoys on one `switchyard serve` ----------------------------------------------------


@dataclass
class Fleet:
    running: Running
    directory: Path
    admin_ports: dict[str, int]
    spare_port: int  # for a third Envoy's admin


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    with switchyard("serve", directory, two_version_models()) as running:
        envoys: list[EnvoyProcess] = []
        try:
            ports = free_ports(3, avoid=listen_ports(running.config))
            admin_ports = dict(zip(NODES, ports, strict=False))
            for node in NODES:
                envoys.append(EnvoyProcess(directory, running.config_path, node, admin_ports[node]))
            wait_for_proxy(running.proxy)
            wait_until(lambda: synced(running, NODES), 20, message="both Envoys to sync")
            yield Fleet(running, directory, admin_ports, ports[-1])
        finally:
            for envoy in envoys:
                envoy.stop()


@pytest.fixture
def reset(fleet):
    yield
    status, body = fleet.running.api(
        "PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": 100, "v2": 0}}
    )
    assert status == 200, body


def test_both_envoys_share_the_listener_and_ack_every_weight_change(fleet, reset):
    running = fleet.running
    for v1, v2 in ((0, 100), (50, 50), (100, 0), (0, 100)):
        before = {
            node: e["types"]["rds"]["acked_version"] for node, e in envoys_by_node(running).items()
        }
        counts_before = {node: upstream_counts(port) for node, port in fleet.admin_ports.items()}

        status, model = running.api(
            "PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": v1, "v2": v2}}
        )
        assert status == 200, model
        assert weights_of(model) == {"v1": v1, "v2": v2}

        # The 200 came after every Envoy ACKed: both already run the same, new route version.
        envoys = envoys_by_node(running)
        assert set(envoys) == set(NODES)
        acked = {node: envoys[node]["types"]["rds"]["acked_version"] for node in NODES}
        assert acked["edge-a"] == acked["edge-b"], envoys
        assert acked["edge-a"] != before["edge-a"], "the route version did not move"
        for node in NODES:
            assert all(t["nack"] is None for t in envoys[node]["types"].values()), envoys[node]

        versions = served(running.proxy, 60)
        assert sum(versions.values()) == 60
        if v1 == 0:
            assert versions == Counter({"v2": 60})
        elif v2 == 0:
            assert versions == Counter({"v1": 60})
        else:
            assert versions["v1"] and versions["v2"], versions

        # Each Envoy took part of the traffic and followed the new split on its own.
        for node, port in fleet.admin_ports.items():
            after = upstream_counts(port)
            delta = {v: after.get(v, 0) - counts_before[node].get(v, 0) for v in ("v1", "v2")}
            assert sum(delta.values()) > 0, f"{node} served nothing: {delta}"
            if v1 == 0:
                assert delta["v1"] == 0, f"{node} still sent to v1: {delta}"
            if v2 == 0:
                assert delta["v2"] == 0, f"{node} still sent to v2: {delta}"


def test_a_weight_change_an_envoy_rejects_is_undone(fleet, reset):
    """An Envoy that NACKs the change makes the API refuse it; every Envoy gets the old one back."""
    running = fleet.running
    status, model_before = running.api("GET", f"/v1/models/{MODEL}")
    assert weights_of(model_before) == {"v1": 100, "v2": 0}
    good_rds = {n: e["types"]["rds"]["acked_version"] for n, e in envoys_by_node(running).items()}

    picky = PickyEnvoy(fleet.directory, running.config_path, "edge-old", fleet.spare_port)
    try:
        # It runs clusters and listener but refuses the routes (no traffic is sent meanwhile:
        # sharing the port, it would answer 404 for lack of routes).
        nack = wait_until(lambda: rds_nack(running, "edge-old"), 20, message="edge-old to NACK")
        assert "previous_hosts" in nack["message"]

        status, body = running.api(
            "PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": 0, "v2": 100}}
        )
        assert status == 502, body
        assert body["error"]["type"] == "envoy_rejected"
        assert "edge-old" in body["error"]["message"]
        assert "previous_hosts" in body["error"]["message"]

        status, model = running.api("GET", f"/v1/models/{MODEL}")
        assert weights_of(model) == {"v1": 100, "v2": 0}
        assert model["stable"] == model_before["stable"]

        # The good Envoys are given the previous routes back.
        def restored():
            envoys = envoys_by_node(running)
            return all(
                envoys[n]["types"]["rds"]["acked_version"] == good_rds[n]
                and not envoys[n]["types"]["rds"]["pending"]
                for n in NODES
            )

        wait_until(restored, 15, message="the good Envoys to run the previous routes again")
    finally:
        picky.stop()
    wait_until(lambda: "edge-old" not in envoys_by_node(running), 15, message="edge-old to leave")
    assert served(running.proxy, 40) == Counter({"v1": 40})

    # Without the picky Envoy, the same change goes through.
    status, body = running.api(
        "PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": 0, "v2": 100}}
    )
    assert status == 200, body
    assert served(running.proxy, 40) == Counter({"v2": 40})


def test_refused_rollout_changes(fleet, reset):
    """A step or a promotion an Envoy refuses is undone and the rollout pauses where it was
    (resume carries on once the Envoy is gone); an abort, like an emergency rollback, stays
    with the Envoys that took it and ends the rollout."""
    running = fleet.running
    status, rollout = running.api("POST", "/v1/rollouts", {
        "model": MODEL, "to": "v2", "strategy": "canary",
        "steps": [{"set_weight": 30}, {"pause": {"seconds": 3}}, {"set_weight": 60},
                  {"pause": {}}],
    })  # fmt: skip
    assert status == 201, rollout
    url = f"/v1/rollouts/{rollout['id']}"

    def paused_at(v2: int, message: str = ""):
        doc = running.api("GET", url)[1]
        done = doc["phase"] == "paused" and doc["weights"]["v2"] == v2 and message in doc["message"]
        return done and doc

    def model_split() -> dict[str, int]:
        return weights_of(running.api("GET", f"/v1/models/{MODEL}")[1])

    wait_until(lambda: running.api("GET", url)[1]["weights"]["v2"] == 30, message="at 30")
    picky = PickyEnvoy(fleet.directory, running.config_path, "edge-old", fleet.spare_port)
    try:  # joins during the timed pause: the step to 60 is refused
        wait_until(lambda: paused_at(30, "edge-old"), message="the refused step to pause")
        assert model_split() == {"v1": 70, "v2": 30}
        status, body = running.api("POST", f"{url}/resume")
        assert status == 502 and paused_at(30), body
    finally:
        picky.stop()
    wait_until(lambda: "edge-old" not in envoys_by_node(running), 15, message="edge-old to leave")
    assert running.api("POST", f"{url}/resume")[0] == 200
    wait_until(lambda: paused_at(60), message="the step once the Envoy is gone")

    picky = PickyEnvoy(fleet.directory, running.config_path, "edge-old", fleet.spare_port)
    try:
        wait_until(lambda: rds_nack(running, "edge-old"), 20, message="edge-old to NACK")
        status, body = running.api("POST", f"{url}/promote")
        assert status == 502 and "edge-old" in body["error"]["message"], body
        assert paused_at(60) and model_split() == {"v1": 40, "v2": 60}
        assert running.api("GET", f"/v1/models/{MODEL}")[1]["stable"] == "v1"

        status, body = running.api("POST", f"{url}/abort")
        assert status == 502 and "keep it" in body["error"]["message"], body
        status, after = running.api("GET", url)
        assert (after["phase"], after["weights"]) == ("aborted", {"v1": 100, "v2": 0})
        assert model_split() == {"v1": 100, "v2": 0}
        assert running.api("GET", "/v1/rollouts?active=true")[1]["rollouts"] == []
    finally:
        picky.stop()
        for active in running.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]:
            running.api("POST", f"/v1/rollouts/{active['id']}/abort")
    wait_until(lambda: "edge-old" not in envoys_by_node(running), 15, message="edge-old to leave")
    assert served(running.proxy, 40) == Counter({"v1": 40})


# -- in-process: a snapshot Envoy rejects ----------------------------------------------------


async def until(predicate, timeout: float = 15.0, message: str = ""):
    """Like wait_until, without blocking the event loop the xDS server runs on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


async def versions_through(session: aiohttp.ClientSession, proxy: str, count: int) -> Counter:
    versions: Counter = Counter()
    for _ in range(count):
        async with session.post(f"{proxy}/v1/completions", json=COMPLETION) as response:
            assert response.status == 200, await response.text()
            versions[response.headers["x-switchyard-version"]] += 1
    return versions


def sample(name: str, short_type: str) -> float:
    return REGISTRY.get_sample_value(name, {"type": short_type}) or 0.0


def rejected_route_configs(state) -> list:
    """The normal route configurations, the model's with, first, a route whose regex RE2
    cannot compile."""
    configs = resources.build_route_configs(state)
    broken = route_components_pb2.Route(
        name="broken",
        match=route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex="(")),
        route=route_components_pb2.RouteAction(cluster=resources.cluster_name(MODEL, "v2")),
    )
    config = next(c for c in configs if c.name == resources.scope_name(MODEL))
    config.virtual_hosts[0].routes.insert(0, broken)
    return configs


@pytest.fixture
async def sims():
    """Two simulators in this process, for `url` backends."""
    runners, urls = [], {}
    try:
        for version in ("v1", "v2"):
            runner = web.AppRunner(make_app(SimConfig(model=MODEL, version=version)))
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            urls[version] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_rejected_snapshot_is_reported_never_resent_and_the_old_one_serves(tmp_path, sims):
    keys = ("proxy", "admin", "xds", "envoy_admin")
    config = parse_config(
        {
            "listen": dict(zip(keys, (f"127.0.0.1:{p}" for p in free_ports(4)), strict=True)),
            "models": [
                {
                    "name": MODEL,
                    "versions": [
                        {"name": "v1", "weight": 100, "backend": {"url": sims["v1"]}},
                        {"name": "v2", "weight": 0, "backend": {"url": sims["v2"]}},
                    ],
                }
            ],
        }
    )
    controller = Controller(config, tmp_path / "state")
    runtime = LocalRuntime(controller)
    envoy = EnvoySupervisor(config, controller.state_dir, "nacker")
    proxy = f"http://{config.listen.proxy}"
    events = controller.events.subscribe()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        host, port = config.listen.xds.rsplit(":", 1)
        await controller.xds.start(host, int(port))
        runtime.adopt_url_backends()
        controller.rebuild()
        await runtime.start()
        await envoy.start()
        assert await envoy.wait_ready()

        async def routed() -> bool:
            try:
                async with session.post(f"{proxy}/v1/completions", json=COMPLETION) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await until(routed, 20, "Envoy to route the model")
        good = controller.snapshot
        assert await controller.xds.wait_applied(good) == 1
        assert await versions_through(session, proxy, 20) == Counter({"v1": 20})

        # The broken routes send everything to v2: had Envoy taken any of it, v2 would answer.
        state = controller.state
        bad = Snapshot.from_resources(
            {
                CLUSTER: resources.build_clusters(state),
                ENDPOINT: resources.build_endpoints(state),
                LISTENER: [resources.build_listener(controller.proxy)],
                SCOPED_ROUTE: resources.build_scopes(state),
                ROUTE: rejected_route_configs(state),
            }
        )
        assert bad.versions[ROUTE] != good.versions[ROUTE]
        same = (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE)
        assert {t: bad.versions[t] for t in same} == {t: good.versions[t] for t in same}
        nacks = sample("switchyard_xds_nacks_total", "rds")
        controller.xds.publish(bad)

        with pytest.raises(EnvoyRejected, match=r"nacker rejected the rds update: .*\("):
            await controller.xds.wait_applied(bad)

        (envoy_json,) = controller.xds.envoys()
        assert envoy_json["node_id"] == "nacker"
        rds = envoy_json["types"]["rds"]
        assert rds["nack"]["version"] == bad.versions[ROUTE]
        assert "regex" in rds["nack"]["message"].lower() or "(" in rds["nack"]["message"]
        assert rds["acked_version"] == good.versions[ROUTE]
        assert all(envoy_json["types"][t]["nack"] is None for t in ("cds", "eds", "lds")), (
            envoy_json
        )
        assert sample("switchyard_xds_nacks_total", "rds") == nacks + 1
        event = await asyncio.wait_for(events.get(), 5)
        while event.type != "xds.nack":
            event = await asyncio.wait_for(events.get(), 5)
        assert event.data["node"] == "nacker"
        assert event.data["type"] == "rds"

        # Envoy keeps serving the last configuration it accepted.
        assert await versions_through(session, proxy, 30) == Counter({"v1": 30})

        # No resend loop: the rejected version is not pushed again.
        pushes = sample("switchyard_xds_pushes_total", "rds")
        await asyncio.sleep(1.0)
        assert sample("switchyard_xds_pushes_total", "rds") == pushes
        assert sample("switchyard_xds_nacks_total", "rds") == nacks + 1

        # A good snapshot again is pushed and ACKed, which clears the NACK. (wait_applied may
        # return at once: the Envoy never stopped running it.)
        acks = sample("switchyard_xds_acks_total", "rds")
        controller.xds.publish(good)
        assert await controller.xds.wait_applied(good) == 1

        async def nack_cleared():
            (envoy_json,) = controller.xds.envoys()
            rds = envoy_json["types"]["rds"]
            return rds["nack"] is None and not rds["pending"] and rds

        rds = await until(nack_cleared, 10, "the good routes to be ACKed")
        assert rds["acked_version"] == good.versions[ROUTE]
        assert sample("switchyard_xds_acks_total", "rds") == acks + 1

        # And the next real change flows as usual.
        await controller.set_weights(MODEL, {"v1": 0, "v2": 100})
        assert await versions_through(session, proxy, 30) == Counter({"v2": 30})
    finally:
        controller.events.unsubscribe(events)
        await session.close()
        await envoy.stop()
        await runtime.stop()
        await controller.xds.stop()
        controller.store.close()


async def test_catalog_changes_an_envoy_rejects_are_undone_everywhere(tmp_path, sims):
    """Adding a model or a version, or removing one, while an Envoy NACKs: refused (502), and
    nothing stays: not in the state, not in the store (a restart), not in the Envoys that
    took it (they get the previous configuration back). Once that Envoy is gone, the same
    changes go through."""
    backend = {"url": sims["v2"]}
    models = [{"name": MODEL, "versions": [
        {"name": "v1", "weight": 100, "backend": {"url": sims["v1"]}},
        {"name": "v2", "weight": 0, "backend": backend}]}]  # fmt: skip
    config_path, raw = write_config(tmp_path, models)
    config = parse_config(raw)
    controller = Controller(config, tmp_path / "state")
    runtime = LocalRuntime(controller)
    controller.runtime = runtime
    good_port, picky_port = free_ports(2, avoid=listen_ports(raw))
    envoys: list[EnvoyProcess] = []

    def acked(node: str) -> dict[str, str] | None:
        found = [e for e in controller.xds.envoys() if e["node_id"] == node]
        types = found[0]["types"] if found else {}
        if len(types) < 4 or any(t["pending"] or not t["acked_version"] for t in types.values()):
            return None
        return {name: t["acked_version"] for name, t in types.items()}

    def picky_nacked() -> bool:
        found = [e for e in controller.xds.envoys() if e["node_id"] == "edge-old"]
        return bool(found) and found[0]["types"].get("rds", {}).get("nack") is not None

    def catalog(state) -> list[tuple[str, list[str]]]:
        return [(m.name, list(m.versions)) for m in state.models.values()]

    try:
        host, port = config.listen.xds.rsplit(":", 1)
        await controller.xds.start(host, int(port))
        runtime.adopt_url_backends()
        controller.rebuild()
        await runtime.start()
        envoys.append(EnvoyProcess(tmp_path, config_path, "edge-good", good_port))
        await until(lambda: _now(acked("edge-good")), 20, "edge-good to ACK everything")
        before_versions = acked("edge-good")
        before = catalog(controller.state)
        envoys.append(PickyEnvoy(tmp_path, config_path, "edge-old", picky_port))
        await until(lambda: _now(picky_nacked()), 20, "edge-old to NACK the routes")

        changes = [
            lambda: controller.add_version(MODEL, VersionConfig(name="v3", weight=0,
                                                                backend=backend)),
            lambda: controller.add_model(ModelConfig.model_validate(
                {"name": "qwen", "versions": [{"name": "v1", "weight": 100, "backend": backend}]})),
            lambda: controller.remove_version(MODEL, "v2"),
        ]  # fmt: skip
        for change in changes:
            with pytest.raises(EnvoyRejected, match="edge-old"):
                await change()
            assert catalog(controller.state) == before
            # The good Envoy took the change, then got the previous configuration back.
            await until(lambda: _now(acked("edge-good") == before_versions), 15,
                        "edge-good back on the previous configuration")  # fmt: skip
        restarted = Controller(config, tmp_path / "state")
        assert catalog(restarted.state) == before
        restarted.store.close()

        envoys.pop().stop()  # the NACKing Envoy leaves: the same changes go through
        await until(lambda: _now(not picky_nacked()), 15, "edge-old to leave")
        for change, added in zip(changes, [(MODEL, "v3"), ("qwen", "v1"), None], strict=True):
            await change()
            if added:  # its url backend probed ready: no endpoint change races the next one
                model, version = added
                ready = lambda m=model, v=version: controller.state.models[m].versions[v].ready  # noqa: E731
                await until(lambda ready=ready: _now(ready()), 10, f"{model}@{version} ready")
        assert catalog(controller.state) == [(MODEL, ["v1", "v3"]), ("qwen", ["v1"])]
    finally:
        for envoy in envoys:
            envoy.stop()
        await runtime.stop()
        await controller.xds.stop()
        controller.store.close()


async def _now(value):
    return value
