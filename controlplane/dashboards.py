"""Switchyard's Grafana dashboards, generated as JSON: `python -m controlplane.dashboards [outdir]`.

Three dashboards, written to manifests/dashboards/ (a test keeps the committed files equal to
this output, and runs every query below against a real Prometheus):

- traffic.json: per model, the set weight against the share of requests each version really
  served, the rollout phase and step, verdicts, and rollouts and rollbacks as annotations;
- health.json: per version, Envoy's request rate, 5xx rate, latency quantiles and requests in
  flight; vLLM's time to first token, inter-token latency and queue; backend readiness;
- control-plane.json: connected Envoys, xDS pushes, push-to-ACK latency, NACKs, snapshot
  build time, admin API traffic and the controller's CPU and memory.

The data source is a variable, and so are `model` and `version`. Per-version Envoy series come
from the cluster name `<model>@<version>` (label `envoy_cluster_name`); vLLM series carry the
`model` and `version` labels that service discovery (`/sd/backends`, or the pod labels on
Kubernetes) gives their targets. Plain dictionaries: no dependency for a few hundred lines of
JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from controlplane.rollout.engine import PHASES

DS = {"type": "prometheus", "uid": "${datasource}"}
OUT_DIR = Path(__file__).resolve().parent.parent / "manifests" / "dashboards"
GRID_WIDTH = 24
BARS = {"drawStyle": "bars", "fillOpacity": 80, "lineWidth": 1, "showPoints": "never"}

# Envoy's per-cluster series of the selected model and versions, and the version label
# extracted from the cluster name (`<model>@<version>`).
CLUSTERS = 'envoy_cluster_name=~"($model)@($version)"'
ALL_CLUSTERS = 'envoy_cluster_name=~"($model)@.*"'
VLLM = 'model="$model", version=~"$version"'


def by_version(expr: str) -> str:
    return f'label_replace({expr}, "version", "$1", "envoy_cluster_name", ".*@(.*)")'


def envoy_rate(metric: str, extra: str = "") -> str:
    """Per-version rate of one of Envoy's cluster counters."""
    selector = CLUSTERS + (f", {extra}" if extra else "")
    return f"sum by (version) ({by_version(f'rate({metric}{{{selector}}}[$__rate_interval])')})"


def envoy_quantile(q: float, bucket: str) -> str:
    """Per-version quantile of one of Envoy's cluster histograms."""
    rate = by_version(f"rate({bucket}{{{CLUSTERS}}}[$__rate_interval])")
    return f"histogram_quantile({q}, sum by (version, le) ({rate}))"


def quantile(q: float, bucket: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({bucket}[$__rate_interval])))"


# -- building blocks -------------------------------------------------------------------------


def target(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, "instant": instant, "range": not instant}


def panel(
    title: str,
    targets: list[dict[str, Any]],
    kind: str = "timeseries",
    unit: str = "short",
    description: str = "",
    width: int = 12,
    height: int = 8,
    **extra: Any,
) -> dict[str, Any]:
    """A panel without id and position (the dashboard lays them out)."""
    defaults: dict[str, Any] = {"unit": unit}
    options: dict[str, Any] = {}
    if kind == "timeseries":
        defaults["custom"] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    elif kind == "state-timeline":
        defaults["custom"] = {"lineWidth": 0, "fillOpacity": 80}
        options = {
            "showValue": "auto",
            "mergeValues": True,
            "alignValue": "left",
            "rowHeight": 0.9,
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "single", "sort": "none"},
        }
    defaults.update(extra.pop("defaults", {}))
    options.update(extra.pop("options", {}))
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "size": (width, height),
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, **t} for i, t in enumerate(targets)
        ],
        "fieldConfig": {"defaults": defaults, "overrides": extra.pop("overrides", [])},
        "options": options,
        **extra,
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "size": (24, 1)}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Number the panels and place them left to right, top to bottom on Grafana's grid."""
    x = y = line_height = 0
    placed = []
    for number, item in enumerate(panels, start=1):
        width, height = item.pop("size")
        if x + width > GRID_WIDTH or item["type"] == "row":
            x, y, line_height = 0, y + line_height, 0
        placed.append({"id": number, "gridPos": {"x": x, "y": y, "w": width, "h": height}, **item})
        x, line_height = x + width, max(line_height, height)
    return placed


