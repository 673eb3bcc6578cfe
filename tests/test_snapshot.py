"""The state -> snapshot builder: versions, consistency, and what a weight change touches."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

from controlplane.config import parse_config
from controlplane.errors import Invalid
from controlplane.state import Endpoint, State, TrafficPolicy, apply_weights, check_weights
from controlplane.xds import resources
from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    TYPE_ORDER,
    InconsistentSnapshot,
    Snapshot,
    SnapshotBuilder,
    build_snapshot,
)

PROXY = resources.ProxySettings("127.0.0.1", 10000)


def _state(fillers: int = 0) -> State:
    """`chat` with two versions, and `fillers` more models like it."""
    models = [
        {
            "name": name,
            "versions": [
                {"name": "v1", "weight": 100, "backend": {"url": "http://127.0.0.1:8001"}},
                {"name": "v2", "weight": 0, "backend": {"url": "http://127.0.0.1:8002"}},
            ],
        }
        for name in ["chat", *(f"org/filler-{i}" for i in range(fillers))]
    ]
    state = State.from_config(parse_config({"models": models}))
    for model in state.models.values():
        for version in model.versions.values():
            version.endpoints, version.state = [Endpoint(version.backend.url)], "active"
    return state


def _routes(snapshot: Snapshot, model: str) -> route_pb2.RouteConfiguration:
    packed = snapshot.resources[ROUTE][resources.scope_name(model)]
    return route_pb2.RouteConfiguration.FromString(packed.value)


def test_a_weight_change_moves_only_the_route_version():
    state = _state()
    before = build_snapshot(state, PROXY)
    model = state.models["chat"]
    apply_weights(model, check_weights(model, {"v1": 50, "v2": 50}))
    after = build_snapshot(state, PROXY)
    assert after.version != before.version
    changed = {t for t in TYPE_ORDER if before.versions[t] != after.versions[t]}
    assert changed == {ROUTE}


def test_a_weight_change_sends_one_small_route_configuration_whatever_the_fleet():
    """Envoy runs `before`; the RDS response for the change carries the changed model's
    RouteConfiguration only: the same bytes with 1 model as with 1,001."""
    sizes = []
    for fillers in (0, 200, 1000):
        state = _state(fillers)
        builder = SnapshotBuilder(PROXY)
        before = builder.build(state)
        model = state.models["chat"]
        apply_weights(model, check_weights(model, {"v1": 50, "v2": 50}))
        after = builder.build(state)
        names = frozenset(before.resources[ROUTE])
        response = after.response(ROUTE, names, since=before.packed[ROUTE])
        assert [r.value for r in response.resources] == [
            after.resources[ROUTE][resources.scope_name("chat")].value
        ]
        sizes.append(len(after.payload(ROUTE, names, since=before.packed[ROUTE])))
        # Everything else is the previous snapshot's bytes, not rebuilt.
        for name, packed in after.resources[ROUTE].items():
            if name != resources.scope_name("chat"):
                assert packed is before.resources[ROUTE][name]
    assert len(set(sizes)) == 1 and sizes[0] < 4096, sizes


def test_every_model_has_a_scope_keyed_by_its_name_and_its_own_routes():
    from envoy.config.route.v3 import scoped_route_pb2

    state = _state(2)
    snapshot = build_snapshot(state, PROXY)
    scopes = [
        scoped_route_pb2.ScopedRouteConfiguration.FromString(packed.value)
        for packed in snapshot.resources[SCOPED_ROUTE].values()
    ]
    keys = {scope.key.fragments[0].string_key: scope.route_configuration_name for scope in scopes}
    assert keys == {
        "chat": "model/chat", "org/filler-0": "model/org/filler-0",
        "org/filler-1": "model/org/filler-1",
        resources.MISSING_MODEL: resources.MISSING_ROUTES,
        resources.INVALID_BODY: resources.INVALID_ROUTES,
    }  # fmt: skip
    assert set(keys.values()) == set(snapshot.resources[ROUTE])
    # A model's routes name only its own clusters.
    split = next(r for r in _routes(snapshot, "org/filler-1").virtual_hosts[0].routes
                 if r.name.endswith("/split"))  # fmt: skip
    assert {c.name for c in split.route.weighted_clusters.clusters} == {
        "org/filler-1@v1", "org/filler-1@v2"}  # fmt: skip


def test_same_state_same_version():
    assert build_snapshot(_state(), PROXY).version == build_snapshot(_state(), PROXY).version


def test_weighted_route_carries_every_version_and_its_header():
    snapshot = build_snapshot(_state(), PROXY)
    config = _routes(snapshot, "chat")
    split = next(r for r in config.virtual_hosts[0].routes if r.name == "chat/split")
    clusters = {c.name: c.weight.value for c in split.route.weighted_clusters.clusters}
    assert clusters == {"chat@v1": 100, "chat@v2": 0}
    headers = [
        c.response_headers_to_add[0].header.value for c in split.route.weighted_clusters.clusters
    ]
    assert headers == ["v1", "v2"]


def test_unready_endpoints_stay_out_of_eds():
    from envoy.config.endpoint.v3 import endpoint_pb2

    state = _state()
    state.models["chat"].versions["v2"].endpoints[0].ready = False
    snapshot = build_snapshot(state, PROXY)
    v2 = endpoint_pb2.ClusterLoadAssignment.FromString(
        snapshot.resources[ENDPOINT]["chat@v2"].value
    )
    assert sum(len(group.lb_endpoints) for group in v2.endpoints) == 0


def test_a_route_to_a_missing_cluster_is_refused():
    state = _state()
    clusters = [c for c in resources.build_clusters(state) if c.name != "chat@v2"]
    with pytest.raises(InconsistentSnapshot, match="chat@v2"):
        Snapshot.from_resources(
            {
                CLUSTER: clusters,
                ENDPOINT: [
                    e for e in resources.build_endpoints(state) if e.cluster_name != "chat@v2"
                ],
                LISTENER: [resources.build_listener(PROXY)],
                SCOPED_ROUTE: resources.build_scopes(state),
                ROUTE: resources.build_route_configs(state),
            }
        )


def test_a_scope_without_its_route_configuration_is_refused():
    state = _state()
    with pytest.raises(InconsistentSnapshot, match="model/chat"):
        Snapshot.from_resources(
            {
                CLUSTER: resources.build_clusters(state),
                ENDPOINT: resources.build_endpoints(state),
                LISTENER: [resources.build_listener(PROXY)],
                SCOPED_ROUTE: resources.build_scopes(state),
                ROUTE: [c for c in resources.build_route_configs(state) if c.name != "model/chat"],
            }
        )


def test_response_is_filtered_to_the_subscribed_names():
    snapshot = build_snapshot(_state(), PROXY)
    response = snapshot.response(ENDPOINT, frozenset({"chat@v2", "gone@v9"}))
    assert len(response.resources) == 1
    assert snapshot.response(CLUSTER, None).version_info == snapshot.versions[CLUSTER]
    # Serialized once per subscription, shared by every stream that has it.
    payload = snapshot.payload(ENDPOINT, frozenset({"chat@v2", "gone@v9"}))
    assert snapshot.payload(ENDPOINT, frozenset({"chat@v2", "gone@v9"})) is payload


@pytest.mark.parametrize(
    ("weights", "field", "fragment"),
    [
        ({"v3": 100}, "weights.v3", "no version 'v3'"),
        ({"v1": 99}, "weights", "sum to 100, got 99"),
        ({"v1": -10, "v2": 110}, "weights.v1", "from 0 to 100"),
        ({"v1": "100"}, "weights.v1", "integer"),
        ({"v1": True}, "weights.v1", "integer"),
        ({"v1": 50.0, "v2": 50}, "weights.v1", "integer"),
        ({}, "weights", "non-empty"),
        ([100], "weights", "non-empty object"),
    ],
)
def test_bad_weights_are_refused_and_change_nothing(weights, field, fragment):
    model = _state().models["chat"]
    with pytest.raises(Invalid) as caught:
        check_weights(model, weights)
    assert caught.value.field == field
    assert fragment in caught.value.message
    assert model.weights == {"v1": 100, "v2": 0}


def test_leaving_a_version_out_gives_it_zero_and_full_weight_makes_stable():
    model = _state().models["chat"]
    apply_weights(model, check_weights(model, {"v2": 100}))
    assert model.weights == {"v1": 0, "v2": 100}
    assert model.stable == "v2"


def test_the_incremental_builder_matches_a_fresh_build():
    state = _state(3)
    builder = SnapshotBuilder(PROXY)
    model = state.models["chat"]
    for weights in ({"v1": 100}, {"v1": 30, "v2": 70}, {"v2": 100}, {"v1": 100}):
        apply_weights(model, check_weights(model, weights))
        assert builder.build(state).versions == build_snapshot(state, PROXY).versions
    model.versions["v2"].endpoints[0].ready = False
    assert builder.build(state).versions == build_snapshot(state, PROXY).versions


def test_a_kept_route_configuration_takes_new_weights_exactly_as_a_fresh_build():
    """The builder keeps each model's RouteConfiguration and writes only the weights into
    it on a weight change: every byte equals a fresh build, across weights, a policy
    change (sticky, mirror) and a model named by the change or not."""
    state = _state(2)
    builder = SnapshotBuilder(PROXY)
    builder.build(state)
    model = state.models["chat"]
    steps = [
        ({"v1": 90, "v2": 10}, TrafficPolicy()),
        ({"v1": 0, "v2": 100}, TrafficPolicy()),
        ({"v1": 50, "v2": 50}, TrafficPolicy(sticky_header="x-user")),
        ({"v1": 100}, TrafficPolicy(sticky_header="x-user")),
        ({"v1": 80, "v2": 20}, TrafficPolicy(mirror_to="v2", mirror_percent=5)),
        ({"v1": 10, "v2": 90}, TrafficPolicy()),
    ]
    for weights, policy in steps:
        apply_weights(model, check_weights(model, weights))
        model.policy = policy
        built = builder.build(state, models=["chat"])
        fresh = build_snapshot(state, PROXY)
        assert built.resources[ROUTE] == fresh.resources[ROUTE]
        assert built.versions == fresh.versions
        split = next(r for r in _routes(built, "chat").virtual_hosts[0].routes
                     if r.name == "chat/split")  # fmt: skip
        got = {c.name.rpartition("@")[2]: c.weight.value
               for c in split.route.weighted_clusters.clusters}  # fmt: skip
        assert got == model.weights


def test_a_long_model_list_raises_envoys_direct_response_limit():
    config = parse_config(
        {
            "models": [
                {"name": f"org/model-with-a-long-name-{i:03d}", "versions": [
                    {"name": "v1", "weight": 100, "backend": {"url": "http://127.0.0.1:1"}}]}
                for i in range(120)
            ]
        }
    )  # fmt: skip
    route_config = resources.missing_model_routes(State.from_config(config), PROXY)
    body = route_config.virtual_hosts[0].routes[0].direct_response.body.inline_string
    assert len(body) > 4096
    assert route_config.max_direct_response_body_size_bytes.value >= len(body)


def _prefix_aware_state() -> State:
    state = _state()
    state.models["chat"].routing = "prefix_aware"
    state.models["chat"].versions["v1"].endpoints.append(Endpoint("http://127.0.0.1:8003"))
    return state


PICKED = resources.ProxySettings("127.0.0.1", 10000, picker=("127.0.0.1", 18001))


def test_a_prefix_aware_version_splits_to_its_hosts_then_stables_and_tells_the_picker():
    """No aggregate cluster (it would hide the picker's choice from override_host): an EDS
    cluster with the version's endpoints at priority 0 and stable's at 1; the split route
    turns the picker on and each weighted cluster names its version and endpoints."""
    snapshot = build_snapshot(_prefix_aware_state(), PICKED)
    split = cluster_pb2.Cluster.FromString(snapshot.resources[CLUSTER]["chat@v2"].value)
    assert split.type == cluster_pb2.Cluster.EDS
    policy = split.load_balancing_policy.policies[0].typed_extension_config
    assert policy.name == "envoy.load_balancing_policies.override_host"
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(
        snapshot.resources[ENDPOINT]["chat@v2/split"].value
    )
    ports = [[e.endpoint.address.socket_address.port_value for e in locality.lb_endpoints]
             for locality in cla.endpoints]  # fmt: skip
    assert [locality.priority for locality in cla.endpoints] == [0, 1]
    assert ports == [[8002], [8001, 8003]]
    assert resources.PICKER_CLUSTER in snapshot.resources[CLUSTER]

    split_route = next(r for r in _routes(snapshot, "chat").virtual_hosts[0].routes
                       if r.name == "chat/split")  # fmt: skip
    assert resources.EXT_PROC in split_route.typed_per_filter_config
    told = {}
    for weighted in split_route.route.weighted_clusters.clusters:
        config = ext_proc_pb2.ExtProcPerRoute()
        weighted.typed_per_filter_config[resources.EXT_PROC].Unpack(config)
        told[weighted.name] = {h.key: h.value for h in config.overrides.grpc_initial_metadata}
    candidates = "127.0.0.1:8001,127.0.0.1:8003"
    assert told["chat@v1"] == {resources.POOL_HEADER: "chat@v1",
                               resources.SUBSET_HEADER: candidates}  # fmt: skip


def test_an_endpoint_change_of_a_prefix_aware_model_moves_its_routes_too():
    """Its routes carry the endpoints (the picker's candidates); a least-request model's
    endpoint change stays an EDS push."""
    cases = (("prefix_aware", {ENDPOINT, ROUTE}), ("least_request", {ENDPOINT}))
    for routing, changed_types in cases:
        state = _prefix_aware_state()
        state.models["chat"].routing = routing
        builder = SnapshotBuilder(PICKED)
        before = builder.build(state)
        state.models["chat"].versions["v1"].endpoints.pop()
        after = builder.build(state, ["chat"])
        assert {t for t in TYPE_ORDER if before.versions[t] != after.versions[t]} == changed_types
        assert after.versions == build_snapshot(state, PICKED).versions  # as a fresh build
