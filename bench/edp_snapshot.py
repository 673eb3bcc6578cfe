"""The same xDS snapshot as controlplane/xds/resources.py, built with envoy-data-plane.

For ADR 0001 (xds-protos vs betterproto): bench_snapshot.py runs this file with the Python
of a throwaway venv that has `envoy-data-plane` (betterproto2) installed, never the project's:

    python -m venv /tmp/edp && /tmp/edp/bin/pip install envoy-data-plane
    /tmp/edp/bin/python bench/edp_snapshot.py STATE.json OUT.json [--builds 200]

STATE.json describes the models (written by bench_snapshot.py); OUT.json gets the timings and
the serialized resources, which bench_snapshot.py parses with the project's protos to check
that both builders made the same configuration. Message construction mirrors resources.py
call for call (constructors, no dict parsing); rollout policies (sticky, mirror) are left out
because the benchmarked state has none.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import time

from envoy_data_plane.envoy.config.cluster import v3 as cluster
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.endpoint import v3 as endpoint
from envoy_data_plane.envoy.config.listener import v3 as listener
from envoy_data_plane.envoy.config.route import v3 as route
from envoy_data_plane.envoy.extensions.filters.http.json_to_metadata import v3 as j2m
from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts import v3 as previous_hosts
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.google.protobuf import Any, NullValue, Struct, Value

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
NS, HEADER, IDLE = "switchyard", "x-switchyard-version", datetime.timedelta(seconds=300)
ZERO = datetime.timedelta(0)


def ads() -> core.ConfigSource:
    return core.ConfigSource(
        ads=core.AggregatedConfigSource(), resource_api_version=core.ApiVersion.V3
    )


def address(host: str, port: int) -> core.Address:
    return core.Address(socket_address=core.SocketAddress(address=host, port_value=port))


def build_clusters(models: list[dict]) -> list[cluster.Cluster]:
    out = []
    for model in models:
        for version in model["versions"]:
            limits = cluster.CircuitBreakersThresholds(
                max_connections=100_000, max_pending_requests=100_000, max_requests=100_000,
                max_retries=1_000,
            )  # fmt: skip
            out.append(
                cluster.Cluster(
                    name=f"{model['name']}@{version['name']}",
                    type=cluster.ClusterDiscoveryType.EDS,
                    eds_cluster_config=cluster.ClusterEdsClusterConfig(eds_config=ads()),
                    connect_timeout=datetime.timedelta(seconds=1),
                    lb_policy=cluster.ClusterLbPolicy.LEAST_REQUEST,
                    circuit_breakers=cluster.CircuitBreakers(thresholds=[limits]),
                )
            )
    return out


def build_endpoints(models: list[dict]) -> list[endpoint.ClusterLoadAssignment]:
    return [
        endpoint.ClusterLoadAssignment(
            cluster_name=f"{model['name']}@{version['name']}",
            endpoints=[
                endpoint.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=address(*hp)))
                        for hp in version["endpoints"]
                    ]
                )
            ],
        )
        for model in models
        for version in model["versions"]
    ]


def pair(value: str | None) -> j2m.JsonToMetadataKeyValuePair:
    pair = j2m.JsonToMetadataKeyValuePair(metadata_namespace=NS, key="model")
    if value is not None:
        pair.value = Value(string_value=value)
    return pair


def build_listener(host: str, port: int) -> listener.Listener:
    body_to_metadata = j2m.JsonToMetadata(
        request_rules=j2m.JsonToMetadataMatchRules(
            rules=[
                j2m.JsonToMetadataRule(
                    selectors=[j2m.JsonToMetadataSelector(key="model")],
                    on_present=pair(None),
                    on_missing=pair("__missing__"),
                    on_error=pair("__invalid__"),
                )
            ],
            allow_content_types_regex=matcher.RegexMatcher(regex=".*"),
            allow_empty_content_type=True,
        )
    )
    manager = hcm.HttpConnectionManager(
        stat_prefix="switchyard",
        codec_type=hcm.HttpConnectionManagerCodecType.AUTO,
        rds=hcm.Rds(config_source=ads(), route_config_name="switchyard"),
        http_filters=[
            hcm.HttpFilter(
                name="envoy.filters.http.json_to_metadata", typed_config=Any.pack(body_to_metadata)
            ),
            hcm.HttpFilter(
                name="envoy.filters.http.router", typed_config=Any.pack(router.Router())
            ),
        ],
        stream_idle_timeout=IDLE,
        request_timeout=ZERO,
    )
    return listener.Listener(
        name="switchyard",
        address=address(host, port),
        per_connection_buffer_limit_bytes=32 * 1024 * 1024,
        filter_chains=[
            listener.FilterChain(
                filters=[
                    listener.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=Any.pack(manager),
                    )
                ]
            )
        ],
    )


def header(name: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=name, value=value),
        append_action=core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def header_exact(name: str, value: str) -> route.HeaderMatcher:
    return route.HeaderMatcher(name=name, string_match=matcher.StringMatcher(exact=value))


def metadata_match(value: str | None, *headers: route.HeaderMatcher) -> route.RouteMatch:
    if value is None:
        value_matcher = matcher.ValueMatcher(present_match=True)
    else:
        value_matcher = matcher.ValueMatcher(string_match=matcher.StringMatcher(exact=value))
    return route.RouteMatch(
        prefix="/",
        headers=list(headers),
        dynamic_metadata=[
            matcher.MetadataMatcher(
                filter=NS,
                path=[matcher.MetadataMatcherPathSegment(key="model")],
                value=value_matcher,
            )
        ],
    )


def forward(**action) -> route.RouteAction:
    return route.RouteAction(
        timeout=ZERO,
        idle_timeout=IDLE,
        retry_policy=route.RetryPolicy(
            retry_on="connect-failure,refused-stream,reset-before-request",
            num_retries=2,
            retry_host_predicate=[
                route.RetryPolicyRetryHostPredicate(
                    name="envoy.retry_host_predicates.previous_hosts",
                    typed_config=Any.pack(previous_hosts.PreviousHostsPredicate()),
                )
            ],
        ),
        **action,
    )


def openai_error(status: int, message: str, param, code=None) -> route.DirectResponseAction:
    def value(text):
        return Value(null_value=NullValue.NULL_VALUE) if text is None else Value(string_value=text)

    error = Struct(
        fields={"message": value(message), "type": value("invalid_request_error"),
                "param": value(param), "code": value(code)}
    )  # fmt: skip
    body = Struct(fields={"error": Value(struct_value=error)})
    return route.DirectResponseAction(
        status=status,
        body_format=core.SubstitutionFormatString(
            json_format=body, content_type="application/json"
        ),
    )


def model_routes(model: dict) -> list[route.Route]:
    name, versions = model["name"], model["versions"]
    routes = [
        route.Route(
            name=f"{name}/pin/{v['name']}",
            match=metadata_match(name, header_exact(HEADER, v["name"])),
            route=forward(cluster=f"{name}@{v['name']}"),
            response_headers_to_add=[header(HEADER, v["name"])],
        )
        for v in versions
    ]
    listed = ", ".join(v["name"] for v in versions)
    routes.append(
        route.Route(
            name=f"{name}/pin/unknown",
            match=metadata_match(name, route.HeaderMatcher(name=HEADER, present_match=True)),
            direct_response=openai_error(
                404,
                f"The model `{name}` has no version `%REQ({HEADER})%` (versions: {listed}).",
                param=HEADER,
                code="version_not_found",
            ),
        )
    )
    split = route.WeightedCluster(
        clusters=[
            route.WeightedClusterClusterWeight(
                name=f"{name}@{v['name']}",
                weight=v["weight"],
                response_headers_to_add=[header(HEADER, v["name"])],
            )
            for v in versions
        ]
    )
    routes.append(
        route.Route(
            name=f"{name}/split", match=metadata_match(name), route=forward(weighted_clusters=split)
        )
    )
    return routes


def error_routes() -> list[route.Route]:
    not_post = route.HeaderMatcher(
        name=":method", string_match=matcher.StringMatcher(exact="POST"), invert_match=True
    )
    missing = "The request body must be a JSON object with a `model` field."
    unknown = "The model `%DYNAMIC_METADATA(switchyard:model)%` does not exist."
    return [
        route.Route(
            name="error/missing-model",
            match=metadata_match("__missing__", header_exact(":method", "POST")),
            direct_response=openai_error(400, missing, param="model"),
        ),
        route.Route(
            name="error/invalid-body",
            match=metadata_match("__invalid__", header_exact(":method", "POST")),
            direct_response=openai_error(400, "The request body is not valid JSON.", param=None),
        ),
        route.Route(
            name="error/not-post",
            match=route.RouteMatch(prefix="/", headers=[not_post]),
            direct_response=openai_error(404, "Not found: %REQ(:path)%", param=None),
        ),
        route.Route(
            name="error/unknown-model",
            match=metadata_match(None),
            direct_response=openai_error(404, unknown, param="model", code="model_not_found"),
        ),
        route.Route(
            name="error/not-found",
            match=route.RouteMatch(prefix="/"),
            direct_response=openai_error(404, "Not found: %REQ(:path)%", param=None),
        ),
    ]


def build_route_config(models: list[dict]) -> route.RouteConfiguration:
    listing = {
        "object": "list",
        "data": [
            {"id": m["name"], "object": "model", "created": m["created"], "owned_by": "switchyard"}
            for m in models
        ],
    }
    listing_json = json.dumps(listing, separators=(",", ":"))
    routes = [
        route.Route(
            name="models",
            match=route.RouteMatch(path="/v1/models", headers=[header_exact(":method", "GET")]),
            direct_response=route.DirectResponseAction(
                status=200,
                body=core.DataSource(inline_string=listing_json),
            ),
            response_headers_to_add=[header("content-type", "application/json")],
        )
    ]
    for model in models:
        routes.extend(model_routes(model))
    routes.extend(error_routes())
    return route.RouteConfiguration(
        name="switchyard",
        virtual_hosts=[route.VirtualHost(name="openai", domains=["*"], routes=routes)],
        max_direct_response_body_size_bytes=max(4096, len(listing_json.encode()) + 1024),
    )


def build_snapshot(models: list[dict]) -> tuple[str, dict[str, list[bytes]]]:
    """Build, serialize into Any, hash per type: what Snapshot.from_resources does."""
    by_type = {
        CLUSTER: build_clusters(models),
        ENDPOINT: build_endpoints(models),
        LISTENER: [build_listener("127.0.0.1", 10000)],
        ROUTE: [build_route_config(models)],
    }
    serialized, versions = {}, []
    for type_url in TYPE_ORDER:
        digest = hashlib.blake2b(digest_size=8)
        serialized[type_url] = []
        for message in by_type[type_url]:
            packed = Any(type_url=type_url, value=bytes(message))
            name = message.cluster_name if type_url == ENDPOINT else message.name
            digest.update(name.encode())
            digest.update(packed.value)
            serialized[type_url].append(packed.value)
        versions.append(digest.hexdigest())
    return hashlib.blake2b("".join(versions).encode(), digest_size=8).hexdigest(), serialized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state")
    parser.add_argument("out")
    parser.add_argument("--builds", type=int, default=200)
    args = parser.parse_args()
    with open(args.state) as file:
        models = json.load(file)["models"]
    _, serialized = build_snapshot(models)  # warm up
    stages = {
        "snapshot": lambda: build_snapshot(models),
        "routes": lambda: build_route_config(models),
        "routes_bytes": lambda: bytes(build_route_config(models)),
    }
    timings = {}
    for name, function in stages.items():
        took = []
        for _ in range(args.builds):
            started = time.perf_counter()
            function()
            took.append((time.perf_counter() - started) * 1000)
        timings[name] = sorted(took)
    encoded = {t: [base64.b64encode(b).decode() for b in blobs] for t, blobs in serialized.items()}
    with open(args.out, "w") as file:
        json.dump({"timings_ms": timings, "resources": encoded}, file)


if __name__ == "__main__":
    main()
