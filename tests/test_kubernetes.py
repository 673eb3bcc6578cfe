"""The Kubernetes runtime against kmock's API emulator over real HTTP, with the real client.

The emulator has no kubelet and no EndpointSlice controller: tests write the EndpointSlices
those would write, pointing at real simulator processes where traffic flows, and a real Envoy
shows what reached EDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from controlplane.config import Backend, SimBackend, VersionConfig, parse_config
from controlplane.controller import Controller
from controlplane.errors import Unavailable
from controlplane.reconciler.kubernetes import KubernetesRuntime
from controlplane.reconciler.vllm_args import API_VERSION, GROUP, PLURAL

from . import kube_emulator
from .conftest import EnvoyProcess, free_ports, http_json, write_config

NS = "switchyard"
LEASE = "switchyard-controller"


def vllmmodel(name: str, version: str, model: str = "llama-3-8b", **spec) -> dict:
    return {
        "apiVersion": f"{GROUP}/{API_VERSION}",
        "kind": "VLLMModel",
        "metadata": {"name": name},
        "spec": {"model": model, "version": version, "modelName": f"org/{model}-{version}", **spec},
    }


def endpoint_slice(service: str, addresses: dict[str, bool], port: int, name: str = "") -> dict:
    """An EndpointSlice as Kubernetes' EndpointSlice controller writes it for `service`."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-abcde",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": ready}}
            for address, ready in addresses.items()
        ],
    }


class Kube:
    """The real `kubernetes` client against the emulator, off the event loop."""

    def __init__(self, emulator: kube_emulator.Emulator, url: str) -> None:
        self.emulator = emulator
        self.api = kube_emulator.api_client(url)
        self.custom = client.CustomObjectsApi(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)

    async def create_model(self, body: dict) -> None:
        await asyncio.to_thread(
            self.custom.create_namespaced_custom_object, GROUP, API_VERSION, NS, PLURAL, body
        )

    async def patch_model(self, name: str, patch: dict) -> None:
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object, GROUP, API_VERSION, NS, PLURAL, name, patch
        )

    async def delete_model(self, name: str) -> None:
        await asyncio.to_thread(
            self.custom.delete_namespaced_custom_object, GROUP, API_VERSION, NS, PLURAL, name
        )

    async def put_slice(self, body: dict) -> None:
        name = body["metadata"]["name"]
        if self.emulator.get("endpointslices", NS, name) is None:
            await asyncio.to_thread(self.discovery.create_namespaced_endpoint_slice, NS, body)
        else:
            await asyncio.to_thread(
                self.discovery.replace_namespaced_endpoint_slice, name, NS, body
            )

    async def delete_slice(self, name: str) -> None:
        await asyncio.to_thread(self.discovery.delete_namespaced_endpoint_slice, name, NS)

    def get(self, plural: str, name: str) -> dict | None:
        return self.emulator.get(plural, NS, name)


