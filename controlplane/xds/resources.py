"""The desired state turned into Envoy's xDS resources (protobuf messages).

Two clusters per model version: `<model>@<version>/hosts` holds the version's backends (EDS,
resource name `<model>@<version>`), actively health-checked with outlier detection; and
`<model>@<version>`, an aggregate cluster that the weighted split names: the version's hosts
first, then the stable version's hosts, so Envoy sends a dead canary's share to stable by
itself. Both report their stats as `<model>@<version>` (`alt_stat_name`), which is what the
health analysis reads. One listener whose `json_to_metadata` filter lifts the body's `model`
into dynamic metadata, and one route configuration that matches it: pinned versions first
(straight to the hosts, no failover), then the weighted split, then the OpenAI-style errors.
Built with message constructors (no dict parsing) because this runs on every change.
See docs/health.md, "Envoy-side protection".
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    health_check_pb2,
    http_service_pb2,
    http_uri_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2 as previous_priorities_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.metadata.v3 import metadata_pb2 as metadata_key_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from controlplane.config import OPENAI_POST_PATHS, Config, RetryPolicy, split_hostport
from controlplane.state import Model, State
from controlplane.xds import lora

LISTENER_NAME = "switchyard"
SCOPED_ROUTES_NAME = "switchyard"
METADATA_NAMESPACE = "switchyard"
VERSION_HEADER = "x-switchyard-version"
# The body's `model`, copied from dynamic metadata into this header by the listener: the key
# Envoy picks a model's scope (its own RouteConfiguration) by. Set by Envoy, never the client.
MODEL_HEADER = "x-switchyard-model"
PREVIEW_TOKEN_HEADER = "x-switchyard-preview-token"
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
MISSING_MODEL = "__missing__"  # json_to_metadata's marker: JSON body without `model`
INVALID_BODY = "__invalid__"  # json_to_metadata's marker: body is not JSON
# The route configurations of the two markers' scopes (the model list lives in the first:
# a GET has no body, so its `model` is missing).
MISSING_ROUTES = "switchyard/missing"
INVALID_ROUTES = "switchyard/invalid"
ANY_STRING = "\x00any string"  # _metadata_match: `model` is a string (whichever)
# Long generations stream for minutes: no total timeout, but a stream silent this long is dead.
STREAM_IDLE_TIMEOUT_S = 300
# Active health checks (vLLM's GET /health): a backend is out after two failed checks, within
# 2 s when its port refuses, about 3.5 s when it hangs (two 1 s timeouts, 1 s apart); one
# good answer brings it back. Before a cluster's first request (Envoy's "no traffic": a
# canary at 0 %, a model nobody called yet) a host that is new, failing or down is checked
# as often (Envoy's default there is 60 s), so a canary is known before its first request;
# one that passes is checked every IDLE_HEALTHY_INTERVAL_S only: with 1,000 models that
# is 200 checks a second on Envoy's main thread instead of 2,000, which delayed its xDS
# ACKs (docs/benchmarks.md 11.10). Such a host going down is seen within ~11 s, or at once
# by the runtime when its process or pod ends; a request meeting it first is retried.
HEALTH_PATH = "/health"
HEALTH_INTERVAL_S = 1
IDLE_HEALTHY_INTERVAL_S = 10
HEALTH_TIMEOUT_S = 1
UNHEALTHY_THRESHOLD = 2
HEALTHY_THRESHOLD = 1
# Outlier detection, from live traffic: 2 gateway failures in a row (refused or reset
# connection, 502/503/504) or 5 answers 5xx in a row eject the host for 2 s times the number
# of its ejections (at most 30 s); a passing health check lets it back at once.
CONSECUTIVE_GATEWAY_FAILURES = 2
CONSECUTIVE_5XX = 5
BASE_EJECTION_S = 2
MAX_EJECTION_S = 30
# What a retry may follow whatever the model's policy: the request never reached vLLM, so
# nothing was generated and nothing is generated twice.
NEVER_SENT = "connect-failure,refused-stream,reset-before-request"
AGGREGATE = "envoy.clusters.aggregate"
# Inference-aware routing (docs/routing.md): the endpoint picker is an ext_proc service that
# answers, as the Gateway API Inference Extension's endpoint pickers do, with the endpoints
# to use in this header and in dynamic metadata `envoy.lb`; the hosts' `override_host`
# load-balancing policy reads the metadata (a client cannot set it) and falls back to least
# request when it names no endpoint of the cluster.
PREFIX_AWARE = "prefix_aware"
PICKER_CLUSTER = "switchyard/picker"
EXT_PROC = "envoy.filters.http.ext_proc"
BUFFER = "envoy.filters.http.buffer"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
# What the route tells the picker: the version the weighted split chose, as
# `<model>@<version>`, and its ready endpoints (GIE's subset hint). Over gRPC, as metadata
# of its stream; over HTTP (ext_proc's `http_service`, which sends no gRPC metadata), as two
# request attributes Envoy evaluates (CEL) from the route's metadata, which holds both for
# each cluster the route may choose: the entry of the cluster it chose.
POOL_HEADER = "x-switchyard-pool"
SUBSET_HEADER = "x-gateway-destination-endpoint-subset"
PICKER_METADATA = "switchyard.picker"
PICKER_ATTRIBUTES = tuple(
    f"xds.route_metadata.filter_metadata['{PICKER_METADATA}'][xds.cluster_name].{key}"
    for key in ("pool", "subset")
)
PICKER_HTTP_PATH = "/ext_proc"
PICKER_TRANSPORTS = ("http", "grpc")
DEFAULT_PICKER_TIMEOUT_MS = 50


def stats_name(cluster: str) -> str:
    """The name a version's stats carry (in Envoy's stats, Prometheus and the stats push)."""
    return cluster.replace(".", "_")


def cluster_name(model: str, version: str) -> str:
    """The version's cluster as routes and stats know it (the aggregate; the EDS name)."""
    return f"{model}@{version}"