def color_by_name(colors: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "matcher": {"id": "byName", "options": name},
            "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}],
        }
        for name, color in colors.items()
    ]


def value_mappings(texts: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    options = {
        str(value): {"text": text, "color": color, "index": index}
        for index, (value, (text, color)) in enumerate(texts.items())
    }
    return [{"type": "value", "options": options}]


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "options": [],
        "regex": "",
        "refresh": 1,
        "hide": 0,
    }


def query_variable(name: str, label: str, query: str, multi: bool) -> dict[str, Any]:
    current = {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {}
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": f"{name}-values"},
        "refresh": 2,  # on time range change: new versions appear during a rollout
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": current,
        "options": [],
        "regex": "",
        "hide": 0,
    }


MODEL_VARIABLES = [
    datasource_variable(),
    query_variable("model", "Model", "label_values(switchyard_version_weight, model)", False),
    query_variable(
        "version",
        "Version",
        'label_values(switchyard_version_weight{model="$model"}, version)',
        True,
    ),
]


def annotation(name: str, expr: str, title: str, text: str, color: str) -> dict[str, Any]:
    return {
        "name": name,
        "datasource": DS,
        "enable": True,
        "iconColor": color,
        "expr": expr,
        "step": "1s",
        "titleFormat": title,
        "textFormat": text,
        "tagKeys": "model",
        "useValueForTime": False,
    }


ROLLOUT_ANNOTATIONS = [
    annotation(
        "Rollbacks",
        'sum by (model, reason) (increase(switchyard_rollbacks_total{model="$model"}'
        "[$__rate_interval])) > 0",
        "Rollback ({{reason}})",
        "{{model}} rolled back: {{reason}}",
        "red",
    ),
    annotation(
        "Rollouts started",
        'sum by (model, strategy) (increase(switchyard_rollouts_started_total{model="$model"}'
        "[$__rate_interval])) > 0",
        "Rollout started ({{strategy}})",
        "{{model}}: {{strategy}} rollout started",
        "blue",
    ),
    annotation(
        "Rollouts ended",
        'sum by (model, outcome) (increase(switchyard_rollouts_finished_total{model="$model"}'
        "[$__rate_interval])) > 0",
        "Rollout {{outcome}}",
        "{{model}}: rollout {{outcome}}",
        "green",
    ),
]


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    variables: list[dict[str, Any]],
    annotations: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    builtin = {
        "name": "Annotations & Alerts",
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "type": "dashboard",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["switchyard"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "links": [
            {
                "title": "Switchyard",
                "type": "dashboards",
                "tags": ["switchyard"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {"list": [builtin, *annotations]},
        "templating": {"list": variables},
        "panels": layout(panels),
    }


# -- the dashboards --------------------------------------------------------------------------


def traffic() -> dict[str, Any]:
    observed_share = (
        "100 * "
        + envoy_rate("envoy_cluster_upstream_rq_total")
        + f" / scalar(sum(rate(envoy_cluster_upstream_rq_total{{{ALL_CLUSTERS}}}"
        "[$__rate_interval])))"
    )
    phases = dict(enumerate(zip(PHASES, PHASE_COLORS, strict=True)))
    panels = [
        row("Traffic split"),
        panel(
            "Set weight vs observed share of requests",
            [
                target(
                    f"max by (version) (switchyard_version_weight{{{VLLM}}})", "{{version}} set"
                ),
                target(observed_share, "{{version}} observed"),
            ],
            unit="percent",
            width=16,
            height=10,
            description="The weight the controller set for each version (dashed) and the "
            "share of the model's requests Envoy actually sent to it.",
            defaults={"min": 0, "max": 100},
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": ".* set$"},
                    "properties": [
                        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 6]}},
                        {"id": "custom.lineWidth", "value": 2},
                        {"id": "custom.fillOpacity", "value": 0},
                    ],
                }
            ],
        ),
        panel(
            "Requests per second by version",
            [target(envoy_rate("envoy_cluster_upstream_rq_total"), "{{version}}")],
            unit="reqps",
            width=8,
            height=10,
            description="Requests Envoy sent to each version's cluster (all Envoys).",
        ),
        row("Rollouts"),
        panel(
            "Rollout phase",
            [target('max by (model) (switchyard_rollout_phase{model="$model"})', "{{model}}")],
            kind="state-timeline",
            width=16,
            height=5,
            description="Phase of the model's latest rollout.",
            defaults={"mappings": value_mappings(phases), "color": {"mode": "thresholds"}},
        ),
        panel(
            "Rollout step",
            [target('max by (model) (switchyard_rollout_step{model="$model"})', "step index")],
            width=8,
            height=5,
            description="Index of the step the active rollout is on.",
            defaults={"custom": {"lineInterpolation": "stepAfter", "lineWidth": 2}},
        ),
        panel(
            "Analysis verdicts",
            [
                target(
                    "sum by (result) (increase(switchyard_analysis_verdicts_total"
                    '{model="$model"}[$__rate_interval]))',
                    "{{result}}",
                )
            ],
            width=12,
            description="Verdicts of the rollout analysis (pass, fail, inconclusive).",
            defaults={"custom": BARS | {"stacking": {"mode": "normal", "group": "A"}}},
            overrides=color_by_name({"pass": "green", "fail": "red", "inconclusive": "yellow"}),
        ),
        panel(
            "Rollouts started",
            [
                target(
                    "round(sum(increase(switchyard_rollouts_started_total"
                    '{model="$model"}[$__range])))',
                    "started",
                    instant=True,
                )
            ],
            kind="stat",
            width=4,
            description="Rollouts started in the time range.",
        ),
        panel(
            "Rollouts ended",
            [
                target(
                    "round(sum by (outcome) (increase(switchyard_rollouts_finished_total"
                    '{model="$model"}[$__range])))',
                    "{{outcome}}",
                    instant=True,
                )
            ],
            kind="stat",
            width=4,
            description="Rollouts that succeeded, were aborted or rolled back in the time range.",
            overrides=color_by_name(
                {"succeeded": "green", "aborted": "orange", "rolled_back": "red"}
            ),
        ),
        panel(
            "Rollbacks",
            [
                target(
                    'round(sum(increase(switchyard_rollbacks_total{model="$model"}[$__range])))',
                    "rollbacks",
                    instant=True,
                )
            ],
            kind="stat",
            width=4,
            description="Rollbacks in the time range (by analysis or emergency); each one is "
            "an annotation on the graphs, with its reason.",
            defaults={"color": {"mode": "fixed", "fixedColor": "red"}},
        ),
    ]
    return dashboard(
        "switchyard-traffic",
        "Switchyard / Traffic split and rollouts",
        "Per model: the weight set for each version against the share it really served, "
        "and every rollout's phases, verdicts and rollbacks.",
        panels,
        MODEL_VARIABLES,
        ROLLOUT_ANNOTATIONS,
    )