async def until(predicate, timeout: float = 10.0, message: str = "", io: bool = False):
    """Poll `predicate` (in a thread when it does blocking `io`) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await asyncio.to_thread(predicate) if io else predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


def make_controller(tmp_path: Path, listen: dict | None = None) -> Controller:
    data = {"runtime": "kubernetes", "state_dir": str(tmp_path / "state")}
    if listen:
        data["listen"] = listen
    return Controller(parse_config(data), tmp_path / "state")


@pytest.fixture
async def kube():
    async with kube_emulator.serve() as (emulator, url):
        yield Kube(emulator, url)


@pytest.fixture
async def runtime(kube, tmp_path):
    controller = make_controller(tmp_path)
    runtime = KubernetesRuntime(controller, NS, kube.api, sim_image="switchyard:test")
    controller.runtime = runtime
    await runtime.start()
    assert await runtime.wait_synced()
    yield runtime
    await runtime.stop()
    controller.store.close()


def container_of(deployment: dict) -> dict:
    (serving,) = deployment["spec"]["template"]["spec"]["containers"]
    return serving


async def test_a_vllmmodel_becomes_a_deployment_and_service_with_its_vllm_flags(kube, runtime):
    await kube.create_model(vllmmodel(
        "llama-3-8b-v1", "v1", gpuCount=2, replicas=3, maxModelLen=8192,
        gpuMemoryUtilization=0.9, enablePrefixCaching=False, extraArgs=["--seed", "7"],
    ))  # fmt: skip
    deployment = await until(lambda: kube.get("deployments", "llama-3-8b-v1"), message="deploy")
    service = await until(lambda: kube.get("services", "llama-3-8b-v1"), message="service")
    model = kube.get(PLURAL, "llama-3-8b-v1")
    owner = {"apiVersion": "switchyard.io/v1alpha1", "kind": "VLLMModel", "name": "llama-3-8b-v1",
             "uid": model["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    assert deployment["metadata"]["ownerReferences"] == [owner]
    assert service["metadata"]["ownerReferences"] == [owner]
    assert deployment["spec"]["replicas"] == 3
    serving = container_of(deployment)
    assert serving["command"] == ["vllm", "serve"]
    assert serving["args"] == [
        "org/llama-3-8b-v1", "--host", "0.0.0.0", "--port", "8000",
        "--served-model-name", "llama-3-8b", "--tensor-parallel-size", "2",
        "--max-model-len", "8192", "--gpu-memory-utilization", "0.9",
        "--no-enable-prefix-caching", "--seed", "7",
    ]  # fmt: skip
    assert serving["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert serving["startupProbe"]["httpGet"]["path"] == "/health"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["switchyard.io/model"] == "llama-3-8b" and labels["switchyard.io/version"] == "v1"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # The catalog: the first version of a model takes all traffic.
    controller = runtime.controller
    await until(lambda: "llama-3-8b" in controller.state.models, message="model added")
    assert controller.state.model("llama-3-8b").weights == {"v1": 100}
    status = await until(lambda: (kube.get(PLURAL, "llama-3-8b-v1") or {}).get("status"))
    assert status["state"] == "starting" and status["readyReplicas"] == 0
    assert status["conditions"][0]["type"] == "Ready"
    assert status["conditions"][0]["status"] == "False"


async def test_pods_with_sleep_mode_get_vllms_dev_mode_for_its_sleep_endpoints(kube, runtime):
    """vLLM serves /sleep, /wake_up, /is_sleeping and /collective_rpc only with
    VLLM_SERVER_DEV_MODE=1: without it a parked version's /sleep 404s after it left EDS."""
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1", enableSleepMode=True))
    await kube.create_model(vllmmodel("llama-3-8b-v2", "v2"))
    sleeping = container_of(await until(lambda: kube.get("deployments", "llama-3-8b-v1")))
    assert "--enable-sleep-mode" in sleeping["args"]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in sleeping["env"]
    plain = container_of(await until(lambda: kube.get("deployments", "llama-3-8b-v2")))
    assert "--enable-sleep-mode" not in plain["args"] and "env" not in plain


async def test_a_version_added_through_the_admin_api_gets_a_simulator_vllmmodel(kube, runtime):
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    controller = runtime.controller
    await until(lambda: "llama-3-8b" in controller.state.models)
    backend = Backend(sim=SimBackend(ttft_ms=30))
    await controller.add_version("llama-3-8b", VersionConfig(name="v2", weight=0, backend=backend))
    created = await until(lambda: kube.get(PLURAL, "llama-3-8b-v2"), message="the VLLMModel")
    assert created["spec"]["simulator"]["ttftMs"] == 30
    deployment = await until(lambda: kube.get("deployments", "llama-3-8b-v2"))
    serving = container_of(deployment)
    assert serving["image"] == "switchyard:test"
    assert serving["command"] == ["python", "-m", "controlplane"]
    assert serving["args"][:2] == ["sim", "--host"] and "--ttft-ms" in serving["args"]
    assert "nvidia.com/gpu" not in serving["resources"].get("limits", {})
    assert controller.state.model("llama-3-8b").weights == {"v1": 100, "v2": 0}