def hosts_cluster_name(model: str, version: str) -> str:
    """The cluster of the version's own backends (pins and mirrors go straight here)."""
    return f"{model}@{version}/hosts"


def split_eds_name(model: str, version: str) -> str:
    """EDS name of a prefix-aware version's split cluster: its hosts, then stable's."""
    return f"{model}@{version}/split"


def failover_order(model: Model, version: str) -> list[str]:
    """The versions an aggregate tries, in order: itself, then stable (never another)."""
    if version == model.stable or model.stable not in model.versions:
        return [version]
    return [version, model.stable]


@dataclass(frozen=True)
class ProxySettings:
    """What the listener and the routes need beyond the models: where to listen, which paths
    are public, how large a body may be, and the token a preview pin needs (if any)."""

    host: str
    port: int
    post_paths: tuple[str, ...] = OPENAI_POST_PATHS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    preview_token: str | None = None
    picker: tuple[str, int] | None = None  # where Envoy asks the endpoint picker, if at all
    # How: "http" (ext_proc's http_service; switchyard.yaml's default) or "grpc".
    picker_transport: str = "grpc"
    picker_timeout_ms: int = DEFAULT_PICKER_TIMEOUT_MS
    access_log: str | None = None  # a file for Envoy's JSON access log

    @classmethod
    def from_config(cls, config: Config, picker: str | None = None) -> ProxySettings:
        """`picker`: the endpoint picker's address for `picker.transport` (the Stack
        chooses the port)."""
        proxy = config.proxy
        return cls(
            *split_hostport(config.listen.proxy),
            post_paths=proxy.post_paths,
            max_request_bytes=proxy.max_request_bytes,
            preview_token=proxy.effective_preview_token(),
            picker=split_hostport(picker) if picker else None,
            picker_transport=config.picker.transport,
            picker_timeout_ms=config.picker.timeout_ms,
            access_log=proxy.access_log,
        )

    def public_path_regex(self) -> str:
        """The `:path` header (query included) of a request the models' routes may take."""
        alternatives = "|".join(re.escape(path) for path in self.post_paths)
        return rf"^({alternatives})(\?.*)?$"


def build_clusters(state: State) -> list[cluster_pb2.Cluster]:
    clusters = []
    for model in state.models.values():
        clusters.extend(model_clusters(model))
    return clusters


def model_clusters(model: Model) -> list[cluster_pb2.Cluster]:
    """Each version's hosts cluster, then its split cluster (itself, then stable).

    The split cluster is an aggregate of the two hosts clusters; for a `prefix_aware` model
    it is an EDS cluster of its own with stable's hosts as priority 1 instead, because
    Envoy's aggregate cluster hides the request from its members' load balancers, so
    `override_host` could never see the picker's choice through it (docs/routing.md)."""
    picked = model.routing == PREFIX_AWARE
    clusters = [_hosts_cluster(model.name, version, model.routing) for version in model.versions]
    for version in model.versions:
        name = cluster_name(model.name, version)
        if picked:
            clusters.append(_split_cluster(model.name, version))
            continue
        members = [hosts_cluster_name(model.name, v) for v in failover_order(model, version)]
        clusters.append(_aggregate_cluster(name, members))
    served = lora.served_names(model)
    if served is not None:  # LoRA adapters: the body names the chosen host's version's
        for cluster in clusters:
            lora.upstream_rewrite(cluster, served)
    return clusters


def _hosts_cluster(model: str, version: str, routing: str = "least_request") -> cluster_pb2.Cluster:
    name = cluster_name(model, version)
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_TEMPLATES[routing]())  # 5x faster than constructing the nested messages
    cluster.name = hosts_cluster_name(model, version)
    # One set of stats per version, whichever cluster counts; without dots, which Envoy would
    # read as the end of the cluster name ("llama-3.1-8b@v1" would be cluster "llama-3").
    cluster.alt_stat_name = stats_name(name)
    cluster.eds_cluster_config.service_name = name
    return cluster


def _split_cluster(model: str, version: str) -> cluster_pb2.Cluster:
    """A prefix-aware version's split cluster: its hosts at priority 0, stable's at 1 (as
    the aggregate: a version with no healthy host sends its share to stable)."""
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_picked_template())
    cluster.name = cluster_name(model, version)
    if "." in cluster.name:
        cluster.alt_stat_name = stats_name(cluster.name)
    cluster.eds_cluster_config.service_name = split_eds_name(model, version)
    return cluster


@functools.cache
def _hosts_template() -> cluster_pb2.Cluster:
    """A hosts cluster without its names: health checks, outlier detection, limits."""
    return cluster_pb2.Cluster(
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        circuit_breakers=_circuit_breakers(),
        health_checks=[_health_check()],
        outlier_detection=_outlier_detection(),
        # The controller removes an endpoint only when it must go (process gone, version
        # parked): do not keep it until Envoy's own checks fail.
        ignore_health_on_host_removal=True,
        # Health changes reach the load balancers at once, not merged over Envoy's default
        # 1 s (a new host would be skipped, or a dead one tried, that long).
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            update_merge_window=duration_pb2.Duration(seconds=0)
        ),
    )