PHASE_COLORS = ("blue", "yellow", "green", "orange", "red")


def health() -> dict[str, Any]:
    envoy_requests = envoy_rate("envoy_cluster_upstream_rq_total")
    errors = envoy_rate("envoy_cluster_upstream_rq_xx", 'envoy_response_code_class="5"')
    # A version without any 5xx has no class-5 series at all: count it as 0, not as no data.
    error_rate = f"({errors} or 0 * {envoy_requests}) / {envoy_requests}"
    latency_targets = [
        target(envoy_quantile(q, "envoy_cluster_upstream_rq_time_bucket"), f"{{{{version}}}} p{p}")
        for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
    ]
    panels = [
        row("Requests (Envoy)"),
        panel(
            "Request rate",
            [target(envoy_requests, "{{version}}")],
            unit="reqps",
            width=8,
            description="Requests Envoy sent to each version (all Envoys).",
        ),
        panel(
            "Error rate (5xx)",
            [target(error_rate, "{{version}}")],
            unit="percentunit",
            width=8,
            description="Share of each version's requests answered with a 5xx, Envoy's own "
            "503s and 504s included.",
        ),
        panel(
            "Requests in flight",
            [
                target(
                    "sum by (version) "
                    f"({by_version(f'envoy_cluster_upstream_rq_active{{{CLUSTERS}}}')})",
                    "{{version}}",
                )
            ],
            width=8,
            description="Requests Envoy has open to each version.",
        ),
        panel(
            "Latency (Envoy upstream time)",
            latency_targets,
            unit="ms",
            width=24,
            description="p50, p95 and p99 of the whole upstream request (streams included, "
            "so it grows with the number of tokens).",
        ),
        row("Inference (vLLM)"),
        panel(
            "Time to first token p95",
            [
                target(
                    quantile(0.95, f"vllm:time_to_first_token_seconds_bucket{{{VLLM}}}", "version"),
                    "{{version}}",
                )
            ],
            unit="s",
            width=12,
            description="From vLLM's /metrics on every backend of the version.",
        ),
        panel(
            "Inter-token latency p95",
            [
                target(
                    quantile(0.95, f"vllm:inter_token_latency_seconds_bucket{{{VLLM}}}", "version"),
                    "{{version}}",
                )
            ],
            unit="s",
            width=12,
            description="From vLLM's /metrics on every backend of the version.",
        ),
        panel(
            "Queue depth",
            [
                target(
                    f"sum by (version) (vllm:num_requests_waiting{{{VLLM}}})", "{{version}} waiting"
                ),
                target(
                    f"sum by (version) (vllm:num_requests_running{{{VLLM}}})", "{{version}} running"
                ),
            ],
            width=12,
            description="Requests waiting in vLLM's queue and running, summed over the "
            "version's backends.",
        ),
        panel(
            "Generated tokens per second",
            [
                target(
                    "sum by (version) "
                    f"(rate(vllm:generation_tokens_total{{{VLLM}}}[$__rate_interval]))",
                    "{{version}}",
                )
            ],
            width=12,
            description="Output tokens per second, summed over the version's backends.",
        ),
        panel(
            "Prefix cache hit rate",
            [
                target(
                    "sum by (version) "
                    f"(rate(vllm:prefix_cache_hits_total{{{VLLM}}}[$__rate_interval])) / "
                    "sum by (version) "
                    f"(rate(vllm:prefix_cache_queries_total{{{VLLM}}}[$__rate_interval]))",
                    "{{version}}",
                )
            ],
            unit="percentunit",
            width=12,
            description="Share of the prompt tokens found in the engines' prefix cache (their "
            "prefill skipped), over the version's backends: what `routing: prefix_aware` "
            "raises (docs/routing.md).",
        ),
        panel(
            "Endpoint picker choices",
            [
                target(
                    "sum by (version, reason) (rate(switchyard_picker_picks_total"
                    f"{{{VLLM}}}[$__rate_interval]))",
                    "{{version}} {{reason}}",
                )
            ],
            unit="reqps",
            width=12,
            description="Requests of a `prefix_aware` model the picker placed, by why: "
            "prefix (an endpoint had part of the prompt), load (none had), none (no "
            "candidate: Envoy's least request). Absent for other models.",
        ),
        row("Backends"),
        panel(
            "Ready",
            [target(f"max by (version) (switchyard_backend_ready{{{VLLM}}})", "{{version}}")],
            kind="state-timeline",
            width=12,
            height=6,
            description="Whether the version has a ready endpoint in Envoy's EDS.",
            defaults={
                "mappings": value_mappings({0: ("not ready", "red"), 1: ("ready", "green")}),
                "color": {"mode": "thresholds"},
            },
        ),
        panel(
            "State",
            [
                target(
                    f"max by (version, state) (switchyard_backend_state{{{VLLM}}}) == 1",
                    "{{version}}: {{state}}",
                    instant=True,
                )
            ],
            kind="stat",
            width=6,
            height=6,
            description="Each version's state: starting, active, sleeping, waking, error "
            "or stopped.",
            options={"textMode": "name"},
        ),
        panel(
            "Metrics scraped",
            [target(f"min by (version) (up{{{VLLM}}})", "{{version}}", instant=True)],
            kind="stat",
            width=6,
            height=6,
            description="1 when Prometheus reaches every backend's /metrics.",
            defaults={
                "mappings": value_mappings({0: ("down", "red"), 1: ("up", "green")}),
                "color": {"mode": "thresholds"},
            },
        ),
    ]
    return dashboard(
        "switchyard-health",
        "Switchyard / Model health",
        "Per version of one model: what Envoy saw (requests, errors, latency) and what vLLM "
        "reports (time to first token, inter-token latency, queue).",
        panels,
        MODEL_VARIABLES,
        ROLLOUT_ANNOTATIONS[:1],
    )


