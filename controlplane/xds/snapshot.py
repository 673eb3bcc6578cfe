"""An immutable, versioned, consistency-checked set of xDS resources.

Built once per change of the desired state; every Envoy stream is served from it. Each
resource carries a digest of its name and bytes, and each type a version that combines its
resources' digests (XOR: order-free, and updated in O(1) when one resource changes), so a
weight change moves only the route configurations' version, and within it only the changed
model's RouteConfiguration: Envoy receives one small RDS response, whatever the number of
models (docs/adr/0004-one-route-configuration-per-model.md).

Responses are serialized here, once per change and subscription, and shared by every stream;
a stream only appends its nonce (controlplane.xds.server).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane.state import Model, State
from controlplane.xds import lora, resources

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# Make-before-break: clusters and their endpoints exist before anything routes to them; a
# scope names a route configuration, which Envoy then asks for.
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)
# Envoy subscribes to these without names and takes each response as the complete set.
WILDCARD_TYPES = (CLUSTER, LISTENER, SCOPED_ROUTE)
# Types whose state-of-the-world responses may carry only the resources that changed
# (the xDS protocol: all but listeners and clusters; Envoy keeps the others as they were).
PARTIAL_TYPES = (ENDPOINT, ROUTE)
FLEET = None  # the owner of the resources that belong to no one model (SnapshotBuilder)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", SCOPED_ROUTE: "srds",
               ROUTE: "rds"}  # fmt: skip


class InconsistentSnapshot(ValueError):
    """A route or an aggregate names a cluster the snapshot lacks, an endpoint set has no
    cluster, or a scope names a route configuration the snapshot lacks."""


@dataclass(frozen=True)
class Packed:
    """One type's resources: packed once, each with its digest, and the type's version.

    `changed` names what differs from the Packed whose version is `parent` (what the builder
    made before), so a response to an Envoy that runs `parent` needs no comparison."""

    items: Mapping[str, any_pb2.Any]
    digests: Mapping[str, int]
    version: str
    parent: str | None = None
    changed: frozenset[str] = frozenset()

    @classmethod
    def of(cls, type_url: str, messages: Iterable) -> Packed:
        items, digests, combined = {}, {}, 0
        for message in messages:
            name = message.cluster_name if type_url == ENDPOINT else message.name
            items[name], digests[name] = packed_resource(type_url, name, message)
            combined ^= digests[name]
        return cls(items, digests, f"{combined:016x}")

    def names_changed_since(self, since: Packed) -> Iterable[str]:
        if since.version == self.parent:
            return self.changed
        return (name for name, digest in self.digests.items() if since.digests.get(name) != digest)


def packed_resource(type_url: str, name: str, message) -> tuple[any_pb2.Any, int]:
    """The resource serialized once, and a 64-bit digest of its name and bytes."""
    value = message.SerializeToString(deterministic=True)
    digest = hashlib.blake2b(value, digest_size=8, key=name.encode()[:64])
    return any_pb2.Any(type_url=type_url, value=value), int.from_bytes(digest.digest())


@dataclass(frozen=True)
class Snapshot:
    version: str
    packed: dict[str, Packed]  # type URL -> that type's resources
    versions: dict[str, str]  # type URL -> that type's version
    _payloads: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def resources(self) -> dict[str, Mapping[str, any_pb2.Any]]:
        return {type_url: packed.items for type_url, packed in self.packed.items()}

    @classmethod
    def from_resources(cls, by_type: dict[str, list]) -> Snapshot:
        """Check, pack and hash the messages; raises InconsistentSnapshot."""
        check_consistency(by_type)
        return cls.assemble({t: Packed.of(t, by_type.get(t, ())) for t in TYPE_ORDER})

    @classmethod
    def assemble(cls, packed: dict[str, Packed]) -> Snapshot:
        overall = hashlib.blake2b(
            "".join(packed[t].version for t in TYPE_ORDER).encode(), digest_size=8
        ).hexdigest()
        return cls(overall, {t: packed[t] for t in TYPE_ORDER},
                   {t: packed[t].version for t in TYPE_ORDER})  # fmt: skip

    def response(
        self, type_url: str, names: frozenset[str] | None, since: Packed | None = None
    ) -> discovery_pb2.DiscoveryResponse:
        """The response for a subscription (None: all resources); with `since` (what the
        Envoy runs now, for PARTIAL_TYPES) only the resources that differ from it."""
        return discovery_pb2.DiscoveryResponse.FromString(self.payload(type_url, names, since))

    def payload(
        self, type_url: str, names: frozenset[str] | None, since: Packed | None = None
    ) -> bytes:
        """`response(...)` serialized, without a nonce: built once per change and
        subscription, then shared by every stream that needs the same."""
        key = (type_url, names, since.version if since is not None else None)
        cached = self._payloads.get(key)
        if cached is None:
            packed = self.packed[type_url]
            if since is None:
                wanted = packed.items.keys() if names is None else sorted(names)
            else:
                changed = packed.names_changed_since(since)
                wanted = sorted(n for n in changed if names is None or n in names)
            chosen = [packed.items[name] for name in wanted if name in packed.items]
            cached = discovery_pb2.DiscoveryResponse(
                version_info=packed.version, type_url=type_url, resources=chosen
            ).SerializeToString()
            self._payloads[key] = cached
        return cached


def check_consistency(by_type: dict[str, list]) -> None:
    """Refuse a snapshot Envoy would half-apply: a route to a missing cluster is a 503."""
    clusters = {cluster.name for cluster in by_type.get(CLUSTER, ())}
    eds_names = set()
    for cluster in by_type.get(CLUSTER, ()):
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
        check_routes(config, clusters)
    route_names = {config.name for config in by_type.get(ROUTE, ())}
    for scope in by_type.get(SCOPED_ROUTE, ()):
        if scope.route_configuration_name not in route_names:
            raise InconsistentSnapshot(
                f"scope {scope.name!r} names unknown routes {scope.route_configuration_name!r}"
            )


def check_routes(config, clusters) -> None:
    """Every cluster a route configuration names is in `clusters`."""
    for host in config.virtual_hosts:
        for route in host.routes:
            named = [route.route.cluster] if route.route.cluster else []
            named += [weighted.name for weighted in route.route.weighted_clusters.clusters]
            named += [mirror.cluster for mirror in route.route.request_mirror_policies]
            missing = [name for name in named if name not in clusters]
            if missing:
                raise InconsistentSnapshot(f"route {route.name!r} names unknown {missing}")


class _Table:
    """One type's resources as the builder keeps them: grouped by owner (a model, or the
    listener, or a marker's routes), each group with the key it was built from. Replacing
    one owner's group costs the same whatever the number of owners."""

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.groups: dict[str | None, tuple[object, dict[str, tuple[any_pb2.Any, int]]]] = {}
        self.packed = Packed({}, {}, f"{0:016x}")
        self._edits: list[tuple[dict, dict]] = []  # (old group, new group)

    def put(self, owner: str | None, key: object, build: Callable[[], Iterable]) -> None:
        """Make `owner`'s group what `build()` gives, unless it was built from `key`."""
        cached = self.groups.get(owner)
        if cached is not None and cached[0] == key:
            return
        group = {}
        for message in build():
            name = message.cluster_name if self.type_url == ENDPOINT else message.name
            group[name] = packed_resource(self.type_url, name, message)
        self._edits.append((cached[1] if cached else {}, group))
        self.groups[owner] = (key, group)

    def drop_others(self, owners: set[str | None]) -> None:
        for owner in [owner for owner in self.groups if owner not in owners]:
            self._edits.append((self.groups.pop(owner)[1], {}))

    def pack(self) -> Packed:
        """The type's resources now: the previous Packed if nothing changed, else a copy
        with the edits applied (dict copies run in C: ~10 us per thousand resources)."""
        if not self._edits:
            return self.packed
        old = self.packed
        items, digests = dict(old.items), dict(old.digests)
        combined, changed = int(old.version, 16), set()
        for before, after in self._edits:
            for name, (_, digest) in before.items():
                combined ^= digest
                del items[name], digests[name]
                changed.add(name)
            for name, (packed, digest) in after.items():
                combined ^= digest
                items[name], digests[name] = packed, digest
                changed.add(name)
        self._edits.clear()
        self.packed = Packed(items, digests, f"{combined:016x}", old.version, frozenset(changed))
        return self.packed