@functools.cache
def _picked_template() -> cluster_pb2.Cluster:
    """A hosts cluster whose host is the picker's choice when it made one (the endpoints
    in metadata `envoy.lb`, tried in order by the attempts of a request), else least
    request. Envoy does not check the named host's health: the picker leaves out the
    endpoints it cannot reach."""
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_hosts_template())
    cluster.ClearField("lb_policy")
    fallback = cluster_pb2.LoadBalancingPolicy(
        policies=[_lb_policy("envoy.load_balancing_policies.least_request",
                             least_request_pb2.LeastRequest())]
    )  # fmt: skip
    override = override_host_pb2.OverrideHost(
        override_host_sources=[
            override_host_pb2.OverrideHost.OverrideHostSource(
                metadata=metadata_key_pb2.MetadataKey(
                    key=LB_NAMESPACE,
                    path=[metadata_key_pb2.MetadataKey.PathSegment(key=DESTINATION_HEADER)],
                )
            )
        ],
        fallback_policy=fallback,
    )
    cluster.load_balancing_policy.CopyFrom(
        cluster_pb2.LoadBalancingPolicy(
            policies=[_lb_policy("envoy.load_balancing_policies.override_host", override)]
        )
    )
    return cluster


@functools.cache
def _round_robin_template() -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_hosts_template())
    cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    return cluster


_TEMPLATES = {
    "least_request": _hosts_template,
    PREFIX_AWARE: _picked_template,
    "round_robin": _round_robin_template,
}


def _lb_policy(name: str, config) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(
            name=name, typed_config=_pack(config)
        )
    )


def picker_cluster(proxy: ProxySettings) -> cluster_pb2.Cluster:
    """The endpoint picker, over HTTP/2 (gRPC) or HTTP/1.1 (kept-alive connections, one
    request at a time each). A short connect timeout: a dead picker costs a request that
    much before Envoy goes on without it (fail-open)."""
    assert proxy.picker is not None
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig
    if proxy.picker_transport == "grpc":
        protocol = explicit(http2_protocol_options=protocol_pb2.Http2ProtocolOptions())
    else:
        protocol = explicit(http_protocol_options=protocol_pb2.Http1ProtocolOptions())
    options = http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=protocol)
    host = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_address(*proxy.picker))
    )
    return cluster_pb2.Cluster(
        name=PICKER_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_duration(proxy.picker_timeout_ms / 1000),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=PICKER_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[host])],
        ),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(options)
        },
        circuit_breakers=_circuit_breakers(),
    )


def _aggregate_cluster(name: str, members: list[str]) -> cluster_pb2.Cluster:
    """Envoy picks the first member with a healthy host, so a dead canary's share goes to
    stable. Requests, retries and latency count under this cluster's name: the version's."""
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(_aggregate_template())
    cluster.name = name
    if "." in name:
        cluster.alt_stat_name = stats_name(name)  # as the hosts cluster's (see there)
    members_config = aggregate_pb2.ClusterConfig(clusters=members)
    cluster.cluster_type.typed_config.value = members_config.SerializeToString()
    return cluster


@functools.cache
def _aggregate_template() -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name=AGGREGATE, typed_config=_pack(aggregate_pb2.ClusterConfig())
        ),
        # The router counts retries against the route's cluster: this one.
        circuit_breakers=_circuit_breakers(),
    )


@functools.cache
def _circuit_breakers() -> circuit_breaker_pb2.CircuitBreakers:
    # vLLM queues internally; Envoy's default of 1024 concurrent requests would cap a fleet,
    # and its default of 3 concurrent retries would fail requests a dead canary could retry.
    limits = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=wrappers_pb2.UInt32Value(value=100_000),
        max_pending_requests=wrappers_pb2.UInt32Value(value=100_000),
        max_requests=wrappers_pb2.UInt32Value(value=100_000),
        max_retries=wrappers_pb2.UInt32Value(value=1_000),
    )
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[limits])


@functools.cache
def _health_check() -> health_check_pb2.HealthCheck:
    interval = duration_pb2.Duration(seconds=HEALTH_INTERVAL_S)
    return health_check_pb2.HealthCheck(
        timeout=duration_pb2.Duration(seconds=HEALTH_TIMEOUT_S),
        interval=interval,
        no_traffic_interval=interval,
        no_traffic_healthy_interval=duration_pb2.Duration(seconds=IDLE_HEALTHY_INTERVAL_S),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=UNHEALTHY_THRESHOLD),
        healthy_threshold=wrappers_pb2.UInt32Value(value=HEALTHY_THRESHOLD),
        http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(
            host="localhost", path=HEALTH_PATH
        ),
    )


@functools.cache
def _outlier_detection() -> outlier_detection_pb2.OutlierDetection:
    return outlier_detection_pb2.OutlierDetection(
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=CONSECUTIVE_GATEWAY_FAILURES),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        consecutive_5xx=wrappers_pb2.UInt32Value(value=CONSECUTIVE_5XX),
        interval=duration_pb2.Duration(seconds=1),
        base_ejection_time=duration_pb2.Duration(seconds=BASE_EJECTION_S),
        max_ejection_time=duration_pb2.Duration(seconds=MAX_EJECTION_S),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
    )


def build_endpoints(state: State) -> list[endpoint_pb2.ClusterLoadAssignment]:
    return [cla for model in state.models.values() for cla in model_endpoints(model)]


def model_endpoints(model: Model) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """Only ready endpoints: traffic must never reach a backend that cannot answer.

    Each endpoint carries its version in metadata: with failover, the response header
    `x-switchyard-version` is read from the host that answered."""
    assignments = []
    for version in model.versions.values():
        metadata = _version_metadata(version.name)
        lb_endpoints = [
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=_address(*ep.host_port)),
                metadata=metadata,
            )
            for ep in version.endpoints
            if ep.ready
        ]
        assignments.append(
            endpoint_pb2.ClusterLoadAssignment(
                cluster_name=cluster_name(model.name, version.name),
                endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)],
            )
        )
    if model.routing == PREFIX_AWARE:
        assignments.extend(_split_endpoints(model, assignments))
    return assignments