def control_plane() -> dict[str, Any]:
    panels = [
        row("xDS"),
        panel(
            "Connected Envoys",
            [
                target("sum(switchyard_xds_connected_envoys)", "controller's view"),
                target("sum(envoy_control_plane_connected_state)", "Envoys' view"),
            ],
            width=8,
            description="ADS streams the controller holds, and scraped Envoys that report "
            "being connected to it.",
            defaults={"min": 0, "decimals": 0},
        ),
        panel(
            "Pushes by type",
            [
                target(
                    "sum by (type) (increase(switchyard_xds_pushes_total[$__rate_interval]))",
                    "{{type}}",
                )
            ],
            width=8,
            description="Discovery responses sent (one per Envoy and changed type).",
            defaults={"custom": BARS},
        ),
        panel(
            "NACKs by type",
            [
                target(
                    "sum by (type) (increase(switchyard_xds_nacks_total[$__rate_interval]))",
                    "{{type}}",
                )
            ],
            width=8,
            description="Configuration an Envoy rejected; the controller undoes the change. "
            "The message is in `switchyard envoys` and the `xds.nack` event.",
            defaults={"custom": BARS, "color": {"mode": "fixed", "fixedColor": "red"}},
        ),
        panel(
            "Push to ACK latency",
            [
                target(quantile(q, "switchyard_xds_push_ack_seconds_bucket", "type"), legend)
                for q, legend in ((0.5, "{{type}} p50"), (0.99, "{{type}} p99"))
            ],
            unit="s",
            width=12,
            description="From sending a discovery response to the Envoy's ACK.",
        ),
        panel(
            "Snapshot build time",
            [
                target(quantile(q, "switchyard_snapshot_build_seconds_bucket", "instance"), legend)
                for q, legend in ((0.5, "p50"), (0.99, "p99"))
            ],
            unit="s",
            width=6,
            description="Building and serializing one xDS snapshot from the state.",
        ),
        panel(
            "Weight changes",
            [
                target(
                    "sum by (model) (increase(switchyard_weight_changes_total[$__rate_interval]))",
                    "{{model}}",
                )
            ],
            width=6,
            description="Weight changes applied and ACKed, by model.",
            defaults={"custom": BARS},
        ),
        row("Admin API"),
        panel(
            "Requests by route and status",
            [
                target(
                    "sum by (method, route, status) "
                    "(rate(switchyard_admin_requests_total[$__rate_interval]))",
                    "{{method}} {{route}} {{status}}",
                )
            ],
            unit="reqps",
            width=12,
            description="Admin API calls by route pattern, method and HTTP status.",
        ),
        panel(
            "Latency p95 by route",
            [
                target(
                    quantile(0.95, "switchyard_admin_request_seconds_bucket", "method, route"),
                    "{{method}} {{route}}",
                )
            ],
            unit="s",
            width=12,
            description="Weight changes and rollout steps include waiting for every Envoy's ACK.",
        ),
        row("Processes"),
        panel(
            "Controller CPU",
            [
                target(
                    "rate(switchyard_process_cpu_seconds_total[$__rate_interval])", "{{instance}}"
                )
            ],
            unit="percentunit",
            width=8,
            description="CPU time of the controller process (1 = one core).",
        ),
        panel(
            "Controller memory",
            [target("switchyard_process_resident_memory_bytes", "{{instance}}")],
            unit="bytes",
            width=8,
            description="Resident memory of the controller process.",
        ),
        panel(
            "Envoy restarts",
            [
                target(
                    "round(sum(increase(switchyard_envoy_restarts_total[$__range])))",
                    "restarts",
                    instant=True,
                )
            ],
            kind="stat",
            width=8,
            description="Times `switchyard up` restarted a dead Envoy, in the time range.",
        ),
    ]
    return dashboard(
        "switchyard-control-plane",
        "Switchyard / Control plane",
        "The controller: Envoys connected over ADS, pushes and their ACKs, NACKs, snapshot "
        "builds, the admin API and the process itself.",
        panels,
        [datasource_variable()],
    )


# -- files -----------------------------------------------------------------------------------


def build_all() -> dict[str, dict[str, Any]]:
    """File name -> dashboard."""
    return {
        "traffic.json": traffic(),
        "health.json": health(),
        "control-plane.json": control_plane(),
    }


def render(dashboard_json: dict[str, Any]) -> str:
    return json.dumps(dashboard_json, indent=2) + "\n"


def write(directory: Path = OUT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, board in build_all().items():
        path = directory / name
        path.write_text(render(board))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for path in write(Path(args[0]) if args else OUT_DIR):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