async def test_a_backend_kubernetes_cannot_run_is_refused_and_leaves_no_trace(kube, runtime):
    """A `url` backend is no Kubernetes workload: adding it is a 422 naming the field, and
    nothing is persisted, routed or created (not even after a restart)."""
    from aiohttp import ClientSession, web

    from controlplane.admin.app import make_app
    from controlplane.rollout.engine import RolloutEngine

    controller = runtime.controller
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await until(lambda: "llama-3-8b" in controller.state.models, message="model added")
    admin = web.AppRunner(make_app(controller, RolloutEngine(controller)))
    await admin.setup()
    await web.TCPSite(admin, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{admin.addresses[0][1]}"
    url_backend = {"url": "http://10.0.0.5:8000"}
    try:
        async with ClientSession() as session:

            async def call(method: str, path: str, body=None) -> tuple[int, dict]:
                async with session.request(method, base + path, json=body) as response:
                    return response.status, await response.json()

            _, before = await call("GET", "/v1/models")
            snapshot = controller.snapshot.version if controller.snapshot else None
            status, body = await call("POST", "/v1/models/llama-3-8b/versions",
                                      {"name": "v2", "backend": url_backend})  # fmt: skip
            assert status == 422, body
            assert body["error"]["field"] == "backend" and "url" in body["error"]["message"]
            assert await call("GET", "/v1/models") == (200, before)
            new_model = {"name": "qwen", "versions": [
                {"name": "v1", "weight": 100, "backend": {"sim": {}}},
                {"name": "v2", "weight": 0, "backend": url_backend}]}  # fmt: skip
            status, body = await call("POST", "/v1/models", new_model)
            assert status == 422, body
            assert body["error"]["field"] == "versions[v2].backend"
            assert await call("GET", "/v1/models") == (200, before)
    finally:
        await admin.cleanup()
    assert (controller.snapshot.version if controller.snapshot else None) == snapshot
    assert [m["metadata"]["name"] for m in kube.emulator.items(PLURAL, NS)] == ["llama-3-8b-v1"]
    restarted = make_controller(runtime.controller.state_dir.parent)
    assert list(restarted.state.models) == ["llama-3-8b"]
    assert list(restarted.state.models["llama-3-8b"].versions) == ["v1"]
    restarted.store.close()


async def test_a_version_whose_vllmmodel_cannot_be_created_is_taken_back(kube, runtime):
    """The API server refuses to create the version's VLLMModel (503): the caller is told, and
    the version is gone again rather than stuck in `starting` with nothing to start it."""
    from controlplane.errors import Unavailable

    controller = runtime.controller
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await until(lambda: (kube.get(PLURAL, "llama-3-8b-v1") or {}).get("status"), message="status")
    versions = controller.state.model("llama-3-8b").to_json()["versions"]
    kube.emulator.fail_next(PLURAL, code=503)
    config = VersionConfig(name="v2", weight=0, backend=Backend(sim=SimBackend()))
    with pytest.raises(Unavailable, match="VLLMModel"):
        await controller.add_version("llama-3-8b", config)
    assert controller.state.model("llama-3-8b").to_json()["versions"] == versions
    assert kube.get(PLURAL, "llama-3-8b-v2") is None
    restarted = make_controller(controller.state_dir.parent)
    assert list(restarted.state.model("llama-3-8b").versions) == ["v1"]
    restarted.store.close()
    await controller.add_version("llama-3-8b", config)  # the API is back: it goes through
    await until(lambda: kube.get(PLURAL, "llama-3-8b-v2"), message="the VLLMModel")


async def test_deleting_a_vllmmodel_removes_its_workload_and_version(kube, runtime):
    controller = runtime.controller
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await kube.create_model(vllmmodel("llama-3-8b-v2", "v2"))
    await until(lambda: kube.get("deployments", "llama-3-8b-v2"))
    await kube.put_slice(endpoint_slice("llama-3-8b-v1", {"10.0.0.1": True}, 8000))
    await until(lambda: controller.state.model("llama-3-8b").versions["v1"].ready)
    await kube.delete_model("llama-3-8b-v2")  # weight 0: removed
    await until(lambda: "v2" not in controller.state.model("llama-3-8b").versions)
    await until(lambda: kube.get("deployments", "llama-3-8b-v2") is None)
    assert kube.get("services", "llama-3-8b-v2") is None
    await kube.delete_model("llama-3-8b-v1")  # all the traffic: kept, but out of EDS
    v1 = controller.state.model("llama-3-8b").versions["v1"]
    await until(lambda: v1.state == "stopped", message="v1 stopped")
    assert v1.endpoints == [] and v1.weight == 100
    await until(lambda: kube.get("deployments", "llama-3-8b-v1") is None)


async def test_a_watch_that_expires_relists_and_sees_what_it_missed(kube, runtime):
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await until(lambda: kube.get("deployments", "llama-3-8b-v1"))
    missed = vllmmodel("qwen-2-7b-v1", "v1", model="qwen-2-7b")

    def lost_in_compaction(emulator):
        emulator.put_silently(kube_emulator.resource_of(GROUP, API_VERSION, PLURAL), NS, missed)

    await kube.emulator.expire_watches(silently=lost_in_compaction)
    await until(lambda: kube.get("deployments", "qwen-2-7b-v1"), message="relist")
    assert "qwen-2-7b" in runtime.controller.state.models
    assert [w.relists for w in runtime._watches] >= [2, 2]


async def test_a_conflicting_write_is_read_again_and_retried(kube, runtime):
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await until(lambda: kube.get("deployments", "llama-3-8b-v1"))
    kube.emulator.conflict_next("deployments", count=2)
    await kube.patch_model("llama-3-8b-v1", {"spec": {"maxModelLen": 4096}})

    def updated():
        args = container_of(kube.get("deployments", "llama-3-8b-v1"))["args"]
        return "--max-model-len" in args and args[args.index("--max-model-len") + 1] == "4096"

    await until(updated, message="the Deployment to carry the new spec")
    assert kube.emulator.conflicts >= 2


async def test_api_errors_are_retried_with_backoff(kube, runtime):
    kube.emulator.fail_next("services", count=2, code=503)
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await until(lambda: kube.get("services", "llama-3-8b-v1"), message="service after 503s")


async def test_only_one_controller_leads_and_a_standby_takes_over(kube):
    from controlplane.reconciler.leader import LeaderElector

    def elector(identity: str) -> LeaderElector:
        return LeaderElector(kube.api, NS, identity, lease_duration_s=2, renew_deadline_s=1.5,
                             retry_s=0.2)  # fmt: skip

    first, second = elector("controller-a"), elector("controller-b")
    first.start()
    await asyncio.wait_for(first.wait_leading(), 5)
    second.start()
    for _ in range(10):  # the standby keeps seeing a renewed Lease
        await asyncio.sleep(0.2)
        assert first.is_leader and not second.is_leader
    lease = kube.get("leases", "switchyard-controller")
    assert lease["spec"]["holderIdentity"] == "controller-a"
    await first.stop(release=False)  # it dies: the Lease runs out
    await asyncio.wait_for(second.wait_leading(), 10)
    assert kube.get("leases", "switchyard-controller")["spec"]["holderIdentity"] == "controller-b"
    third = elector("controller-c")
    third.start()
    await second.stop(release=True)  # a clean shutdown hands over at once
    await asyncio.wait_for(third.wait_leading(), 3)
    await third.stop()


async def test_a_leader_that_cannot_renew_stops_leading(kube):
    from controlplane.reconciler.leader import LeaderElector

    leader = LeaderElector(kube.api, NS, "controller-a", lease_duration_s=2,
                           renew_deadline_s=1, retry_s=0.2)  # fmt: skip
    leader.start()
    await asyncio.wait_for(leader.wait_leading(), 5)
    kube.emulator.fail_next("leases", count=1000, code=503)
    await asyncio.wait_for(leader.lost.wait(), 5)
    assert not leader.is_leader
    await leader.stop()


def lease_is_valid_for(kube: Kube, identity: str) -> bool:
    """Does the stored Lease name `identity`, renewed less than its duration ago (wall clock:
    the elector writes renewTime from it)?"""
    spec = (kube.get("leases", "switchyard-controller") or {}).get("spec") or {}
    if spec.get("holderIdentity") != identity or not spec.get("renewTime"):
        return False
    renewed = datetime.datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00"))
    age = datetime.datetime.now(datetime.UTC) - renewed
    return age.total_seconds() < spec["leaseDurationSeconds"]


async def test_a_leader_whose_api_answers_nothing_stops_acting_while_its_lease_holds(kube):
    from controlplane.reconciler.leader import LeaderElector

    leader = LeaderElector(kube.api, NS, "controller-a", lease_duration_s=2,
                           renew_deadline_s=1.5, retry_s=0.2, call_timeout_s=1)  # fmt: skip
    leader.start()
    await asyncio.wait_for(leader.wait_leading(), 5)
    # Every write still lands, but no answer comes back: the leader cannot know it renewed.
    kube.emulator.slow("leases", max_delay_s=0, drop=1.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not leader.lost.is_set():
        assert loop.time() < deadline, "the leader never gave up"
        if leader.is_leader:  # acting: the Lease must still be ours in everyone's eyes
            assert lease_is_valid_for(kube, "controller-a"), kube.get("leases", LEASE)
        await asyncio.sleep(0.005)
    assert not leader.is_leader and kube.emulator.dropped >= 1
    await leader.stop(release=False)


class Replica:
    """One controller replica: campaigns for the Lease and, once it lost it, campaigns again
    as a new pod would (a new name); writes to the shared state database as fast as the
    store lets it."""

    def __init__(self, kube: Kube, name: str, controller: Controller) -> None:
        self.kube, self.name, self.controller = kube, name, controller
        self.terms = 0  # leaderships started
        self.elector = self._elector()
        self.writes: list[tuple[str, int, float, float]] = []  # (identity, term, start, end)
        controller.store.may_write = lambda: self.elector.is_leader

    @property
    def identity(self) -> str:
        return self.elector.identity

    def _elector(self):
        from controlplane.reconciler.leader import LeaderElector

        return LeaderElector(self.kube.api, NS, f"{self.name}-{self.terms}", lease_duration_s=2,
                             renew_deadline_s=1.5, retry_s=0.2, call_timeout_s=1)  # fmt: skip

    async def campaign(self) -> None:
        while True:
            self.elector.start()
            await self.elector.wait_leading()
            self.terms += 1
            await self.elector.lost.wait()
            await self.elector.stop(release=False)
            self.elector = self._elector()

    async def write(self) -> None:
        doc = {"id": f"ro-{self.identity}", "model": "m", "phase": "paused", "created_at": 0.0}
        while True:
            started, term = time.monotonic(), self.terms
            with contextlib.suppress(Unavailable):
                self.controller.store.save(rollouts=[doc])
                self.writes.append((self.identity, term, started, time.monotonic()))
            await asyncio.sleep(0.01)


async def test_two_controllers_on_a_slow_dropping_api_never_act_at_once(kube, tmp_path):
    """ADR 0002: two writers never overlap. Two replicas share one state database; the API
    server delays every Lease request and answer by up to 0.6 s each and loses 15 % of the
    answers. Leadership changes hands, and at no moment do both act, nor does one act
    without holding an unexpired Lease."""
    replicas = [Replica(kube, name, make_controller(tmp_path)) for name in ("ctl-a", "ctl-b")]
    kube.emulator.slow("leases", max_delay_s=0.6, drop=0.15, seed=7)
    tasks = [asyncio.create_task(job()) for r in replicas for job in (r.campaign, r.write)]
    loop = asyncio.get_running_loop()
    try:
        until_time = loop.time() + 40  # ends as soon as leadership changed hands enough
        while loop.time() < until_time and not (sum(r.terms for r in replicas) >= 3
                                                and all(r.terms for r in replicas)):  # fmt: skip
            leaders = [r for r in replicas if r.elector.is_leader]
            assert len(leaders) <= 1, "two replicas lead at once"
            for replica in leaders:
                assert lease_is_valid_for(kube, replica.identity), kube.get("leases", LEASE)
            await asyncio.sleep(0.005)
        assert all(r.terms for r in replicas), [r.terms for r in replicas]
        kube.emulator.heal()  # the API recovers: someone leads again
        await until(lambda: any(r.elector.is_leader for r in replicas), 10, "a leader")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in replicas:
            await replica.elector.stop(release=False)
            replica.controller.store.close()
    # The state's writers: grouped by leadership, the spans never interleave.
    spans: dict[tuple[str, int], list[float]] = {}
    for identity, term, start, end in sorted(w for r in replicas for w in r.writes):
        span = spans.setdefault((identity, term), [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    assert {identity[:5] for (identity, _), _ in ordered} == {"ctl-a", "ctl-b"}, "both wrote"
    for (first, first_span), (second, second_span) in itertools.pairwise(ordered):
        assert first_span[1] < second_span[0], f"{first} and {second} wrote at the same time"


def ask(proxy: str, model: str = "llama-3-8b") -> str | None:
    """The version that served one completion through Envoy (None when it failed)."""
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2}).encode()
    request = urllib.request.Request(f"{proxy}/v1/completions", body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers.get("x-switchyard-version")
    except OSError:
        return None


def envoy_hosts(admin: str, cluster: str) -> set[str] | None:
    """The hosts Envoy has for `cluster`, from its admin /clusters (what EDS delivered)."""
    try:
        with urllib.request.urlopen(f"{admin}/clusters", timeout=5) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return None  # not up yet
    rows = [line.split("::") for line in lines]
    return {row[1] for row in rows if row[0].split("/")[0] == cluster and row[2:3] == ["cx_active"]}


class Sims:
    """Simulator processes standing in for the pods of a Deployment, one address each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen] = []

    def start(self, address: str, port: int, version: str) -> str:
        log = open(self.directory / f"sim-{address}-{port}.log", "wb")  # noqa: SIM115
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane", "sim", "--host", address, "--port", str(port),
             "--model", "llama-3-8b", "--version", version],
            stdout=log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        return f"http://{address}:{port}"

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


async def test_envoy_routes_to_endpointslice_pods_and_a_canary_rollout_runs(kube, tmp_path):
    from controlplane.rollout.engine import RolloutEngine

    config_path, config = write_config(tmp_path, [], runtime="kubernetes")
    listen = config["listen"]
    controller = make_controller(tmp_path, listen)
    xds_host, xds_port = listen["xds"].rsplit(":", 1)
    await controller.xds.start(xds_host, int(xds_port))
    controller.rebuild()
    engine = RolloutEngine(controller)
    runtime = KubernetesRuntime(controller, NS, kube.api)
    controller.runtime = runtime
    sims = Sims(tmp_path)
    envoy = None
    try:
        await engine.start()
        await runtime.start()
        port_v1, port_v2 = free_ports(2)
        pods_v1 = [sims.start("127.0.0.2", port_v1, "v1"), sims.start("127.0.0.3", port_v1, "v1")]
        pod_v2 = sims.start("127.0.0.4", port_v2, "v2")
        for url in [*pods_v1, pod_v2]:
            await until(lambda url=url: healthy(url), 20, f"{url} healthy")
        v1_spec = {"simulator": {}, "enableSleepMode": True}
        await kube.create_model(vllmmodel("llama-3-8b-v1", "v1", **v1_spec))
        await kube.create_model(vllmmodel("llama-3-8b-v2", "v2", simulator={}))
        await until(lambda: kube.get("deployments", "llama-3-8b-v2"))
        taken = {int(address.rsplit(":", 1)[1]) for address in listen.values()}
        envoy_admin_port = free_ports(1, avoid=taken)[0]
        envoy = EnvoyProcess(tmp_path, config_path, "envoy-k8s", envoy_admin_port)
        admin = f"http://127.0.0.1:{envoy_admin_port}"
        proxy = f"http://{listen['proxy']}"

        # Ready, not ready, removed: EDS follows the EndpointSlices.
        both = {"127.0.0.2": True, "127.0.0.3": True}
        await kube.put_slice(endpoint_slice("llama-3-8b-v1", both, port_v1, "v1-slice"))
        await kube.put_slice(endpoint_slice("llama-3-8b-v2", {"127.0.0.4": True}, port_v2))
        expected = {f"127.0.0.2:{port_v1}", f"127.0.0.3:{port_v1}"}
        v1_hosts = lambda: envoy_hosts(admin, "llama-3-8b@v1")  # noqa: E731
        await until(lambda: v1_hosts() == expected, 20, "v1 in EDS", io=True)
        await until(lambda: ask(proxy) == "v1", 20, "the proxy to route to v1", io=True)
        one_down = {"127.0.0.2": True, "127.0.0.3": False}
        await kube.put_slice(endpoint_slice("llama-3-8b-v1", one_down, port_v1, "v1-slice"))
        await until(lambda: v1_hosts() == {f"127.0.0.2:{port_v1}"}, io=True)
        status = await until(
            lambda: kube.get(PLURAL, "llama-3-8b-v1").get("status", {}).get("readyReplicas") == 1
            and kube.get(PLURAL, "llama-3-8b-v1")["status"]
        )
        assert status["state"] == "active" and status["conditions"][0]["status"] == "True"
        assert status["endpoints"] == [f"http://127.0.0.2:{port_v1}"]
        await kube.put_slice(endpoint_slice("llama-3-8b-v1", both, port_v1, "v1-slice"))
        await until(lambda: v1_hosts() == expected, io=True)
        assert {await asyncio.to_thread(ask, proxy) for _ in range(6)} == {"v1"}

        # A canary rollout over the pods, exactly as with the local runtime.
        await until(lambda: controller.state.model("llama-3-8b").versions["v2"].ready)
        rollout = await engine.create({
            "model": "llama-3-8b", "to": "v2", "strategy": "canary",
            "steps": [{"set_weight": 50}, {"pause": {}}, {"set_weight": 100}],
        })  # fmt: skip
        await until(lambda: engine.get(rollout["id"])["phase"] == "paused", 20, "the pause")
        served = {await asyncio.to_thread(ask, proxy) for _ in range(30)}
        assert served == {"v1", "v2"}
        await engine.command(rollout["id"], "resume")
        await until(lambda: engine.get(rollout["id"])["phase"] == "succeeded", 20, "success")
        assert {await asyncio.to_thread(ask, proxy) for _ in range(6)} == {"v2"}
        # The old stable is parked with vLLM sleep mode (its pods' /sleep), out of EDS.
        v1 = controller.state.model("llama-3-8b").versions["v1"]
        await until(lambda: v1.state == "sleeping", 20, "v1 asleep")
        annotations = kube.get(PLURAL, "llama-3-8b-v1")["metadata"]["annotations"]
        assert annotations["switchyard.io/parked"] == "sleep1"
        for pod in pods_v1:  # told to sleep once every Envoy has it out of EDS

            def asleep(pod=pod) -> bool:
                return http_json("GET", f"{pod}/is_sleeping")[1]["is_sleeping"] is True

            await until(asleep, 20, f"{pod} asleep", io=True)
        await until(lambda: v1_hosts() == set(), 20, "v1 out of EDS", io=True)
        await controller.wake("llama-3-8b", "v1")
        assert v1.state == "active" and len(v1.endpoints) == 2
        await until(lambda: v1_hosts() == expected, io=True)
        # Removed: its endpoints leave EDS.
        await kube.delete_slice("v1-slice")
        await until(lambda: v1_hosts() == set(), 20, "slice removed", io=True)
    finally:
        if envoy is not None:
            envoy.stop()
        sims.stop()
        await runtime.stop()
        await engine.stop()
        await controller.xds.stop()
        controller.store.close()


async def test_a_restarted_controller_adopts_the_existing_catalog(kube, tmp_path):
    await kube.create_model(vllmmodel("llama-3-8b-v1", "v1"))
    await kube.create_model(vllmmodel("llama-3-8b-v2", "v2"))
    await kube.create_model(vllmmodel("broken", "v1", model="qwen", replicas=-1))
    controller = make_controller(tmp_path)
    runtime = KubernetesRuntime(controller, NS, kube.api)
    controller.runtime = runtime
    try:
        await runtime.start()
        assert await runtime.wait_synced()
        assert controller.state.model("llama-3-8b").weights == {"v1": 100, "v2": 0}
        assert "qwen" not in controller.state.models
        broken = await until(lambda: kube.get(PLURAL, "broken").get("status"))
        assert broken["state"] == "error" and "replicas" in broken["conditions"][0]["message"]
        await until(lambda: kube.get("deployments", "llama-3-8b-v2"))
    finally:
        await runtime.stop()
        controller.store.close()


def _adapter_dir(root: Path, name: str) -> str:
    path = root / name
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")  # what the simulator checks
    return str(path)


def _served_by(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
        return {entry["id"] for entry in json.load(response)["data"]}


async def test_a_lora_adapter_vllmmodel_is_loaded_on_its_bases_pods_and_has_none(kube, tmp_path):
    from controlplane.config import AdapterBackend
    from controlplane.reconciler.adapters import with_adapters
    from controlplane.reconciler.kubernetes import resource_name

    controller = make_controller(tmp_path)
    runtime = with_adapters(KubernetesRuntime(controller, NS, kube.api), controller)
    sims = Sims(tmp_path)
    try:
        await runtime.start()
        (port,) = free_ports(1)
        pods = [sims.start("127.0.0.2", port, "v1"), sims.start("127.0.0.3", port, "v1")]
        for url in pods:
            await until(lambda url=url: healthy(url), 20, f"{url} healthy", io=True)
        await kube.create_model(vllmmodel("llama-3-8b-v1", "v1", simulator={}))
        both = {"127.0.0.2": True, "127.0.0.3": True}
        await kube.put_slice(endpoint_slice("llama-3-8b-v1", both, port))
        await kube.create_model({
            "apiVersion": f"{GROUP}/{API_VERSION}", "kind": "VLLMModel",
            "metadata": {"name": "support-bot-v1"},
            "spec": {"model": "support-bot", "version": "v1", "adapter": {
                "base": "llama-3-8b", "path": _adapter_dir(tmp_path, "support-v1")}},
        })  # fmt: skip

        def status() -> dict:
            return (kube.get(PLURAL, "support-bot-v1") or {}).get("status") or {}

        await until(lambda: status().get("state") == "active", 20, "the adapter's status")
        assert sorted(status()["endpoints"]) == pods and status()["readyReplicas"] == 2
        assert status()["conditions"][0]["status"] == "True"
        for pod in pods:
            assert "support-bot--v1" in _served_by(pod)
        assert kube.get("deployments", "support-bot-v1") is None  # no pods of its own
        assert kube.get("services", "support-bot-v1") is None

        # Added through the admin API: a VLLMModel that says `adapter`, and no pods.
        v2 = Backend(adapter=AdapterBackend(base="llama-3-8b",
                                            path=_adapter_dir(tmp_path, "support-v2")))  # fmt: skip
        await controller.add_version("support-bot", VersionConfig(name="v2", weight=0,
                                                                  backend=v2))  # fmt: skip
        name = resource_name("support-bot", "v2")
        created = await until(lambda: kube.get(PLURAL, name), message="the VLLMModel")
        assert created["spec"]["adapter"]["base"] == "llama-3-8b"
        await until(lambda: controller.state.model("support-bot").versions["v2"].ready, 20)
        assert kube.get("deployments", name) is None

        # A base pod that stops being ready leaves the adapter's endpoints with it.
        one = {"127.0.0.2": True, "127.0.0.3": False}
        await kube.put_slice(endpoint_slice("llama-3-8b-v1", one, port))
        await until(lambda: status().get("endpoints") == [pods[0]], 20, "one endpoint left")

        # Its VLLMModel deleted: the version goes, and the adapter leaves the base's pods.
        await kube.delete_model(name)
        await until(lambda: "v2" not in controller.state.model("support-bot").versions, 20)
        await until(lambda: "support-bot--v2" not in _served_by(pods[0]), 20, "unloaded",
                    io=True)  # fmt: skip
    finally:
        await runtime.stop()
        sims.stop()
        controller.store.close()