def _split_endpoints(model: Model, hosts: list) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """A prefix-aware version's split cluster: its endpoints at priority 0, then stable's."""
    by_version = dict(zip(model.versions, hosts, strict=True))
    assignments = []
    for version in model.versions:
        order = failover_order(model, version)
        localities = []
        for priority, member in enumerate(order):
            locality = endpoint_components_pb2.LocalityLbEndpoints(priority=priority)
            locality.lb_endpoints.extend(by_version[member].endpoints[0].lb_endpoints)
            localities.append(locality)
        assignments.append(
            endpoint_pb2.ClusterLoadAssignment(
                cluster_name=split_eds_name(model.name, version), endpoints=localities
            )
        )
    return assignments


@functools.cache
def _version_metadata(version: str) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[METADATA_NAMESPACE].update({"version": version})
    return metadata


def build_listener(proxy: ProxySettings) -> listener_pb2.Listener:
    """The one listener. Its filters lift the body's `model` into dynamic metadata
    (json_to_metadata) and copy it into MODEL_HEADER (header_mutation, which then resolves
    the route: after the header is set); the connection manager's scoped routes look the
    header up in a hash table of scopes, one per model, so a request costs the same with
    one model as with a thousand, and a weight change re-sends one model's routes."""
    body_to_metadata = json_to_metadata_pb2.JsonToMetadata(
        request_rules=json_to_metadata_pb2.JsonToMetadata.MatchRules(
            rules=[
                json_to_metadata_pb2.JsonToMetadata.Rule(
                    selectors=[json_to_metadata_pb2.JsonToMetadata.Selector(key="model")],
                    on_present=_metadata_pair(None),
                    on_missing=_metadata_pair(MISSING_MODEL),
                    on_error=_metadata_pair(INVALID_BODY),
                )
            ],
            # `curl -d` sends form-urlencoded: read every body as JSON, whatever it claims.
            allow_content_types_regex=regex_pb2.RegexMatcher(regex=".*"),
            allow_empty_content_type=True,
        )
    )
    model_to_header = header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(
            request_mutations=[
                mutation_rules_pb2.HeaderMutation(remove=MODEL_HEADER),
                # Only the picker says which endpoint to use, never the client.
                mutation_rules_pb2.HeaderMutation(remove=DESTINATION_HEADER),
                mutation_rules_pb2.HeaderMutation(
                    append=_header(
                        MODEL_HEADER, f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:model)%"
                    )
                ),
            ]
        )
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="switchyard",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        scoped_routes=hcm_pb2.ScopedRoutes(
            name=SCOPED_ROUTES_NAME,
            scope_key_builder=_scope_key_builder(),
            rds_config_source=_ads(),
            scoped_rds=hcm_pb2.ScopedRds(scoped_rds_config_source=_ads()),
        ),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.json_to_metadata", typed_config=_pack(body_to_metadata)
            ),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.header_mutation", typed_config=_pack(model_to_header)
            ),
            *_picker_filters(proxy),
            lora.listener_filter(),  # LoRA adapters: a version's routes rewrite the body
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())
            ),
        ],
        stream_idle_timeout=duration_pb2.Duration(seconds=STREAM_IDLE_TIMEOUT_S),
        request_timeout=duration_pb2.Duration(seconds=0),
        # The routes see, and the backends get, one canonical path: `/v1/../sleep`, `//sleep`
        # and `/v1%2F..%2Fsleep` are all `/sleep` before matching (and then a 404).
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD,
        local_reply_config=_local_replies(),
        access_log=_access_log(proxy),
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=_address(proxy.host, proxy.port),
        # json_to_metadata buffers the request body to read `model`; a body over this limit
        # gets 413 (in the OpenAI shape: _local_replies).
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=proxy.max_request_bytes),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_pack(manager),
                    )
                ]
            )
        ],
    )


def _picker_filters(proxy: ProxySettings) -> list[hcm_pb2.HttpFilter]:
    """The endpoint picker's ext_proc filter, then a buffer. The filter sends nothing (and
    opens no stream) unless the route says to send the body: the routes of `prefix_aware`
    models (_picker_on). A route cannot switch on a filter the listener disables: Envoy
    decides that before the scoped route is known. The picker gets the buffered body only
    (one message, one round trip); the buffer holds the request until the picker answered,
    since the router would choose a host as soon as the headers reach it (json_to_metadata
    has buffered the body already, so it costs the other requests nothing). Fail-open: a
    picker slower than `picker.timeout_ms`, unreachable or erring costs nothing but that
    wait, and the host is then least request's. Over HTTP (ext_proc's `http_service`),
    Envoy POSTs each message as JSON to the picker's PICKER_HTTP_PATH."""
    if proxy.picker is None:
        return []
    mode = processing_mode_pb2.ProcessingMode
    nothing = mode(
        request_header_mode=mode.SKIP, response_header_mode=mode.SKIP,
        request_body_mode=mode.NONE, response_body_mode=mode.NONE,
        request_trailer_mode=mode.SKIP, response_trailer_mode=mode.SKIP,
    )  # fmt: skip
    timeout = _duration(proxy.picker_timeout_ms / 1000)
    picker = ext_proc_pb2.ExternalProcessor(
        failure_mode_allow=True,
        message_timeout=timeout,
        processing_mode=nothing,
        metadata_options=ext_proc_pb2.MetadataOptions(
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[LB_NAMESPACE]
            )
        ),
        stat_prefix="picker",
    )
    if proxy.picker_transport == "grpc":
        picker.grpc_service.envoy_grpc.cluster_name = PICKER_CLUSTER
    else:
        # Evaluated only for the messages sent: the routes of prefix_aware models. (A
        # route's own request_attributes are not sent: measured with Envoy 1.40.)
        picker.request_attributes.extend(PICKER_ATTRIBUTES)
        host, port = proxy.picker
        uri = http_uri_pb2.HttpUri(
            uri=f"http://{_host_in_url(host)}:{port}{PICKER_HTTP_PATH}",
            cluster=PICKER_CLUSTER,
            timeout=timeout,
        )
        picker.http_service.http_service.CopyFrom(http_service_pb2.HttpService(http_uri=uri))
    hold = buffer_pb2.Buffer(max_request_bytes=wrappers_pb2.UInt32Value(
        value=proxy.max_request_bytes))  # fmt: skip
    return [
        hcm_pb2.HttpFilter(name=EXT_PROC, typed_config=_pack(picker)),
        hcm_pb2.HttpFilter(name=BUFFER, typed_config=_pack(hold)),
    ]