class SnapshotBuilder:
    """Builds snapshots from the state, rebuilding only what changed since the last one.

    Every resource belongs to one model (its clusters, endpoints, scope and routes) or to
    the fleet (the listener, the model list, the markers' routes), and is rebuilt only when
    the key it was built from changes: a weight change rebuilds that model's
    RouteConfiguration and nothing else. `build(state, models=...)` looks only at the
    models named (the caller vouches that nothing else changed: a weight or endpoint change
    of one model), so its cost does not grow with the fleet; `build(state)` looks at all.
    """

    def __init__(self, proxy: resources.ProxySettings) -> None:
        self.proxy = proxy
        self._tables = {type_url: _Table(type_url) for type_url in TYPE_ORDER}
        # model -> (the shape its route configuration was built for, that message): only
        # serialized copies leave the builder, so the message is reused for the next change.
        self._route_shapes: dict[str, tuple[tuple, route_pb2.RouteConfiguration]] = {}

    def build(self, state: State, models: Iterable[str] | None = None) -> Snapshot:
        tables = self._tables
        if models is None:
            owners = {*state.models, FLEET}
            for table in tables.values():
                table.drop_others(owners)
            for gone in self._route_shapes.keys() - state.models.keys():
                del self._route_shapes[gone]
            listing = tuple((m.name, m.created) for m in state.models.values())
            tables[LISTENER].put(FLEET, self.proxy, lambda: [resources.build_listener(self.proxy)])
            tables[CLUSTER].put(
                FLEET, self.proxy,
                lambda: [resources.picker_cluster(self.proxy)] if self.proxy.picker else [],
            )  # fmt: skip
            tables[ROUTE].put(
                FLEET, (listing, self.proxy),
                lambda: [resources.missing_model_routes(state, self.proxy),
                         resources.invalid_body_routes(self.proxy)],
            )  # fmt: skip
            tables[SCOPED_ROUTE].put(
                FLEET, tuple(state.models), lambda: resources.build_scopes(state)
            )
            changed = state.models.values()
        else:
            changed = [state.models[name] for name in models if name in state.models]
        for model in changed:
            self._put_model(model)
        return Snapshot.assemble({type_url: tables[type_url].pack() for type_url in TYPE_ORDER})

    def _put_model(self, model: Model) -> None:
        tables, name = self._tables, model.name
        versions = tuple(model.versions)
        routing = model.routing
        served = lora.served_names(model)  # LoRA adapters: clusters and routes rewrite bodies
        key = (model.stable, versions, routing, served and tuple(served.values()))
        tables[CLUSTER].put(name, key, lambda: resources.model_clusters(model))
        ready = tuple(
            tuple(e.url for e in v.endpoints if e.ready) for v in model.versions.values()
        )
        # A prefix-aware model's split clusters hold stable's endpoints; its routes tell the
        # picker each version's endpoints (resources.py): both follow them.
        picked = routing == resources.PREFIX_AWARE
        tables[ENDPOINT].put(
            name, (versions, ready, routing, picked and model.stable),
            lambda: resources.model_endpoints(model),
        )  # fmt: skip
        weights = tuple(v.weight for v in model.versions.values())
        rolling_out = model.active_rollout is not None  # retries differ (resources.py)
        shape = (versions, model.policy, model.retries, rolling_out, routing, picked and ready,
                 served and tuple(served.values()))  # fmt: skip
        tables[ROUTE].put(name, (weights, shape), lambda: [self._model_routes(model, shape)])

    def _model_routes(self, model: Model, shape: tuple):
        """The model's RouteConfiguration. Everything but the weights (its `shape`) is built
        once and kept: a weight change, the common case, only writes the new weights into
        the kept message (~25 us instead of ~250 us for building it all again)."""
        kept = self._route_shapes.get(model.name)
        if kept is not None and kept[0] == shape:
            config = kept[1]
            resources.set_split_weights(config, model)
            return config
        config = resources.model_route_config(model, self.proxy)
        names = {resources.cluster_name(model.name, v) for v in model.versions}
        names |= {resources.hosts_cluster_name(model.name, v) for v in model.versions}
        check_routes(config, names)
        self._route_shapes[model.name] = (shape, config)
        return config


def build_snapshot(state: State, proxy: resources.ProxySettings) -> Snapshot:
    """A snapshot built from scratch (nothing cached)."""
    return SnapshotBuilder(proxy).build(state)
