"""Envoy's stats, pushed: the metrics service every Envoy streams its stats to, each second.

Envoy's `envoy.stat_sinks.metrics_service` (envoy/bootstrap.yaml) opens one gRPC stream
`/envoy.service.metrics.v3.MetricsService/StreamMetrics` per Envoy over its ADS connection and
sends one message per `stats_flush_interval` (1 s). Only the first message of a stream carries
the Envoy's node, whose id becomes the `source` of every Delta of that stream. Each flush
becomes, per cluster `<model>@<version>` with traffic, one Delta pushed into HealthSignals,
which sums them over every Envoy and over the window.

What a flush is read for (measured on Envoy 1.40 against HTTP/1.1 backends, as vLLM is):

- requests = sum of `upstream_rq_xx` over the response classes (the same count as
  `upstream_rq_completed`): one per request that got a status, Envoy's own local replies
  included, the final attempt only (a retried attempt is counted under `retry.`, not here).
  A request whose client went away before any answer has no status and is not counted.
- errors = `upstream_rq_xx{5}` + responses broken after their headers. The 5xx class already
  holds every failure that Envoy answered itself: a connect failure once the retries are spent
  (503 UF), a reset or close before the response headers (503 UC/UR), a malformed response
  (502), an overflow (503 UO), a route timeout (504 UT). Adding `upstream_cx_connect_fail`,
  `upstream_rq_rx_reset`/`tx_reset` or `upstream_rq_timeout` on top would count those requests
  twice (a refused backend made 3 connect failures, 2 retries and one 503 for one request).
  What the 5xx class misses is a response that breaks after its headers went downstream (a
  vLLM that dies mid-stream): it was charged as a 2xx. Envoy's HTTP/1 codec counts that as
  `upstream_cx_protocol_error` (a truncated body) together with
  `upstream_cx_destroy_remote_with_active_rq` (the backend closed it); a malformed response
  is a protocol error that Envoy closes itself (and answers 502), a close before the headers
  is a remote close without protocol error (answered 503), so min(protocol errors, remote
  closes) counts each broken stream once. (`upstream_rq_rx_reset`/`tx_reset` stay 0 with
  HTTP/1 upstreams; a client that gives up makes a *local* close and is no backend error.)
- retries = `upstream_rq_retry`: every retry Envoy made, so that retries that end well (a
  refused connection retried on another endpoint) cannot hide a failing version.
- latency_ms = `upstream_rq_time`, the time to the end of the response (the whole stream).
  The sink sends histograms as *interval* statistics (samples since the previous flush), not
  cumulative: a flush after 10 requests showed sample_count 10, the next one 0. So there is
  no baseline to keep per stream, and a new stream or a restarted Envoy needs no special case.

Counters arrive as deltas (`report_counters_as_deltas`). Stat names are tag-extracted
(`emit_tags_as_labels`): `cluster.upstream_rq_xx` labelled `envoy.cluster_name` and
`envoy.response_code_class`. Envoy's cluster-name tag stops at the first '.', so our clusters
report their stats without dots (`alt_stat_name`, `resources.stats_name`: `qwen-2.5@v1` as
`qwen-2_5@v1`); a name split anyway is put back together from the label and the family. Envoy
also writes ':' as '_' in stat names; with the State given, names are mapped back to the real
cluster names.

Cost: this runs on the control plane's event loop, once a second per Envoy. A flush carries
every used stat of that Envoy, one MetricFamily each: ~210 families and 24 KB with three model
clusters, 52 KB with 23 (the first message of a stream also carries the Envoy's node, ~60 KB),
and ~40,000-90,000 families (~3-7 MB) with 1,000 models of two versions: ~19 per version
cluster whatever its traffic (health checks, membership, updates). Parsing all of it and
looking at each family in Python took ~40-70 ms a flush at 1,000 models. So the stream's
messages arrive as bytes and `read_flush_bytes` finds the families it reads by their
serialized names (`bytes.find`, in C): the activity stats first, then, only for the
clusters that have some, their healthy-host gauges; only those families are parsed (an
idle 1,000-model flush: ~8 ms of scans, nothing parsed). A message laid out otherwise is
parsed whole (`read_flush`, which skips every family but the wanted ones by one dict lookup
and one `endswith`). Clusters without traffic in that second emit nothing. A stats_matcher
in the bootstrap could cut the flush to ~2 KB, but it applies to all of Envoy's stats
(/stats, Prometheus).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from controlplane import logs
from controlplane._gen.switchyard_metrics import metrics_service_pb2, prometheus_metrics_pb2
from controlplane.health.signals import Delta, HealthSignals, Histogram
from controlplane.state import State
from controlplane.xds.resources import stats_name
from controlplane.xds.transport import Call, Opener

log = logs.get("health.envoy")

SERVICE = metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
METHOD = f"/{SERVICE}/StreamMetrics"
CLUSTER_LABEL = "envoy.cluster_name"
CLASS_LABEL = "envoy.response_code_class"

# The cluster stats read, by tag-extracted name without the `cluster.` prefix.
RESPONSES = "upstream_rq_xx"
RETRIES = "upstream_rq_retry"
PROTOCOL_ERRORS = "upstream_cx_protocol_error"
REMOTE_CLOSES = "upstream_cx_destroy_remote_with_active_rq"
LATENCY = "upstream_rq_time"
ACTIVE = "upstream_rq_active"  # a gauge: how a hung backend shows (nothing completes)
# A gauge: the version's hosts Envoy would send traffic to (health checks and outlier
# detection passed). 0 while the version gets requests = stable answered them (failover).
HEALTHY = "membership_healthy"
WANTED = frozenset({RESPONSES, RETRIES, PROTOCOL_ERRORS, REMOTE_CLOSES, LATENCY, ACTIVE, HEALTHY})
# Envoy's sub-scopes of a cluster that repeat some of its stats (`cluster.X.external.
# upstream_rq_xx`...): with a dotted cluster name they show in the family name, and are skipped.
SUB_SCOPES = frozenset({"external", "internal", "canary", "retry"})
PREFIX = "cluster."


@dataclass
class Tally:
    """One cluster in one flush."""

    requests: float = 0.0
    server_errors: float = 0.0
    retries: float = 0.0
    protocol_errors: float = 0.0
    remote_closes: float = 0.0
    latency_ms: Histogram | None = None
    in_flight: float = 0.0
    healthy_hosts: float | None = None

    def to_delta(self, now: float, source: str) -> Delta | None:
        """None when nothing happened: idle clusters cost nothing downstream."""
        broken = min(self.protocol_errors, self.remote_closes)
        busy = self.requests or self.server_errors or self.retries or broken or self.in_flight
        if not (busy or self.latency_ms):
            return None
        return Delta(
            time=now,
            requests=self.requests,
            errors=self.server_errors + broken,
            retries=self.retries,
            latency_ms=self.latency_ms,
            in_flight=self.in_flight,
            healthy_hosts=self.healthy_hosts,
            source=source,
        )


# Family names read as they come (a cluster name without dots), and the endings of the names a
# dotted cluster name leaves (`cluster.<after first dot>.<stat>`): every other family (with a
# thousand models, ~40,000 per flush) is skipped by one dict lookup and one `endswith`.
WANTED_FAMILIES = {PREFIX + stat: stat for stat in WANTED}
WANTED_ENDINGS = tuple(f".{stat}" for stat in WANTED)


def read_flush(families: Iterable) -> dict[str, Tally]:
    """One flush's MetricFamily list -> Tally per cluster, keyed by the cluster's stat name.

    Only clusters with something to report get a Tally: the healthy-host gauge, which every
    cluster has, is kept aside and given to those at the end (an idle cluster costs a dict
    entry, not a Tally)."""
    tallies: dict[str, Tally] = {}
    healthy: dict[str, float] = {}
    for family in families:
        name = family.name
        stat = WANTED_FAMILIES.get(name)
        rest = ""
        if stat is None:
            if not name.endswith(WANTED_ENDINGS) or not name.startswith(PREFIX):
                continue
            # A dotted cluster name: `cluster.<after first dot>.<stat>`.
            rest, _, stat = name[len(PREFIX) :].rpartition(".")
            if not rest or rest.rpartition(".")[2] in SUB_SCOPES:
                continue
        for metric in family.metric:
            cluster, response_class = "", ""
            for label in metric.label:
                if label.name == CLUSTER_LABEL:
                    cluster = label.value
                elif label.name == CLASS_LABEL:
                    response_class = label.value
            if not cluster:
                continue
            if rest:
                cluster = f"{cluster}.{rest}"
            if stat == HEALTHY:
                healthy[cluster] = healthy.get(cluster, 0.0) + metric.gauge.value
                continue
            if stat == ACTIVE and not metric.gauge.value:
                continue  # nothing in flight: nothing to say
            tally = tallies.get(cluster)
            if tally is None:
                tally = tallies[cluster] = Tally()
            if stat == RESPONSES:
                value = metric.counter.value
                tally.requests += value
                if response_class == "5":
                    tally.server_errors += value
            elif stat == LATENCY:
                _add_histogram(tally, metric.histogram)
            elif stat == ACTIVE:
                tally.in_flight += metric.gauge.value
            elif stat == RETRIES:
                tally.retries += metric.counter.value
            elif stat == PROTOCOL_ERRORS:
                tally.protocol_errors += metric.counter.value
            else:
                tally.remote_closes += metric.counter.value
    for cluster, tally in tallies.items():
        tally.healthy_hosts = healthy.get(cluster)
    return tallies


# The stats that say a cluster had something to do, searched for in the serialized flush;
# the healthy-host gauge (every cluster has one) only when one of them was found.
ACTIVITY = tuple(sorted(WANTED - {HEALTHY}))
_NAME_TAGS = frozenset({0x12, 0x18, 0x22})  # a MetricFamily's fields after its name


def read_flush_bytes(data: bytes) -> dict[str, Tally] | None:
    """`read_flush` of a serialized StreamMetricsMessage without parsing all of it: the
    families read are found by their serialized names (`bytes.find`, in C) and only those
    are parsed, so the tens of thousands of other families of a large fleet's flush never
    become Python objects, and an idle flush costs a few scans. The healthy-host gauges are
    read only for the clusters with something to report. None when the bytes are not laid
    out as expected: the caller parses the whole message then."""
    families = _families(data, ACTIVITY)
    if not families:
        return families if families is None else {}
    clusters = {
        label.value.encode()
        for family in families
        for metric in family.metric
        for label in metric.label
        if label.name == CLUSTER_LABEL
    }
    healthy = _families(data, (HEALTHY,), clusters)
    return None if healthy is None else read_flush(families + healthy)


_CLUSTER_LABEL = b"\x0a\x12" + CLUSTER_LABEL.encode() + b"\x12"  # a LabelPair's name, then value


def _families(data: bytes, stats: tuple[str, ...], clusters: set[bytes] | None = None):
    """Every MetricFamily of `data` whose name ends with `.<stat>` for one of `stats` (with
    `clusters`, only those whose cluster label is one of them); None if one looks wrong."""
    found = []
    for stat in stats:
        needle = f".{stat}".encode()
        at = data.find(needle)
        while at != -1:
            end = at + len(needle)
            if end < len(data) and data[end] in _NAME_TAGS:  # the name ends here
                if clusters is not None and not _labelled(data, end, clusters):
                    at = data.find(needle, end)
                    continue
                family = _family_ending_at(data, end)
                if family is None:
                    return None
                found.append(family)
            at = data.find(needle, end)
    return found


def _labelled(data: bytes, end: int, clusters: set[bytes]) -> bool:
    """Whether the family whose name ends at `end` is labelled with one of `clusters` (its
    first metric's cluster label follows the name closely); True when that cannot be told."""
    label = data.find(_CLUSTER_LABEL, end, end + 64)
    if label == -1:
        return True
    start = label + len(_CLUSTER_LABEL) + 1
    return data[start : start + data[start - 1]] in clusters


def _family_ending_at(data: bytes, end: int):
    """The MetricFamily whose name (field 1) ends at `end`: the name starts with `cluster.`,
    after its tag and one-byte length; the family is an element of `envoy_metrics` (field 2),
    its length a varint right before it."""
    start = data.rfind(PREFIX.encode(), max(0, end - 127), end)
    if start < 2 or data[start - 2] != 0x0A or data[start - 1] != end - start:
        return None
    begin, size, shift = start - 2, 0, 0
    for width in (1, 2, 3, 4):  # the varint before `begin`, read backwards
        if begin - width - 1 < 0:
            return None
        head = data[begin - width : begin]
        varint = head[-1] < 0x80 and all(byte >= 0x80 for byte in head[:-1])
        if varint and data[begin - width - 1] == 0x12:
            for byte in head:
                size |= (byte & 0x7F) << shift
                shift += 7
            break
    else:
        return None
    try:
        family = prometheus_metrics_pb2.MetricFamily.FromString(data[begin : begin + size])
    except DecodeError:
        return None
    return family if family.name == data[start:end].decode() else None


def _add_histogram(tally: Tally, histogram) -> None:
    """Envoy's buckets are cumulative within the interval, without +Inf: sample_count is."""
    if not histogram.sample_count:
        return
    buckets = histogram.bucket
    cumulative = [bucket.cumulative_count for bucket in buckets]
    cumulative.append(histogram.sample_count)
    found = Histogram.from_cumulative(tuple(bucket.upper_bound for bucket in buckets), cumulative)
    if tally.latency_ms is None:
        tally.latency_ms = found
    elif tally.latency_ms.bounds == found.bounds:
        tally.latency_ms.add(found)


def stat_name(cluster: str) -> str:
    """How Envoy writes a cluster name inside stat names (Stats::Utility::sanitizeStatsName)."""
    return stats_name(cluster).strip(".").replace(":", "_").replace("\0", "_")


class EnvoyStatsReceiver:
    """The MetricsService: every Envoy's flushes, as Deltas per cluster, into `signals`."""

    def __init__(
        self,
        signals: HealthSignals,
        state: State | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signals = signals
        self.state = state
        self.clock = clock
        self.streams: dict[str, str] = {}  # stream key -> node id, while connected
        self.flushes = 0
        self._stream_ids = itertools.count(1)
        self._names: dict[str, str] = {}  # stat name -> cluster name

    def methods(self) -> dict[str, Opener]:
        """The MetricsService, for the ADS server's port (Envoys already reach it)."""
        return {METHOD: self._open}

    def _open(self, call: Call) -> _StatsCall:
        return _StatsCall(self, call, f"stats-{next(self._stream_ids)}")

    def on_flush(self, node: str, message) -> int:
        """Push one flush's Deltas (`message`: a StreamMetricsMessage, or its bytes); returns
        how many."""
        self.flushes += 1
        now = self.clock()
        pushed = 0
        tallies = read_flush_bytes(message) if isinstance(message, bytes) else None
        if tallies is None:
            if isinstance(message, bytes):
                message = metrics_service_pb2.StreamMetricsMessage.FromString(message)
            tallies = read_flush(message.envoy_metrics)
        for name, tally in tallies.items():
            delta = tally.to_delta(now, node) if "@" in name else None  # else not a version
            if delta is not None:
                self.signals.add_cluster(self._cluster(name), delta)
                pushed += 1
        return pushed

    def _cluster(self, name: str) -> str:
        """The cluster a stat name stands for (they differ when the name has a ':')."""
        cluster = self._names.get(name)
        if cluster is None:
            if self.state is not None:
                for model in self.state.models.values():
                    for version in model.versions:
                        real = f"{model.name}@{version}"
                        self._names[stat_name(real)] = real
            cluster = self._names.setdefault(name, name)
        return cluster


class _StatsCall:
    """One Envoy's stats stream: each flush is read as it arrives; the service answers once,
    when the Envoy ends the stream."""

    __slots__ = ("call", "key", "node", "receiver")

    def __init__(self, receiver: EnvoyStatsReceiver, call: Call, key: str) -> None:
        self.receiver, self.call, self.key, self.node = receiver, call, key, ""

    def on_message(self, message: bytes) -> None:
        receiver = self.receiver
        if not self.node:
            first = metrics_service_pb2.StreamMetricsMessage.FromString(message)
            self.node = first.identifier.node.id or self.call.peer
            receiver.streams[self.key] = self.node
            logs.event(log, "envoy_stats.connected", node=self.node, stream=self.key)
        try:
            receiver.on_flush(self.node, message)
        except Exception as exc:  # a bad flush must not end the stream
            logs.event(log, "envoy_stats.bad_flush", logging.WARNING, node=self.node, error=exc)

    def on_end(self) -> None:
        if self.receiver.streams.pop(self.key, None) is not None:
            logs.event(log, "envoy_stats.disconnected", node=self.node, stream=self.key)
        if not self.call.closed:  # half-closed: answer; the transport then ends it with OK
            self.call.send(metrics_service_pb2.StreamMetricsResponse().SerializeToString())