@functools.cache
def _body_only() -> processing_mode_pb2.ProcessingMode:
    mode = processing_mode_pb2.ProcessingMode
    return mode(
        request_header_mode=mode.SKIP, response_header_mode=mode.SKIP,
        request_body_mode=mode.BUFFERED, response_body_mode=mode.NONE,
        request_trailer_mode=mode.SKIP, response_trailer_mode=mode.SKIP,
    )  # fmt: skip


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _picker_on(
    pool: str | None = None, subset: str = "", send_body: bool = True
) -> any_pb2.Any:
    """A route's ext_proc config that sends the body to the picker; with `pool`, it also
    tells the picker (gRPC metadata of its stream) the version (`<model>@<version>`) the
    route chose and its ready endpoints, the candidates. A weighted cluster's own config
    (`send_body=False`: only the version) adds to its route's: Envoy merges them."""
    overrides = ext_proc_pb2.ExtProcOverrides()
    if send_body:
        overrides.processing_mode.CopyFrom(_body_only())
    if pool is not None:
        overrides.grpc_initial_metadata.extend([
            base_pb2.HeaderValue(key=POOL_HEADER, value=pool),
            base_pb2.HeaderValue(key=SUBSET_HEADER, value=subset),
        ])  # fmt: skip
    return _pack(ext_proc_pb2.ExtProcPerRoute(overrides=overrides))


def _tell_picker(route: route_components_pb2.Route, clusters: dict[str, tuple[str, str]]) -> None:
    """The HTTP transport's candidates: for each cluster the route may choose, the version
    (`<model>@<version>`) and its ready endpoints, in the route's metadata, where
    PICKER_ATTRIBUTES find the entry of the cluster it chose."""
    told = route.metadata.filter_metadata[PICKER_METADATA]
    for cluster, (pool, subset) in clusters.items():
        told.fields[cluster].struct_value.update({"pool": pool, "subset": subset})


def _subset(model: Model, version: str) -> str:
    """The version's ready endpoints as GIE writes them: `ip:port,ip:port`."""
    hosts = sorted(
        f"{host}:{port}"
        for host, port in (ep.host_port for ep in model.versions[version].endpoints if ep.ready)
    )
    return ",".join(hosts)


def _access_log(proxy: ProxySettings) -> list[accesslog_pb2.AccessLog]:
    """`proxy.access_log`: one JSON line per request. `picker_us` is the time the request
    waited for the endpoint picker (Envoy's own measure of its ext_proc call; empty when
    the route does not use it), `endpoint` the host that served it."""
    if proxy.access_log is None:
        return []
    fields = struct_pb2.Struct()
    fields.update({
        "time": "%START_TIME%",
        "model": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:model)%",
        "version": f"%RESP({VERSION_HEADER})%",
        "path": "%REQ(:PATH)%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "first_byte_ms": "%RESPONSE_DURATION%",
        "endpoint": "%UPSTREAM_HOST%",
        "picker_us": f"%FILTER_STATE({EXT_PROC}:FIELD:request_body_total_latency_us)%",
        "picked": f"%DYNAMIC_METADATA({LB_NAMESPACE}:{DESTINATION_HEADER})%",
    })  # fmt: skip
    log = file_pb2.FileAccessLog(
        path=proxy.access_log,
        log_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=fields),
    )
    return [accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=_pack(log))]


def _scope_key_builder() -> hcm_pb2.ScopedRoutes.ScopeKeyBuilder:
    """The scope key is MODEL_HEADER's whole value."""
    fragment = hcm_pb2.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder
    return hcm_pb2.ScopedRoutes.ScopeKeyBuilder(
        fragments=[
            fragment(
                header_value_extractor=fragment.HeaderValueExtractor(name=MODEL_HEADER, index=0)
            )
        ]
    )


def _local_replies() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own answers in the OpenAI error shape, as the `openai` SDK reads them: 413 for
    a body too large; and for a `model` no scope has (Envoy's "no route", NR), 404
    `model_not_found` when it is a string, else 400. Every other answer Envoy makes itself is
    a route's direct response, already in that shape."""
    too_large = _openai_error(
        413, "The request body is larger than the proxy accepts (proxy.max_request_bytes).",
        param=None, code="request_too_large",
    )  # fmt: skip
    unknown = _openai_error(
        404, f"The model `%DYNAMIC_METADATA({METADATA_NAMESPACE}:model)%` does not exist.",
        param="model", code="model_not_found",
    )  # fmt: skip
    no_route = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NR"])
    )
    model_is_a_string = accesslog_pb2.AccessLogFilter(
        metadata_filter=accesslog_pb2.MetadataFilter(matcher=_model_matcher(ANY_STRING))
    )
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(
                filter=accesslog_pb2.AccessLogFilter(
                    status_code_filter=accesslog_pb2.StatusCodeFilter(
                        comparison=accesslog_pb2.ComparisonFilter(
                            op=accesslog_pb2.ComparisonFilter.EQ,
                            value=base_pb2.RuntimeUInt32(default_value=413, runtime_key="_"),
                        )
                    )
                ),
                body_format_override=too_large.body_format,
            ),
            hcm_pb2.ResponseMapper(
                filter=accesslog_pb2.AccessLogFilter(
                    and_filter=accesslog_pb2.AndFilter(filters=[no_route, model_is_a_string])
                ),
                status_code=wrappers_pb2.UInt32Value(value=404),
                body_format_override=unknown.body_format,
            ),
            hcm_pb2.ResponseMapper(
                filter=no_route,
                status_code=wrappers_pb2.UInt32Value(value=400),
                body_format_override=_not_a_string().body_format,
            ),
        ]
    )


