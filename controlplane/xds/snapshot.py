"""An immutable, versioned, consistency-checked set of xDS resources.

Built once per change of the desired state; every Envoy stream is served from it. Each
resource type carries its own version (a hash of its content), so a weight change moves
only the route configuration's version and Envoy receives only an RDS push.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane.state import State
from controlplane.xds import resources

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# Make-before-break: clusters and their endpoints exist before anything routes to them.
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
WILDCARD_TYPES = (CLUSTER, LISTENER)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}


class InconsistentSnapshot(ValueError):
    """A route or an aggregate names a cluster the snapshot lacks, or an endpoint set has no
    cluster."""


@dataclass(frozen=True)
class Snapshot:
    version: str
    versions: dict[str, str]  # type URL -> version of that type's resources
    resources: dict[str, dict[str, any_pb2.Any]]  # type URL -> name -> packed resource
    _responses: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_resources(cls, by_type: dict[str, list]) -> Snapshot:
        """Check, pack and hash the messages; raises InconsistentSnapshot."""
        check_consistency(by_type)
        packed = {type_url: pack(type_url, by_type.get(type_url, ())) for type_url in TYPE_ORDER}
        return cls.assemble(packed)

    @classmethod
    def assemble(cls, packed: dict[str, tuple[dict[str, any_pb2.Any], str]]) -> Snapshot:
        versions = {type_url: packed[type_url][1] for type_url in TYPE_ORDER}
        overall = hashlib.blake2b("".join(versions.values()).encode(), digest_size=8).hexdigest()
        return cls(overall, versions, {type_url: packed[type_url][0] for type_url in TYPE_ORDER})

    def response(
        self, type_url: str, names: frozenset[str] | None
    ) -> discovery_pb2.DiscoveryResponse:
        """The response for a subscription (None: all resources), built once and reused."""
        key = (type_url, names)
        cached = self._responses.get(key)
        if cached is None:
            resources = self.resources[type_url]
            chosen = (
                resources.values()
                if names is None
                else [resources[name] for name in sorted(names) if name in resources]
            )
            cached = discovery_pb2.DiscoveryResponse(
                version_info=self.versions[type_url], type_url=type_url, resources=chosen
            )
            self._responses[key] = cached
        return cached


def pack(type_url: str, messages) -> tuple[dict[str, any_pb2.Any], str]:
    """Serialize each resource once; the type's version is a hash of names and bytes."""
    named: dict[str, any_pb2.Any] = {}
    digest = hashlib.blake2b(digest_size=8)
    for message in messages:
        name = message.cluster_name if type_url == ENDPOINT else message.name
        value = message.SerializeToString(deterministic=True)
        named[name] = any_pb2.Any(type_url=type_url, value=value)
        digest.update(name.encode())
        digest.update(value)
    return named, digest.hexdigest()


def check_consistency(by_type: dict[str, list]) -> None:
    """Refuse a snapshot Envoy would half-apply: a route to a missing cluster is a 503."""
    clusters = {cluster.name for cluster in by_type.get(CLUSTER, ())}
    eds_names = set()
    for cluster in by_type.get(CLUSTER, ()):
        if not isinstance(cluster, cluster_pb2.Cluster):
            continue  # a name only (SnapshotBuilder checks its routes so)
        if cluster.type == cluster_pb2.Cluster.EDS:
            eds_names.add(cluster.eds_cluster_config.service_name or cluster.name)
        elif cluster.cluster_type.name == resources.AGGREGATE:
            members = aggregate_pb2.ClusterConfig()
            cluster.cluster_type.typed_config.Unpack(members)
            missing = [name for name in members.clusters if name not in clusters]
            if missing:
                raise InconsistentSnapshot(f"cluster {cluster.name!r} names unknown {missing}")
    orphans = {cla.cluster_name for cla in by_type.get(ENDPOINT, ())} - eds_names
    if orphans:
        raise InconsistentSnapshot(f"endpoints for unknown clusters: {sorted(orphans)}")
    for config in by_type.get(ROUTE, ()):
        for host in config.virtual_hosts:
            for route in host.routes:
                named = [route.route.cluster] if route.route.cluster else []
                named += [weighted.name for weighted in route.route.weighted_clusters.clusters]
                named += [mirror.cluster for mirror in route.route.request_mirror_policies]
                missing = [name for name in named if name not in clusters]
                if missing:
                    raise InconsistentSnapshot(f"route {route.name!r} names unknown {missing}")


class SnapshotBuilder:
    """Builds snapshots from the state, reusing whatever did not change since the last one.

    A weight change rebuilds only that model's routes and the route configuration: clusters,
    endpoints and the listener are served from the previous snapshot's packed resources.
    Clusters change with the versions and with the stable one (each aggregate cluster fails
    over to stable).
    """

    def __init__(self, proxy: resources.ProxySettings) -> None:
        self.proxy = proxy
        self._packed: dict[str, tuple[object, tuple[dict[str, any_pb2.Any], str]]] = {}
        self._routes: dict[str, tuple[object, list]] = {}

    def build(self, state: State) -> Snapshot:
        clusters = tuple((m.name, m.stable, tuple(m.versions)) for m in state.models.values())
        endpoints = tuple(
            (resources.cluster_name(m.name, v.name), tuple(e.url for e in v.endpoints if e.ready))
            for m in state.models.values()
            for v in m.versions.values()
        )
        route_config = resources.build_route_config(state, self.proxy, self._model_routes)
        names = [
            name
            for m in state.models.values()
            for v in m.versions
            for name in (resources.cluster_name(m.name, v), resources.hosts_cluster_name(m.name, v))
        ]
        check_consistency({CLUSTER: [_Named(name) for name in names], ROUTE: [route_config]})
        packed = {
            CLUSTER: self._cached(CLUSTER, clusters, lambda: resources.build_clusters(state)),
            ENDPOINT: self._cached(ENDPOINT, endpoints, lambda: resources.build_endpoints(state)),
            LISTENER: self._cached(
                LISTENER, self.proxy, lambda: [resources.build_listener(self.proxy)]
            ),
            ROUTE: pack(ROUTE, [route_config]),
        }
        self._routes = {name: self._routes[name] for name in state.models if name in self._routes}
        return Snapshot.assemble(packed)

    def _cached(self, type_url: str, key: object, build) -> tuple[dict[str, any_pb2.Any], str]:
        cached = self._packed.get(type_url)
        if cached is not None and cached[0] == key:
            return cached[1]
        result = pack(type_url, build())
        self._packed[type_url] = (key, result)
        return result

    def _model_routes(self, model) -> list:
        versions = tuple((v.name, v.weight) for v in model.versions.values())
        key = (versions, model.policy, model.retries)
        cached = self._routes.get(model.name)
        if cached is None or cached[0] != key:
            cached = (key, resources.model_routes(model))
            self._routes[model.name] = cached
        return cached[1]


@dataclass(frozen=True)
class _Named:
    name: str


def build_snapshot(state: State, proxy: resources.ProxySettings) -> Snapshot:
    """A snapshot built from scratch (nothing cached)."""
    return SnapshotBuilder(proxy).build(state)