def _not_a_string() -> route_components_pb2.DirectResponseAction:
    return _openai_error(400, "The request body's `model` must be a string.", param="model")


def scope_name(model: str) -> str:
    """A model's scope and the name of its RouteConfiguration."""
    return f"model/{model}"


def build_scopes(state: State) -> list[scoped_route_pb2.ScopedRouteConfiguration]:
    """One scope per model, keyed by its name, and one per marker (no `model`, not JSON)."""
    scopes = [
        _scope(MISSING_ROUTES, MISSING_MODEL, MISSING_ROUTES),
        _scope(INVALID_ROUTES, INVALID_BODY, INVALID_ROUTES),
    ]
    for name in state.models:
        scopes.append(_scope(scope_name(name), name, scope_name(name)))
    return scopes


def _scope(name: str, key: str, routes: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    return scoped_route_pb2.ScopedRouteConfiguration(
        name=name,
        route_configuration_name=routes,
        key=scoped_route_pb2.ScopedRouteConfiguration.Key(
            fragments=[scoped_route_pb2.ScopedRouteConfiguration.Key.Fragment(string_key=key)]
        ),
    )


def build_route_configs(
    state: State,
    proxy: ProxySettings | None = None,
    route_config_of: Callable[[Model], route_pb2.RouteConfiguration] | None = None,
) -> list[route_pb2.RouteConfiguration]:
    """The markers' route configurations, then one per model (`route_config_of` may serve
    them from a cache)."""
    proxy = proxy or ProxySettings("127.0.0.1", 0)
    configs = [missing_model_routes(state, proxy), invalid_body_routes(proxy)]
    route_config_of = route_config_of or functools.partial(model_route_config, proxy=proxy)
    configs.extend(route_config_of(model) for model in state.models.values())
    return configs


def model_route_config(model: Model, proxy: ProxySettings) -> route_pb2.RouteConfiguration:
    """Everything a request for `model` can meet: the gates, its pins and its split, and a
    400 for a `model` that only looks like this one (a number whose digits are its name)."""
    routes = [*_gate_routes(proxy), *model_routes(model, proxy)]
    routes.append(
        route_components_pb2.Route(
            name="error/model-not-a-string",
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=_not_a_string(),
        )
    )
    return _route_config(scope_name(model.name), routes)


def set_split_weights(config: route_pb2.RouteConfiguration, model: Model) -> None:
    """Give `config` (what model_route_config made for `model`, with the same versions)
    the model's weights now: they are in its split route alone, one per version in order.
    A weight change then costs a few field writes instead of building every route again."""
    split = f"{model.name}/split"
    for route in config.virtual_hosts[0].routes:
        if route.name == split:
            clusters = route.route.weighted_clusters.clusters
            for weighted, version in zip(clusters, model.versions.values(), strict=True):
                weighted.weight.value = version.weight
            return
    raise ValueError(f"route configuration {config.name!r} has no route {split!r}")


def missing_model_routes(state: State, proxy: ProxySettings) -> route_pb2.RouteConfiguration:
    """A request without `model`: the model list (a GET has no body), the gates, a 400."""
    models_list = models_list_body(state)
    routes = [
        _models_list_route(models_list),
        *_gate_routes(proxy),
        route_components_pb2.Route(
            name="error/missing-model",
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=_openai_error(
                400, "The request body must be a JSON object with a `model` field.", param="model"
            ),
        ),
    ]
    config = _route_config(MISSING_ROUTES, routes)
    # Envoy refuses direct responses over 4 KiB by default: about 40 models' list.
    config.max_direct_response_body_size_bytes.value = max(4096, len(models_list.encode()) + 1024)
    return config


def invalid_body_routes(proxy: ProxySettings) -> route_pb2.RouteConfiguration:
    routes = [
        *_gate_routes(proxy),
        route_components_pb2.Route(
            name="error/invalid-body",
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=_openai_error(400, "The request body is not valid JSON.", param=None),
        ),
    ]
    return _route_config(INVALID_ROUTES, routes)


def _route_config(name: str, routes: list) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="openai", domains=["*"], routes=routes)
        ],
        # The preview token is for Envoy, never for the backends; nor is the scope key.
        request_headers_to_remove=[PREVIEW_TOKEN_HEADER, MODEL_HEADER],
    )


@functools.cache
def _gate_routes(proxy: ProxySettings) -> tuple[route_components_pb2.Route, ...]:
    """404 for whatever is not an OpenAI call, 403 for a pin without the preview token.

    A backend's own endpoints (vLLM's /sleep, /collective_rpc, the simulator's /sim/faults)
    share its port with the OpenAI API: these routes, first in every scope, are what keeps
    them private."""
    routes = [
        route_components_pb2.Route(
            name="error/not-post",
            match=route_components_pb2.RouteMatch(
                prefix="/", headers=[_header_exact(":method", "POST", invert=True)]
            ),
            direct_response=_openai_error(404, "Not found: %REQ(:path)%", param=None),
        ),
        route_components_pb2.Route(
            name="error/not-openai",
            match=route_components_pb2.RouteMatch(
                prefix="/",
                headers=[
                    route_components_pb2.HeaderMatcher(
                        name=":path",
                        string_match=string_pb2.StringMatcher(
                            safe_regex=regex_pb2.RegexMatcher(regex=proxy.public_path_regex())
                        ),
                        invert_match=True,
                    )
                ],
            ),
            direct_response=_openai_error(404, "Not found: %REQ(:path)%", param=None),
        ),
    ]
    if proxy.preview_token:
        routes.append(
            route_components_pb2.Route(
                name="error/preview-forbidden",
                match=route_components_pb2.RouteMatch(
                    prefix="/",
                    headers=[
                        route_components_pb2.HeaderMatcher(name=VERSION_HEADER, present_match=True),
                        _header_exact(PREVIEW_TOKEN_HEADER, proxy.preview_token, invert=True),
                    ],
                ),
                direct_response=_openai_error(
                    403,
                    f"Pinning a version with {VERSION_HEADER} needs a valid"
                    f" {PREVIEW_TOKEN_HEADER} header.",
                    param=VERSION_HEADER,
                    code="preview_forbidden",
                ),
            )
        )
    return tuple(routes)


def model_routes(
    model: Model, proxy: ProxySettings | None = None
) -> list[route_components_pb2.Route]:
    """Pinned versions (preview header), an unknown pin, then the weighted split.

    A pin goes to that version's hosts only (no failover); the split goes to each version's
    split cluster, whose answer may come from stable: the header names the host's version.
    For a `prefix_aware` model every one of these routes turns the endpoint picker on and
    tells it the version it chose (docs/routing.md).
    """
    retries, rolling_out = model.retries, model.active_rollout is not None
    picked = proxy is not None and proxy.picker is not None and model.routing == PREFIX_AWARE
    over_http = picked and proxy.picker_transport == "http"
    served = lora.served_names(model)  # LoRA adapters: the body's model per version
    routes = []
    for version in model.versions.values():
        pin = route_components_pb2.Route(
            name=f"{model.name}/pin/{version.name}",
            match=_metadata_match(model.name, _header_exact(VERSION_HEADER, version.name)),
            route=_forward(
                retries, rolling_out, cluster=hosts_cluster_name(model.name, version.name)
            ),
            response_headers_to_add=[_version_header(version.name)],
        )
        if over_http:
            pool = cluster_name(model.name, version.name)
            pin.typed_per_filter_config[EXT_PROC].CopyFrom(_picker_on())
            _tell_picker(pin, {pin.route.cluster: (pool, _subset(model, version.name))})
        elif picked:
            pool = cluster_name(model.name, version.name)
            pin.typed_per_filter_config[EXT_PROC].CopyFrom(
                _picker_on(pool, _subset(model, version.name))
            )
        if served is not None:
            lora.rewrite_on(pin.typed_per_filter_config, served[version.name])
        routes.append(pin)
    versions = ", ".join(model.versions)
    routes.append(
        route_components_pb2.Route(
            name=f"{model.name}/pin/unknown",
            match=_metadata_match(
                model.name,
                route_components_pb2.HeaderMatcher(name=VERSION_HEADER, present_match=True),
            ),
            direct_response=_openai_error(
                404,
                f"The model `{model.name}` has no version `%REQ({VERSION_HEADER})%`"
                f" (versions: {versions}).",
                param=VERSION_HEADER,
                code="version_not_found",
            ),
        )
    )
    split = route_components_pb2.WeightedCluster(
        clusters=[
            route_components_pb2.WeightedCluster.ClusterWeight(
                name=cluster_name(model.name, version.name),
                weight=wrappers_pb2.UInt32Value(value=version.weight),
                # The version of the host that answered; this one when none did (a 503).
                response_headers_to_add=[_version_header(version.name), _served_by_header()],
            )
            for version in model.versions.values()
        ]
    )
    action = _forward(retries, rolling_out, weighted_clusters=split)
    _apply_policy(model, action)
    route = route_components_pb2.Route(
        name=f"{model.name}/split", match=_metadata_match(model.name), route=action
    )
    if over_http:
        # Envoy picks the weighted cluster when it resolves the route, before the filters
        # run: the attributes name the cluster it got (xds.cluster_name).
        route.typed_per_filter_config[EXT_PROC].CopyFrom(_picker_on())
        _tell_picker(route, {
            weighted.name: (weighted.name, _subset(model, weighted.name.rpartition("@")[2]))
            for weighted in route.route.weighted_clusters.clusters
        })  # fmt: skip
    elif picked:
        # Envoy picks the weighted cluster when it resolves the route, before the filters
        # run: each cluster's own per-filter config tells the picker which version it got.
        route.typed_per_filter_config[EXT_PROC].CopyFrom(_picker_on())
        for weighted in route.route.weighted_clusters.clusters:
            version = weighted.name.rpartition("@")[2]
            pool = _picker_on(weighted.name, _subset(model, version), send_body=False)
            weighted.typed_per_filter_config[EXT_PROC].CopyFrom(pool)
    if served is not None:  # the chosen version's own: a rewrite never draws it again
        for weighted in route.route.weighted_clusters.clusters:
            lora.rewrite_on(weighted.typed_per_filter_config,
                            served[weighted.name.rpartition("@")[2]])  # fmt: skip
    routes.append(route)
    return routes


def _apply_policy(model: Model, action: route_components_pb2.RouteAction) -> None:
    """Sticky A/B (the split follows a hash of a header or cookie) and mirroring."""
    policy = model.policy
    if policy.sticky_header or policy.sticky_cookie:
        hashing = route_components_pb2.RouteAction.HashPolicy()
        if policy.sticky_header:
            hashing.header.header_name = policy.sticky_header
        else:
            hashing.cookie.name = policy.sticky_cookie
        action.hash_policy.append(hashing)
        action.weighted_clusters.use_hash_policy.value = True
    if policy.mirror_to and policy.mirror_percent:
        mirror = route_components_pb2.RouteAction.RequestMirrorPolicy(
            cluster=hosts_cluster_name(model.name, policy.mirror_to)  # no failover: discarded
        )
        mirror.runtime_fraction.default_value.numerator = policy.mirror_percent
        action.request_mirror_policies.append(mirror)


def models_list_body(state: State) -> str:
    """The OpenAI model list of `GET /v1/models`, which Envoy answers itself."""
    body = {
        "object": "list",
        "data": [
            {
                "id": model.name,
                "object": "model",
                "created": model.created,
                "owned_by": "switchyard",
            }
            for model in state.models.values()
        ],
    }
    return json.dumps(body, separators=(",", ":"))


def _models_list_route(body: str) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name="models",
        match=route_components_pb2.RouteMatch(
            path="/v1/models", headers=[_header_exact(":method", "GET")]
        ),
        direct_response=route_components_pb2.DirectResponseAction(
            status=200,
            body=base_pb2.DataSource(inline_string=body),
        ),
        response_headers_to_add=[_header("content-type", "application/json")],
    )


def _openai_error(
    status: int, message: str, param: str | None, code: str | None = None
) -> route_components_pb2.DirectResponseAction:
    """A JSON error body; Envoy's formatter fills in %...% and escapes the values."""
    error = struct_pb2.Struct()
    error.update(
        {
            "message": message,
            "type": "invalid_request_error",
            "param": param,  # None becomes JSON null, as OpenAI sends it
            "code": code,
        }
    )
    body = struct_pb2.Struct()
    body.fields["error"].struct_value.CopyFrom(error)
    return route_components_pb2.DirectResponseAction(
        status=status,
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=body, content_type="application/json"
        ),
    )


def _forward(
    retries: RetryPolicy, rolling_out: bool, **action
) -> route_components_pb2.RouteAction:
    idle = max(STREAM_IDLE_TIMEOUT_S, retries.idle_timeout_seconds)
    forward = route_components_pb2.RouteAction(
        timeout=duration_pb2.Duration(seconds=0),
        idle_timeout=_duration(idle),
        **action,
    )
    forward.retry_policy.CopyFrom(_retry_policy(retries, rolling_out))
    return forward


@functools.cache
def _retry_policy(retries: RetryPolicy, rolling_out: bool) -> route_components_pb2.RetryPolicy:
    """Retry on another host and, through the aggregate cluster, on the stable version.

    A refused connection or a reset before the request went out never reached vLLM: always
    safe. `on_5xx` (by default: while a rollout runs) adds 5xx answers, resets after the
    request went out, and attempts that heard nothing for `idle_timeout_seconds` (vLLM may
    have started generating: the request is sent again elsewhere). Envoy retries only before
    the first response byte went to the client, so nothing a client saw is ever sent twice;
    an attempt that goes idle after that ends the response instead of hanging."""
    on_5xx = retries.on_5xx if retries.on_5xx is not None else rolling_out
    policy = route_components_pb2.RetryPolicy(
        retry_on=NEVER_SENT + (",5xx,reset" if on_5xx else ""),
        num_retries=wrappers_pb2.UInt32Value(value=retries.attempts),
        per_try_idle_timeout=_duration(retries.idle_timeout_seconds),
    )
    if retries.attempts:
        policy.retry_host_predicate.append(
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        )
        policy.retry_priority.CopyFrom(
            route_components_pb2.RetryPolicy.RetryPriority(
                name="envoy.retry_priorities.previous_priorities",
                typed_config=_pack(
                    previous_priorities_pb2.PreviousPrioritiesConfig(update_frequency=1)
                ),
            )
        )
    return policy


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _metadata_match(
    value: str, *headers: route_components_pb2.HeaderMatcher
) -> route_components_pb2.RouteMatch:
    """Match the body's `model` in dynamic metadata (an exact string), and `headers`."""
    return route_components_pb2.RouteMatch(
        prefix="/", headers=headers, dynamic_metadata=[_model_matcher(value)]
    )


def _model_matcher(value: str) -> metadata_pb2.MetadataMatcher:
    """The body's `model` in dynamic metadata is `value`, or any string (ANY_STRING)."""
    if value is ANY_STRING:
        string = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".*"))
    else:
        string = string_pb2.StringMatcher(exact=value)
    return metadata_pb2.MetadataMatcher(
        filter=METADATA_NAMESPACE,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key="model")],
        value=value_pb2.ValueMatcher(string_match=string),
    )


def _metadata_pair(value: str | None) -> json_to_metadata_pb2.JsonToMetadata.KeyValuePair:
    pair = json_to_metadata_pb2.JsonToMetadata.KeyValuePair(
        metadata_namespace=METADATA_NAMESPACE, key="model"
    )
    if value is not None:
        pair.value.string_value = value
    return pair


def _header_exact(
    name: str, value: str, invert: bool = False
) -> route_components_pb2.HeaderMatcher:
    """`name` is `value`; inverted: it is anything else, or absent."""
    return route_components_pb2.HeaderMatcher(
        name=name,
        string_match=string_pb2.StringMatcher(exact=value),
        invert_match=invert,
        # Else Envoy's inverted matcher does not match an absent header.
        treat_missing_header_as_empty=invert,
    )


def _version_header(version: str) -> base_pb2.HeaderValueOption:
    return _header(VERSION_HEADER, version)


@functools.cache
def _served_by_header() -> base_pb2.HeaderValueOption:
    """The answering host's version; empty without a host, and then Envoy adds nothing."""
    return _header(VERSION_HEADER, f"%UPSTREAM_METADATA({METADATA_NAMESPACE}:version)%")


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
